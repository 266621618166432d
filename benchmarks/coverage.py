"""Coverage: which models nobody here wrote does fxmin minimize exactly, per front end (issue #19, item 6).

For every model of the catalogues (benchmarks/coverage_catalogues.py: fxmin's zoo, torchvision's
classification models, timm families, the Hugging Face families of benchmarks/hf_families.py when it
imports), plant dead structure (``plant``), run each front end of ``FRONTENDS`` and check what it
returns in float64 by code of its own (``check``: the masks applied by hand to a float64 copy of the
model, fresh random inputs). One row per model and front end, with one outcome of ``OUTCOMES``.
Each case runs in a worker process with a time limit (``Worker``), so one hang or crash does not
stop the sweep. Rows go to a JSON-lines file as they come; ``coverage_report.py`` renders them.

    nice python -m benchmarks.coverage --write docs/coverage.md            # every catalogue that imports
    python -m benchmarks.coverage --catalogues zoo --models resnet18 vit   # a few cases, printed
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

import fxmin
from benchmarks.coverage_catalogues import CATALOGUES, Unavailable, known_size
from fxmin.minimize import prepare
from fxmin.trace_export import canonical_graph

OUTCOMES = ("exact-shrunk", "exact-same", "refused", "crashed", "wrong", "not-exportable", "timeout", "killed",
            "no-model", "skipped")
#: the float64 check: max |minimized - masked reference| <= TOLERANCE * max(1, max |reference|). The
#: minimized module stores folded constants in float32, so it is checked against rounding at float32's
#: scale, far below what a wrong channel gives.
TOLERANCE = 1e-5
SEED = 0
RESULTS = Path("runs/coverage/results.jsonl")


class NotExportable(Exception):
    """``torch.export.export`` itself failed on the model: not fxmin's doing."""


# -- what a row names -------------------------------------------------------------------------------------
def op_label(node, root) -> str:
    """What a node calls, as the refusal tables name it: a module type, ``Tensor.method``, ``aten.op``, a function."""
    if node.op == "call_module":
        kind = type(root.get_submodule(node.target))
        return f"{kind.__module__}.{kind.__qualname__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if isinstance(node.target, torch._ops.OpOverload):
        return str(node.target).removesuffix(".default")
    module = getattr(node.target, "__module__", None)
    name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", repr(node.target))
    return f"{module}.{name}" if module else name


def missing_ops(graph_module) -> list[str]:
    """Every op of the graph that fxmin's registry has no rule for (fxmin's error names only the first)."""
    calls = [n for n in graph_module.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    return sorted({op_label(n, graph_module) for n in calls if fxmin.REGISTRY.lookup(n, graph_module) is None})


# -- front ends: name -> function(model, masks, inputs) returning (minimized module, front end that ran) -----
# NOTE [Coverage front ends]
# "auto" is what a user gets from ``fxmin.minimize(model, masks, example_inputs)``: torch.fx, and torch.export
# where FX cannot trace the model (the path issue #19's 97 % is measured on); "fx" and "export" force one.
# A refused row lists every op without a rule of the graph that front end made, not only the first.
def _minimize(frontend: str):
    def run(model, masks, inputs):
        try:
            result = fxmin.minimize(model, masks, example_inputs=inputs, frontend=frontend)
        except fxmin.MissingRuleError as error:
            error.missing_ops = missing_ops(prepare(model, masks, inputs, frontend=frontend).graph_module)
            raise
        except fxmin.TraceError as error:
            if "torch.export could not export" in str(error):  # FX could not trace it either, under "auto"
                raise NotExportable(_first_line(error)) from error
            raise
        if result.frontend == "export":  # called as the model was (docs/export.md: "Inputs and outputs")
            return result.program.module(), "export"
        return result.module, result.frontend
    return run


def _export(model, masks, inputs):
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {})
    try:
        program = torch.export.export(model, args, kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of torch.export is reported as such
        raise NotExportable(f"{type(error).__name__}: {_first_line(error)}") from error
    try:
        smaller, _ = fxmin.minimize_exported(program, masks, (args, kwargs))
    except fxmin.MissingRuleError as error:
        error.missing_ops = missing_ops(canonical_graph(program))
        raise
    return smaller.module(), "export"


FRONTENDS = {"auto": _minimize("auto"), "fx": _minimize("fx"), "export": _export}
#: what a sweep runs unless told: the default path and torch.export (``"fx"`` differs from ``"auto"`` only on
#: models FX cannot trace, where it refuses)
DEFAULT_FRONTENDS = ("auto", "export")


# -- the planted structure ---------------------------------------------------------------------------------
def plant(model: nn.Module, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Masks with planted dead structure, and trained-like 1-D state, for ``model`` (changed in place).

    Every parameter of >= 2 dims gets a random mask keeping half its entries; the weights of Linear
    and conv layers (and Hugging Face's Conv1D) also lose about one output row in eight and one input column in eight, whole. Every
    1-D parameter moves by 0.1 N(0, 1) and BatchNorm statistics are perturbed, so that dead channels fold
    nonzero constants. Seeded: the same model and seed give the same masks.
    """
    generator = torch.Generator().manual_seed(seed)
    weighted = {f"{path}.weight" if path else "weight" for path, module in model.named_modules()
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
                or type(module).__name__ == "Conv1D"}  # Hugging Face GPT-2's transposed Linear
    masks = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and parameter.is_floating_point():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
            if parameter.dim() < 2:
                continue
            mask = torch.rand(parameter.shape, generator=generator) < 0.5
            if name in weighted:
                for axis in (0, 1):
                    size = parameter.shape[axis]
                    dead = torch.randperm(size, generator=generator)[:size // 8]
                    mask.index_fill_(axis, dead, False)
            masks[name] = mask
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.add_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.mul_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return masks


# -- the float64 check, sharing nothing with fxmin.verify --------------------------------------------------
def _to_float64(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).double()
    for sub in module.modules():  # constants kept as plain tensor attributes (GraphModule get_attr targets)
        for key, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(sub, key, value.double())
    return module.eval()


def masked_float64(model: nn.Module, masks: Mapping) -> nn.Module:
    """A float64 copy of ``model`` with every mask multiplied into its parameter."""
    reference = _to_float64(model)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name in masks:
                parameter.mul_(masks[name].to(torch.float64))
    return reference


def fresh_inputs(inputs, seed: int = SEED + 1):
    """Inputs shaped like ``inputs``, drawn anew: float64 normals; integer ids below the example's largest."""
    generator = torch.Generator().manual_seed(seed)

    def draw(value):
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return torch.randn(value.shape, generator=generator, dtype=torch.float64)
        if value.dtype in (torch.int32, torch.int64):
            return torch.randint(0, int(value.max()) + 1, value.shape, generator=generator, dtype=value.dtype)
        return value.clone()
    if isinstance(inputs, Mapping):
        return {key: draw(value) for key, value in inputs.items()}
    return tuple(draw(value) for value in inputs)


def _call(module, inputs):
    with torch.no_grad():
        return module(**inputs) if isinstance(inputs, Mapping) else module(*inputs)


def _leaves(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [leaf for key in sorted(output) for leaf in _leaves(output[key])]
    if isinstance(output, (tuple, list)):
        return [leaf for item in output for leaf in _leaves(item)]
    return []


def check(reference64: nn.Module, minimized: nn.Module, inputs) -> tuple[float, float]:
    """``(max error, allowed)`` of ``minimized`` (run in float64) against the float64 reference."""
    expected, actual = _leaves(_call(reference64, inputs)), _leaves(_call(_to_float64(minimized), inputs))
    if len(expected) != len(actual) or any(e.shape != a.shape for e, a in zip(expected, actual)):
        return float("inf"), 0.0
    scale = max([1.0] + [e.abs().max().item() for e in expected if e.numel() and e.is_floating_point()])
    error = max([0.0] + [(e.double() - a.double()).abs().max().item() for e, a in zip(expected, actual) if e.numel()])
    return error, TOLERANCE * scale


# -- one case ----------------------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def refusal(error: fxmin.FxminError) -> dict:
    """``op`` (what fxmin refused: the target, or the module type, of the node it named) and ``way_out``."""
    text = str(error)
    first = _first_line(error)
    if isinstance(error, fxmin.MissingRuleError):
        node = re.search(r"node '[^']*' \((\w+) ([^)]*)\)", first)
        module_type = re.search(r"of type ([\w.]+)", first)
        attribute = re.search(r"\(attribute '(\w+)'\)", first)
        op = (module_type.group(1) if module_type else node.group(2)) if node else first[:120]
        if node and node.group(1) == "call_method":
            op = f"Tensor.{op}"
        op = re.sub(r"^torch\._ops\.\w+\.(\w+)::", r"\1.", op)  # an ATen overload: aten.permute
        if attribute:
            op += f" .{attribute.group(1)}"
        way_out = re.search(r"barriers=\[[^\]]*\]", text)
        return {"op": op, "node": error.node_name, "way_out": way_out.group(0) if way_out else "",
                "detail": first, "missing": getattr(error, "missing_ops", None)}
    return {"op": f"{type(error).__name__}: {first[:100]}", "node": getattr(error, "node", None),
            "way_out": "", "detail": first}


def _fxmin_frame(error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f"{os.sep}fxmin{os.sep}" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""


def _minimize_and_check(frontend, model, masks, inputs, reference64, row) -> dict:
    start = time.perf_counter()
    try:
        minimized, ran = FRONTENDS[frontend](model, masks, inputs)
    except NotExportable as error:
        return {**row, "outcome": "not-exportable", "detail": str(error)}
    except fxmin.FxminError as error:
        return {**row, "outcome": "refused", "seconds": time.perf_counter() - start, **refusal(error)}
    except Exception as error:  # noqa: BLE001 - what fxmin should have turned into an fxmin error
        return {**row, "outcome": "crashed", "seconds": time.perf_counter() - start,
                "detail": f"{type(error).__name__}: {_first_line(error)}", "where": _fxmin_frame(error)}
    row = {**row, "seconds": time.perf_counter() - start, "params_after": _count(minimized), "ran": ran}
    try:
        error, allowed = check(reference64, minimized, fresh_inputs(inputs))
    except Exception as failure:  # noqa: BLE001 - the returned module does not run in float64
        return {**row, "outcome": "wrong", "detail": f"float64 run failed: {type(failure).__name__}: {_first_line(failure)}"}
    row.update(max_error=error, allowed=allowed)
    if not error <= allowed:
        return {**row, "outcome": "wrong", "detail": f"max error {error:.3g} > {allowed:.3g}"}
    return {**row, "outcome": "exact-shrunk" if row["params_after"] < row["params_before"] else "exact-same"}


def run_model(catalogue: str, name: str, frontends=DEFAULT_FRONTENDS, max_params: float = float("inf")):
    """Build and plant one model once, then minimize it with each front end and check the result: yields
    one row per front end. A model of more than ``max_params`` parameters is skipped (before it is built
    when the catalogue knows its size).

    >>> [row["outcome"] for row in run_model("zoo", "densenet_block", ["auto"])]
    ['exact-shrunk']
    """
    rows = [{"catalogue": catalogue, "model": name, "frontend": frontend} for frontend in frontends]
    if (known_size(catalogue, name) or 0) > max_params:
        yield from ({**row, "outcome": "skipped", "detail": f"more than {max_params:,.0f} parameters"} for row in rows)
        return
    torch.manual_seed(SEED)
    try:
        model, inputs = CATALOGUES[catalogue]()[name]()
    except Exception as error:  # noqa: BLE001 - the catalogue could not build this model here
        yield from ({**row, "outcome": "no-model", "detail": f"{type(error).__name__}: {_first_line(error)}"} for row in rows)
        return
    model.eval()
    count = _count(model)
    if count > max_params:
        yield from ({**row, "outcome": "skipped", "params_before": count,
                     "detail": f"more than {max_params:,.0f} parameters"} for row in rows)
        return
    masks = plant(model)
    shapes = inputs.items() if isinstance(inputs, Mapping) else enumerate(inputs)
    described = " ".join(f"{key}={tuple(value.shape)}" if isinstance(inputs, Mapping) else str(tuple(value.shape))
                         for key, value in shapes if isinstance(value, torch.Tensor))
    reference64 = masked_float64(model, masks)
    for row in rows:
        yield _minimize_and_check(row["frontend"], model, masks, inputs, reference64,
                                  {**row, "params_before": count, "input": described})


# -- the sweep ---------------------------------------------------------------------------------------------
def _serve(connection, threads: int) -> None:
    import warnings

    warnings.simplefilter("ignore")  # the models' own deprecation warnings would drown the progress lines
    torch.set_num_threads(threads)
    while True:
        task = connection.recv()
        if task is None:
            return
        for row in run_model(*task):
            connection.send(row)


class Worker:
    """One process that runs models one at a time, sending a row per front end; a front end past its time
    limit (or a dead process) ends the model's remaining rows as timeout (killed, crashed), and a new process
    starts for the next model."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self.process = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, self.threads), daemon=True)
        self.process.start()

    def run(self, catalogue: str, name: str, frontends, max_params: float, timeout: float):
        """Yields the rows of one model (see ``run_model``)."""
        if self.process is None or not self.process.is_alive():
            self._start()
        self.connection.send((catalogue, name, tuple(frontends), max_params))
        for index in range(len(frontends)):
            try:
                if self.connection.poll(timeout):
                    yield self.connection.recv()
                    continue
                failure = {"outcome": "timeout", "detail": f"no result within {timeout:.0f} s"}
            except EOFError:
                self.process.join()
                code = self.process.exitcode
                failure = ({"outcome": "killed", "detail": "the worker process was killed (SIGKILL: the kernel's "
                                                           "out-of-memory killer, or by hand)"} if code == -9 else
                           {"outcome": "crashed", "detail": f"the worker process died (exit code {code})"})
            self.stop()
            yield from ({"catalogue": catalogue, "model": name, "frontend": rest, **failure} for rest in frontends[index:])
            return

    def stop(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join()
            self.process = None


def models(catalogues, names=None):
    """``(models, notes)``: the (catalogue, model) pairs, and a line per catalogue left out.

    >>> models(["zoo"], ["vit", "gpt"])[0]
    [('zoo', 'vit'), ('zoo', 'gpt')]
    """
    pairs, notes = [], {}
    for catalogue in catalogues:
        try:
            pairs += [(catalogue, name) for name in CATALOGUES[catalogue]() if not names or name in names]
        except Unavailable as error:
            notes[catalogue] = str(error)
    return pairs, notes


def _interleaved(pairs: list) -> list:
    """The catalogues taken in turn, so that a sweep cut short has covered each of them alike."""
    by_catalogue = {}
    for pair in pairs:
        by_catalogue.setdefault(pair[0], []).append(pair)
    rounds = itertools.zip_longest(*by_catalogue.values())
    return [pair for group in rounds for pair in group if pair is not None]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogues", nargs="+", default=list(CATALOGUES), choices=list(CATALOGUES))
    parser.add_argument("--frontends", nargs="+", default=list(DEFAULT_FRONTENDS), choices=list(FRONTENDS))
    parser.add_argument("--models", nargs="+", help="only these model names")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model and front end")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    parser.add_argument("--max-params", type=float, default=float("inf"), help="skip models larger than this")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th model from the i-th (parallel sweeps)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines, one row per case")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --results, run the rest")
    parser.add_argument("--write", type=Path, help="render the results into this markdown file")
    args = parser.parse_args(argv)
    pairs, notes = models(args.catalogues, args.models)
    shard, shards = map(int, args.shard.split("/"))
    pairs = _interleaved(pairs[shard::shards])
    done = set()
    if args.resume and args.results.exists():
        for line in args.results.read_text().splitlines():
            row = json.loads(line)
            if "note" not in row and row["outcome"] != "skipped":
                done.add((row["catalogue"], row["model"], row["frontend"]))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    worker = Worker(args.threads)
    with args.results.open("a" if args.resume else "w") as out:
        if not args.resume:
            for catalogue, note in notes.items():  # the catalogues left out, stated on the page
                out.write(json.dumps({"catalogue": catalogue, "note": note}) + "\n")
        for index, (catalogue, name) in enumerate(pairs):
            frontends = [f for f in args.frontends if (catalogue, name, f) not in done]
            if not frontends:
                continue
            started = time.perf_counter()
            for row in worker.run(catalogue, name, frontends, args.max_params, args.timeout):
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"[{index + 1}/{len(pairs)}] {catalogue} {name} {row['frontend']}: {row['outcome']} "
                      f"{row.get('op') or row.get('detail') or ''} ({time.perf_counter() - started:.0f} s)", flush=True)
    worker.stop()
    if args.write:
        from benchmarks.coverage_report import write
        command = "python -m benchmarks.coverage " + " ".join(argv if argv is not None else sys.argv[1:])
        write([args.results], args.write, command)


if __name__ == "__main__":
    main()
