"""Reference vs result, in float64 and in the model's dtype; the first divergent node."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from .errors import EquivalenceError, InputError, describe_node
from .fact_check import ConstantCheck, observer
from .graph_helpers import copy_module
from .progress import phase
from .streamed import StreamedRun
from .weights import weights_of

# NOTE [Tolerances]
# A comparison passes when max |reference - result| <= tolerance x max(1, max |reference|) over
# every output, the tolerance being the one of the dtype both run in (docs/concepts.md,
# "Precision and tolerances"). In float64 the result is the float64 build of the plan (folded
# constants not rounded): what is left is summation order, so the tolerance is tight, and a
# wrongly removed channel shows up as an error of the size of the activations. In the model's
# dtype both models round as that dtype does, in different orders, and the result's folded
# constants were rounded once to it (NOTE [Fold precision] in fxmin/plan.py): the
# tolerance is hundreds of float32 epsilons, tens of float16's, a few of bfloat16's.
# A dtype without a tolerance here is refused: pass ``tolerances={dtype: ...}``.

# NOTE [Verification levels]
# ``"full"`` (the default) runs both models end to end in float64 (the result's float64 build) and
# in the model's dtype, on the example inputs and ``trials`` random ones: the check that makes
# "exact" mean a float64 error of summation order. Float64 runs cost several forwards each on a CPU
# (float64 convolutions have no fast kernels), so on a large model verification takes many times
# the pass. ``"quick"`` runs the model's dtype only, on the example inputs (and ``trials`` random
# sets if asked), and checks during the reference's run that every constant the analysis relied on
# holds (NOTE [Constants checked in a run] in fxmin/fact_check.py): a wrongly removed channel whose
# effect on the outputs is under the model dtype's tolerance goes unseen, which the report says.

#: what ``verify(level=...)`` accepts: NOTE [Verification levels]
LEVELS = ("full", "quick")

#: max |reference - result| allowed, relative to max(1, max |reference|), per dtype.
TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def tolerance_for(dtype: torch.dtype, tolerances: dict | None = None) -> float:
    """The relative tolerance of a comparison in ``dtype``: ``tolerances`` (overrides) or :data:`TOLERANCES`.

    >>> tolerance_for(torch.bfloat16), tolerance_for(torch.float32, {torch.float32: 1e-5})
    (0.05, 1e-05)
    """
    table = {**TOLERANCES, **(tolerances or {})}
    if dtype not in table:
        known = ", ".join(str(d).replace("torch.", "") for d in table)
        raise InputError(f"fxmin has no verification tolerance for {dtype} (it has one for {known}): pass "
                         f"tolerances={{{dtype}: ...}} (max error relative to max(1, max |reference|)) or verify=False")
    return table[dtype]


def verification_level(verify) -> str | None:
    """``minimize``'s ``verify`` as one of :data:`LEVELS` (``True``: ``"full"``), or None for ``False``."""
    if isinstance(verify, bool):
        return "full" if verify else None
    return _checked_level(verify)


def _checked_level(level) -> str:
    if not isinstance(level, str) or level not in LEVELS:
        raise InputError(f"verify must be True, False or a level ({', '.join(map(repr, LEVELS))}), got {level!r}")
    return level


def checked_trials(level: str, trials: int | None) -> int:
    """The number of random input sets a verification at ``level`` runs: ``trials``, or the level's
    default (2 for ``"full"``, 0 for ``"quick"``); an :class:`InputError` for a level or count that is not one."""
    _checked_level(level)
    if trials is None:
        return 2 if level == "full" else 0
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise InputError(f"trials must be a whole number of random input sets (0 or more), got {trials!r}")
    return trials


def _checked_tolerances(tolerances) -> dict:
    if tolerances is None:
        return {}
    if not isinstance(tolerances, Mapping) or not all(
            isinstance(k, torch.dtype) and k.is_floating_point and isinstance(v, (int, float)) and v > 0
            for k, v in tolerances.items()):
        raise InputError(f"tolerances must map floating torch dtypes to positive numbers (e.g. "
                         f"{{torch.float32: 1e-5}}), got {tolerances!r}")
    return {k: float(v) for k, v in tolerances.items()}


@dataclass(frozen=True)
class Comparison:
    dtype: torch.dtype
    inputs: str  # 'example' or 'random #k'
    max_error: float
    scale: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance * self.scale


@dataclass
class VerifyReport:
    """Every comparison run; ``max_error(dtype)`` is the largest absolute error seen in that dtype,
    ``tolerance(dtype)`` the relative tolerance it was held to (NOTE [Tolerances]).
    ``exact_float64``: the float64 comparisons ran the float64 build of the result (folded
    constants not rounded), not the result cast to float64."""

    comparisons: list = field(default_factory=list)
    exact_float64: bool = False
    streamed: bool = False  # NOTE [Streamed runs]: each layer's weights cast at its call, no model copied
    level: str = "full"  # NOTE [Verification levels]
    constants: ConstantCheck | None = None  # quick: the analysis's constants checked in the reference's run

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons) and (self.constants is None or self.constants.ok)

    def max_error(self, dtype: torch.dtype) -> float:
        errors = [c.max_error for c in self.comparisons if c.dtype == dtype]
        return max(errors) if errors else float("nan")

    def tolerance(self, dtype: torch.dtype) -> float:
        """The relative tolerance the comparisons in ``dtype`` were held to (nan if none ran)."""
        return next((c.tolerance for c in self.comparisons if c.dtype == dtype), float("nan"))

    @property
    def dtypes(self) -> list:
        """The dtypes compared in, float64 first."""
        return sorted({c.dtype for c in self.comparisons}, key=lambda d: (d != torch.float64, str(d)))

    def failures(self) -> list:
        return [c for c in self.comparisons if not c.ok]

    def lines(self) -> list:
        """What was checked, in which dtype, with which tolerance and what error: the summary
        ``Report.table()`` ends with."""
        labels = list(dict.fromkeys(c.inputs for c in self.comparisons))
        random = sum(1 for label in labels if label.startswith("random"))
        sets = ", ".join(filter(None, ["the example inputs" if "example" in labels else "",
                                       f"{random} random" if random else ""]))
        count = f"{len(labels)} input set" + ("s" if len(labels) != 1 else "")
        how = "verified" if self.level == "full" else f"verified (verify={self.level!r})"
        lines = [f"{how} against the masked model on {count} ({sets}): "
                 "max |error| <= tolerance x max(1, max |reference|)"]
        for dtype in self.dtypes:
            name = str(dtype).replace("torch.", "")
            if dtype == torch.float64:
                what = ("the result built in float64 (folded constants not rounded)" if self.exact_float64
                        else "the result cast to float64")
                if self.streamed:
                    what += ", end to end, one layer's weights in float64 at a time"
            else:
                what = f"the result as returned (folded constants rounded once to {name})"
            status = "ok" if all(c.ok for c in self.comparisons if c.dtype == dtype) else "FAILED"
            lines.append(f"  {name:<9} max abs error {self.max_error(dtype):.2e}  tolerance {self.tolerance(dtype):.0e}  "
                         f"{status}: {what}")
        if self.constants is not None:
            check = self.constants
            status = "ok" if check.ok else "FAILED"
            lines.append(f"  constants {check.channels} channels at {check.nodes} nodes, max error "
                         f"{check.max_relative_error:.2e} x scale  tolerance {check.tolerance:.0e}  {status}: "
                         "each held the value the analysis took it for, in the reference's run")
        if self.level == "quick" and torch.float64 not in self.dtypes:
            lines.append("  not compared in float64: an error under the tolerance above goes unseen")
        return lines


def random_like(inputs: tuple, generator: torch.Generator) -> tuple:
    """Random inputs of the same shapes (and similar scale) as ``inputs``; integer inputs keep their range."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            scale = x.double().std().item() if x.numel() > 1 else 1.0
            scale = scale if scale > 0 else 1.0
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64) * scale + x.double().mean().item()
            out.append(noise.to(x.dtype).to(x.device))
        elif isinstance(x, torch.Tensor) and x.dtype != torch.bool and x.numel():
            low, high = int(x.min()), int(x.max())
            out.append(torch.randint(low, high + 1, x.shape, generator=generator, dtype=x.dtype).to(x.device))
        else:
            out.append(x)
    return tuple(out)


def _cast_inputs(inputs: tuple, dtype: torch.dtype) -> tuple:
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _compare(reference_out, result_out) -> tuple[float, float]:
    ref_leaves, _ = tree_flatten(reference_out)
    res_leaves, _ = tree_flatten(result_out)
    if len(ref_leaves) != len(res_leaves):
        return float("inf"), 1.0
    error, scale = 0.0, 1.0
    for a, b in zip(ref_leaves, res_leaves):
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape != b.shape:
                return float("inf"), 1.0
            if a.numel():
                diff = (a.double() - b.double()).abs()
                error = max(error, float(diff.max()) if not torch.isnan(diff).any() else float("inf"))
                scale = max(scale, float(a.double().abs().max()))
        elif a != b:
            return float("inf"), 1.0
    return error, scale


@contextlib.contextmanager
def full_precision():
    """float32 matrix products and convolutions in IEEE float32, not TF32, inside the block.

    On Ampere and later GPUs cuDNN convolutions default to TF32 (and matmuls do after
    ``torch.set_float32_matmul_precision('high')``): about 1e-3 relative error, ten times the
    float32 tolerance of the comparison, and more than :func:`fxmin.release` allows its noise. Two
    runs of one model would then disagree, so comparisons and calibrations run in full precision;
    the user's settings are restored on exit (no effect on CPU)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the per-backend API
        saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
        matmul.fp32_precision = cudnn.conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved
        return
    saved = (matmul.allow_tf32, cudnn.allow_tf32)  # pragma: no cover - older torch
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Run float64 comparisons with float64 as the default dtype: tensors a model creates at run
    time (``torch.full((T, T), torch.finfo(x.dtype).min)`` in HF's causal masks) follow the
    inputs' precision instead of overflowing in float32."""
    if dtype != torch.float64:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def compare(reference, result, inputs: tuple, dtype: torch.dtype, label: str, tolerance: float | None = None) -> Comparison:
    """Run both modules on ``inputs`` cast to ``dtype`` and compare their outputs."""
    cast = _cast_inputs(inputs, dtype)
    with torch.no_grad(), default_dtype(dtype), full_precision():
        error, scale = _compare(reference(*cast), result(*cast))
    return Comparison(dtype, label, error, scale, tolerance_for(dtype) if tolerance is None else tolerance)


def first_divergent_node(reference, result, plan, inputs: tuple, tolerance: float) -> str | None:
    """The first node (in the reference's order) whose kept channels differ between the two modules
    (GraphModules or :class:`StreamedRun` s of them)."""
    values = ({}, {})
    for module, seen in zip((reference, result), values):
        if not isinstance(module, StreamedRun):
            module = StreamedRun(module)
        record = lambda node, value, seen=seen: seen.__setitem__(node.name, value)  # noqa: E731
        run = StreamedRun(module.module, module.load, module.dtype, observe=record)
        with torch.no_grad(), default_dtype(torch.float64), full_precision():
            run(*inputs)
    reference = reference.module if isinstance(reference, StreamedRun) else reference
    for node in reference.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        a, b = values[0].get(node.name), values[1].get(node.name)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or not a.is_floating_point():
            continue
        kept = plan.kept.get(node.name)
        if kept is not None and a.dim() > plan.axes[node.name]:
            a = a.index_select(plan.axes[node.name], torch.as_tensor(kept, dtype=torch.long, device=a.device))
        if a.shape != b.shape:
            return node.name
        if a.numel() and float((a.double() - b.double()).abs().max()) > tolerance * max(1.0, float(a.double().abs().max())):
            return node.name
    return None


@phase("verify")
def verify(reference: torch.nn.Module, result: torch.nn.Module, example_inputs: tuple, *, level: str = "full",
           exact_result: torch.nn.Module | None = None, plan=None, trials: int | None = None, seed: int = 0,
           tolerances: dict | None = None, raise_on_failure: bool = True) -> VerifyReport:
    """Check that ``result`` computes what ``reference`` computes.

    ``level="full"`` (NOTE [Verification levels]): both run on the example inputs and on ``trials``
    (default 2) random inputs of the same shapes, in float64 and in the model's dtype, each held to its
    dtype's tolerance (:data:`TOLERANCES`, which ``tolerances`` overrides per dtype; NOTE [Tolerances]).
    In float64 the result runs as ``exact_result`` if given, else as its float64 build when ``plan`` is
    given (its folded constants not rounded), else cast. ``level="quick"``: the model's dtype only, on
    the example inputs and ``trials`` (default 0) random sets, and, given the ``plan`` whose graph
    ``reference`` is, every constant channel of its analysis checked in the reference's run.
    GraphModules run streamed (NOTE [Streamed runs]): the reference with the masks its weight source
    applies, no copy of either model. Raises :class:`EquivalenceError` naming the first divergent node
    (when ``plan`` is given).

    >>> import torch
    >>> m = torch.nn.Linear(3, 2)
    >>> verify(m, m, (torch.randn(4, 3),)).ok
    True
    """
    trials = checked_trials(level, trials)
    tolerances = {**TOLERANCES, **_checked_tolerances(tolerances)}
    generator = torch.Generator().manual_seed(seed)
    input_sets = [("example", tuple(example_inputs))]
    input_sets += [(f"random #{k + 1}", random_like(tuple(example_inputs), generator)) for k in range(trials)]
    model_dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    model_tolerance = tolerance_for(model_dtype, tolerances)
    full = level == "full"
    exact = full and (exact_result is not None or (plan is not None and isinstance(result, torch.fx.GraphModule)))
    report = VerifyReport(exact_float64=exact, streamed=isinstance(reference, torch.fx.GraphModule), level=level)
    if not full and plan is not None and plan.graph_module is reference:
        report.constants = ConstantCheck(model_tolerance)
        reference_run = StreamedRun(reference, observe=observer(plan.analysis.facts, report.constants))
    else:
        reference_run = _streamed(reference, None)
    if full:
        reference64, result64 = _streamed(reference, torch.float64), _result64(result, plan, exact_result)
    written = isinstance(result, torch.fx.GraphModule) and any(t.is_meta for t in (*result.parameters(), *result.buffers()))
    result_run = StreamedRun(result) if written else result  # NOTE [Results written as they are made]
    for label, inputs in input_sets:
        if full:
            report.comparisons.append(compare(reference64, result64, inputs, torch.float64, label, tolerances[torch.float64]))
        if model_dtype != torch.float64 or not full:
            report.comparisons.append(compare(reference_run, result_run, inputs, model_dtype, label, model_tolerance))
    if not report.ok and raise_on_failure:
        _raise_equivalence_error(report, reference, _result64(result, plan, exact_result), plan, dict(input_sets),
                                 tolerances[torch.float64])
    return report


def _result64(result: torch.nn.Module, plan, exact_result: torch.nn.Module | None):
    """What the float64 comparison runs as the result: ``exact_result``, else the result's float64 build
    (streamed, the plan's exact constants), else the result cast to float64."""
    if exact_result is not None:
        return exact_result
    if plan is not None and isinstance(result, torch.fx.GraphModule):
        return StreamedRun(result, _exact_load(result, plan), torch.float64)
    return _streamed(result, torch.float64)


def _raise_equivalence_error(report: VerifyReport, reference, result64, plan, input_sets: dict, tolerance: float):
    """An :class:`EquivalenceError` naming the node where a constant failed, else the first divergent node
    (found in float64 runs of ``reference`` and ``result64``, when ``plan`` is given)."""
    if report.constants is not None and report.constants.failures:
        node, problem = report.constants.failures[0]
        raise EquivalenceError(
            f"a constant the analysis relied on does not hold in a run of the reference at "
            f"{describe_node(node, reference)}: {problem}. This is a bug in fxmin or in a custom rule: please report "
            f"it with the model; minimize(..., barriers=['{node.name}']) works around it.", node=node.name, report=report)
    failure = report.failures()[0]
    node = None
    graphs = [r.module if isinstance(r, StreamedRun) else r for r in (reference, result64)]
    if plan is not None and all(isinstance(g, torch.fx.GraphModule) for g in graphs):
        node = first_divergent_node(_streamed(reference, torch.float64), result64, plan,
                                    _cast_inputs(input_sets[failure.inputs], torch.float64), tolerance * 10)
    where = f"; first divergent node: '{node}'" if node else ""
    raise EquivalenceError(
        f"the minimized module does not compute the reference function: max error {failure.max_error:.3g} "
        f"in {failure.dtype} on {failure.inputs} inputs (tolerance {failure.tolerance:.1g} x scale "
        f"{failure.scale:.3g}){where}. This is a bug in fxmin or in a custom rule: please report it with the "
        "model; minimize(..., barriers=[node]) works around it.", node=node, report=report)


def _streamed(module: torch.nn.Module, dtype: torch.dtype | None):
    """``module`` run with its weights streamed in ``dtype`` (a GraphModule), else as it is (``dtype``
    None) or as a copy cast to ``dtype``."""
    if isinstance(module, torch.fx.GraphModule):
        return StreamedRun(module, dtype=dtype)
    return module if dtype is None else copy_module(module, dtype).eval()


def _exact_load(result: torch.fx.GraphModule, plan):
    """``load`` of the result's float64 build: its own tensors, the plan's float64 value where it holds a
    folded constant rounded (NOTE [Fold precision] in fxmin/plan.py)."""
    exact, own = plan.exact_values(), weights_of(result)
    return lambda name: exact[name] if name in exact else own.load(name)
