"""One fuzz case: build the described model, minimize it, and judge the result without fxmin's help.

:func:`run_case` returns an :class:`Outcome`:

- ``status``: ``exact`` (``result.module`` matches the masked model in float64 on fresh inputs of
  another batch size), ``loud`` (an fxmin error), ``wrong`` (a result that computes something else, or
  fails to run), ``crashed`` (a non-fxmin exception out of ``minimize``);
- ``removal`` (exact cases): ``match`` (fxmin keeps exactly the oracle's ideal), ``limits`` (more, but
  only by named limits, ``fuzz_oracle.LIMITS``), ``keeps-more`` or ``removes-more`` (a finding; the
  layers and channels are in ``differences``);
- ``perturbation``: what fxmin removed, checked on the masked model in float64: rows the oracle calls
  varying are perturbed (weights and bias) and the outputs must not move; rows it calls constant must
  be constant over fresh inputs. ``ok`` or the first failure.
"""
from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field


import torch

import fxmin
from fuzz_models import build, example_inputs
from fuzz_oracle import Oracle, layer_kept
from helpers import masked_copy

TOLERANCE = 1e-5  # relative to max(1, |output|): the result holds float32-rounded folded constants


@dataclass
class Outcome:
    kind: str
    status: str
    error: str = ""
    removal: str = ""
    limits: tuple = ()
    differences: tuple = field(default_factory=tuple)
    perturbation: str = ""


def _error_text(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:160]}"


def fresh_inputs(description: dict, seed: int, count: int = 3) -> list:
    return [tuple(x.double() for x in example_inputs(description, batch=3, seed=seed + k)) for k in range(count)]


def _outputs(model, inputs) -> tuple:
    with torch.no_grad():
        out = model(*inputs)
    return out if isinstance(out, tuple) else (out,)


def compare(reference64, result64, inputs: list) -> str:
    """'' when the outputs agree (relative error <= TOLERANCE), else what differs."""
    for batch in inputs:
        expected, actual = _outputs(reference64, batch), _outputs(result64, batch)
        if len(expected) != len(actual):
            return f"{len(actual)} outputs instead of {len(expected)}"
        for e, a in zip(expected, actual):
            if e.shape != a.shape:
                return f"output shape {tuple(a.shape)} instead of {tuple(e.shape)}"
            error = float((e - a).abs().max()) / max(1.0, float(e.abs().max())) if e.numel() else 0.0
            if not error <= TOLERANCE:
                return f"max relative error {error:.3g}"
    return ""


def fxmin_kept(result, oracle: Oracle) -> dict:
    """Per layer path: ``(rows kept, input channels kept)`` read from ``result.plan`` / ``result.report``."""
    dropped = {row[0] for row in result.report.rows() if row[1] == "removed: read by nothing"}
    kept = {}
    for layer in oracle.layers:
        out, cin = layer.nonzero.shape
        name = f"{layer.path}.weight"
        if name in dropped:
            kept[layer.path] = (set(), set())
            continue
        keeps = result.plan.keeps(name)
        rows = set(range(out)) if not keeps or keeps[0] is None else {int(r) for r in keeps[0]}
        if not keeps or keeps[1] is None:
            cols = set(range(cin))
        else:
            cols = {int(c) // layer.block for c in keeps[1]}
        kept[layer.path] = (rows, cols if rows else set())
    return kept


def judge_removal(fx: dict, ideal: dict, limited: dict, fired: set) -> tuple:
    """``(removal, limits, differences)`` comparing fxmin's kept rows/columns with the oracle's."""
    differences = []
    removes_more = keeps_more = False
    for path, (rows, cols) in fx.items():
        for axis, got, best, allowed in (("rows", rows, ideal[path][0], limited[path][0]),
                                         ("inputs", cols, ideal[path][1], limited[path][1])):
            if got == best:
                continue
            if best - got:
                removes_more = True
                differences.append(f"{path} {axis}: fxmin removes {sorted(best - got)} that the oracle keeps")
            if got - allowed:
                keeps_more = True
                differences.append(f"{path} {axis}: fxmin keeps {sorted(got - allowed)} beyond the oracle")
            elif got - best:
                differences.append(f"{path} {axis}: fxmin keeps {sorted(got - best)} (a named limit)")
    if removes_more:
        return "removes-more", (), tuple(differences)
    if keeps_more:
        return "keeps-more", (), tuple(differences)
    if differences:
        return "limits", tuple(sorted(fired)), tuple(differences)
    return "match", (), ()




def check_removed(reference64, oracle: Oracle, kept: dict, inputs: list) -> str:
    """Perturb the removed varying rows of ``kept`` in a copy of ``reference64``: the outputs must not
    move; the removed constant rows must be constant. '' when both hold, else the first failure."""
    perturbed = copy.deepcopy(reference64)
    generator = torch.Generator().manual_seed(1)
    constant_rows = {}
    with torch.no_grad():
        for layer in oracle.layers:
            rows = sorted(set(range(layer.nonzero.shape[0])) - kept[layer.path][0])
            const = oracle.facts[layer.target][0]
            varying = [r for r in rows if not const[r]]
            constant_rows[layer.path] = [r for r in rows if const[r]]
            module = perturbed.get_submodule(layer.path)
            for name in ("weight", "bias"):
                tensor = getattr(module, name, None)
                if tensor is not None and varying:
                    tensor[varying] += torch.randn(tensor[varying].shape, generator=generator, dtype=tensor.dtype)
    failure = compare(reference64, perturbed, inputs)
    if failure:
        return f"perturbing removed varying rows changes the output ({failure})"
    seen = {}
    hooks = [reference64.get_submodule(path).register_forward_hook(
        lambda module, args, out, path=path: seen.setdefault(path, []).append(out)) for path in constant_rows]
    try:
        for batch in inputs:
            _outputs(reference64, batch)
    finally:
        for hook in hooks:
            hook.remove()
    for layer in oracle.layers:
        rows = constant_rows[layer.path]
        if not rows:
            continue
        axis = 1 if layer.conv else -1  # a conv writes (N, C, ...), a Linear (..., C)
        values = torch.cat([out.movedim(axis, -1).reshape(-1, out.shape[axis]) for out in seen[layer.path]])[:, rows]
        spread = (values.max(0).values - values.min(0).values).abs().max()
        if float(spread) > 1e-9 * max(1.0, float(values.abs().max())):
            return f"{layer.path} rows {rows}: removed as constant but vary by {float(spread):.3g}"
    return ""


def run_case(description: dict, check_seed: int = 12345) -> Outcome:
    kind = description["kind"]
    model, masks = build(description)
    inputs = example_inputs(description)
    try:
        result = fxmin.minimize(model, masks, inputs)
    except fxmin.FxminError as error:
        return Outcome(kind, "loud", _error_text(error))
    except Exception as error:  # noqa: BLE001 - a crash is what the fuzzer reports
        where = traceback.extract_tb(error.__traceback__)[-1]
        return Outcome(kind, "crashed", f"{_error_text(error)} at {where.filename.split('/')[-1]}:{where.lineno}")
    reference64 = masked_copy(model, masks).double()
    fresh = fresh_inputs(description, check_seed)
    try:
        mismatch = compare(reference64, copy.deepcopy(result.module).double(), fresh)
    except Exception as error:  # noqa: BLE001 - a result that cannot run is wrong
        mismatch = f"the result fails to run: {_error_text(error)}"
    if mismatch:
        return Outcome(kind, "wrong", mismatch)
    params = {name: p.detach().numpy() for name, p in reference64.named_parameters()}
    buffers = {name: b.detach().numpy() for name, b in reference64.named_buffers()}
    oracle = Oracle(description, params, buffers)
    ideal_present, _ = oracle.kept()
    limited = Oracle(description, params, buffers, limits=True)
    limited_present, fired = limited.kept()
    fx = fxmin_kept(result, oracle)
    removal, limits, differences = judge_removal(fx, layer_kept(oracle, ideal_present),
                                                 layer_kept(limited, limited_present), fired)
    perturbation = check_removed(reference64, oracle, fx, fresh) or "ok"
    ideal = layer_kept(oracle, ideal_present)
    ideal_check = check_removed(reference64, oracle, ideal, fresh) if ideal != fx else ""
    if ideal_check:
        perturbation = f"{perturbation}; oracle: {ideal_check}"
    return Outcome(kind, "exact", removal=removal, limits=limits, differences=differences, perturbation=perturbation)


__all__ = ["Outcome", "check_removed", "compare", "fresh_inputs", "fxmin_kept", "judge_removal", "run_case"]
