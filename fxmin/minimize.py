"""``minimize``: trace -> analyze -> plan -> rewrite -> verify."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

import torch
import torch.fx
from torch import nn

from .analysis import Analysis, analyze_graph
from .errors import InputError, TraceError
from .graph_helpers import copy_module
from .masks import model_device, require_read, shared_reference, to_device
from .memory import new_baseline
from .plan import Plan, make_plan
from .progress import pass_progress
from .report import Report, build_report
from .result_shards import ResultShards
from .rewrite import rewrite
from .shards import ShardedWeights
from .trace import arrange_inputs, infer_example_inputs, propagate_shapes, trace
from .trace_export import CallingConvention, export_trace, export_without_weights, reexport
from .verify import checked_trials, verification_level
from .verify import verify as verify_equivalence
from .weights import META_KEY, attach, weights_of

FRONTENDS = ("auto", "fx", "export")


@dataclass
class MinimizeResult:
    """``module``: the smaller GraphModule; ``report``: what changed and the errors measured;
    ``plan``: what each parameter keeps and where constants were folded; ``analysis``: the facts;
    ``frontend``: the front end that made the graph (``"fx"`` or ``"export"``); ``program``: the
    smaller model as a ``torch.export.ExportedProgram`` (exported on first use); ``graph``: the traced
    model the pass read, sharing the model's tensors, the masks applied where its weights are read
    (NOTE [Weights on demand] in fxmin/weights.py; for a model on an accelerator, a masked copy there); ``reference``: the masked model as a GraphModule
    (a copy of ``graph`` with the masks applied, made on first use: it costs the model's size again).

    Through the export front end ``module`` takes the model's tensor inputs in call order (keyword
    inputs by name) and returns its outputs as a flat tuple; ``program`` is called as the model was
    (``program.module()(**inputs)``) and returns the model's output structure."""

    module: torch.fx.GraphModule
    report: Report
    plan: Plan
    analysis: Analysis
    graph: torch.fx.GraphModule
    masks: dict
    example_inputs: tuple
    frontend: str = "fx"
    convention: CallingConvention | None = None

    @property
    def reference(self) -> torch.fx.GraphModule:
        if "_reference" not in self.__dict__:
            self._reference = masked_graph(self.graph)
        return self._reference

    @property
    def program(self) -> torch.export.ExportedProgram:
        if "_program" not in self.__dict__:
            if any(t.is_meta for t in (*self.module.parameters(), *self.module.buffers())):
                raise InputError("the result's weights are in the files minimize(write_to=...) wrote, not in the "
                                 "module: load them first, fxmin.shards.load_shards(result.module, directory), then "
                                 "ask for result.program")
            if self.convention is not None:
                self._program = reexport(self.module, self.convention)
            else:
                self._program = torch.export.export(self.module, tuple(self.example_inputs))
        return self._program


class Prepared(NamedTuple):
    graph_module: torch.fx.GraphModule
    masks: dict
    example_inputs: tuple
    frontend: str
    convention: CallingConvention | None


def masked_graph(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``graph_module`` holding its weights as the pass reads them (masked), in their own dtypes."""
    source = graph_module.meta.pop(META_KEY, None)  # the copy must not carry masks keyed by the original's storage
    try:
        copied = copy_module(graph_module, load=weights_of(graph_module).load if source is None else source.load)
    finally:
        if source is not None:
            graph_module.meta[META_KEY] = source
    return copied.eval()


def prepare(model: nn.Module, masks: Mapping | None = None, example_inputs=None, *, tracer=None,
            leaf_modules: Iterable = (), concrete_args=None, frontend: str = "fx", weights=None):
    """The model traced with shapes: :class:`Prepared` ``(graph_module, masks applied, example inputs, front
    end that ran, calling convention or None)``; on the CPU, where the analysis reads parameter values
    (whatever device ``model`` is on). ``graph_module`` shares the model's parameters (a CPU copy of them
    for a model elsewhere) and reads them masked through its weight source (NOTE [Weights on demand] in
    fxmin/weights.py: ``fxmin.weights.weights_of(graph_module)``); :func:`masked_graph` copies it with
    the masks applied. ``frontend``: NOTE [Front ends]."""
    if frontend not in FRONTENDS:
        raise InputError(f"frontend must be one of {', '.join(map(repr, FRONTENDS))}, got {frontend!r}")
    fx_options = [name for name, value in (("tracer", tracer), ("leaf_modules", tuple(leaf_modules)),
                                           ("concrete_args", concrete_args)) if value]
    if frontend == "export" and fx_options:
        raise InputError(f"{', '.join(fx_options)} are options of the torch.fx front end; frontend='export' "
                         "takes none of them (use frontend='fx' or 'auto')")
    new_baseline()  # NOTE [Freed memory]
    files = open_weights(weights)
    host = model_device(model, files=files is not None).type != "cpu"
    reference, used_masks, by_storage = shared_reference(model, masks, host=host, files=files)
    graph_module, fx_error = None, None
    if frontend in ("auto", "fx"):
        try:
            graph_module = trace(reference, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args)
        except TraceError as error:
            if frontend == "fx" or fx_options or isinstance(reference, torch.fx.GraphModule):
                raise
            fx_error = error
    if graph_module is None:
        inputs = example_inputs
        if isinstance(inputs, Mapping):
            inputs = {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        elif inputs is not None:
            inputs = to_device(inputs, "cpu")
        try:
            if files is not None:  # NOTE [Exporting a model without its weights] in fxmin/trace_export.py
                graph_module, example_inputs, convention = export_without_weights(reference.eval(), inputs, files)
            else:
                graph_module, example_inputs, convention = export_trace(reference.eval(), inputs)
        except TraceError as error:
            if frontend == "auto":
                raise TraceError(f"neither front end could trace {type(model).__name__}.\n{fx_error}\n{error}") from error
            raise
        graph_module.eval()
        require_read(graph_module, reference, masks, type(model).__name__)
        attach(graph_module, by_storage, files, check_finite=True)
        propagate_shapes(graph_module, example_inputs)
        return Prepared(graph_module, used_masks, example_inputs, "export", convention)
    graph_module.eval()
    require_read(graph_module, reference, masks, type(model).__name__)
    if example_inputs is None:
        example_inputs = infer_example_inputs(graph_module)
    elif isinstance(example_inputs, Mapping):
        example_inputs = arrange_inputs(graph_module, example_inputs)
    example_inputs = to_device(example_inputs, "cpu")  # a bare tensor becomes a 1-tuple
    attach(graph_module, by_storage, files, check_finite=True)
    propagate_shapes(graph_module, example_inputs)
    return Prepared(graph_module, used_masks, example_inputs, "fx", None)


def open_weights(weights) -> Mapping | None:
    """``weights`` as a mapping from names to tensors: a checkpoint directory or ``.safetensors`` file
    (read lazily by :class:`fxmin.shards.ShardedWeights`), a mapping as it is, or None."""
    if weights is None or isinstance(weights, Mapping):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        return ShardedWeights(weights)
    raise InputError(f"weights must be a checkpoint directory, a .safetensors file or a mapping from names to "
                     f"tensors, got {type(weights).__name__}")


# NOTE [Front ends]
# ``frontend="fx"`` traces with torch.fx (the model's own modules stay call_module nodes);
# ``"export"`` goes through torch.export to the canonical ATen graph (NOTE [Canonical export graph]
# in fxmin/canonical_export.py); ``"auto"`` (the default) tries torch.fx and, when it cannot trace the
# model (a TraceError: data-dependent Python control flow, Hugging Face 5.x models), exports it.
# A model FX traces stays on FX: its graph keeps module calls, which the rules know best. FX options
# (tracer, leaf_modules, concrete_args) mean FX: with them "auto" does not fall back.


@pass_progress  # NOTE [Progress]: one bar per call, phases name themselves
def minimize(model: nn.Module, masks: Mapping | None = None, example_inputs=None, *, frontend: str = "auto",
             tracer=None, leaf_modules: Iterable = (), concrete_args=None, barriers: Iterable = (),
             verify: bool | str = True, trials: int | None = None, tolerances: dict | None = None, seed: int = 0,
             progress: bool | None = None, weights=None, write_to=None, shard_bytes: int | None = None) -> MinimizeResult:
    """Return a physically smaller GraphModule that computes ``model`` with ``masks`` applied.

    ``masks`` maps parameter names (as in ``model.named_parameters()``) to bool or 0/1 tensors of the
    same shape; ``None`` reads ``torch.nn.utils.prune`` masks, else the exact zeros in the weights.
    ``barriers`` (module paths, node names, module types or functions) keep every channel around
    those ops. ``frontend``: ``"auto"`` traces with torch.fx and exports with torch.export when FX
    cannot trace the model, ``"fx"`` or ``"export"`` choose one (``result.frontend`` says which ran).
    ``verify`` (``True`` or ``"full"``) checks the result in float64 and in the model's dtype on the
    example inputs and ``trials`` (default 2) random ones, each dtype held to its tolerance
    (``fxmin.verify.TOLERANCES``; ``tolerances`` overrides them per dtype, e.g. ``{torch.bfloat16: 0.1}``);
    ``"quick"`` checks in the model's dtype only, on the example inputs (and ``trials`` random sets),
    and checks every constant the analysis folded in the reference's run (NOTE [Verification levels]
    in fxmin/verify.py); ``False`` skips verification. The model and the masks are never modified. A
    model on an accelerator is analysed, rewritten and verified as a CPU copy (float64 there); ``module``
    and ``reference`` are returned on the model's device. ``progress``: a tqdm line naming the phase, for a pass longer than a few
    seconds (``None``: when stderr is a terminal). ``weights``: for a model built on the meta device
    (``torch.device("meta")``, ``accelerate.init_empty_weights``), where its weights are: a checkpoint
    directory of safetensors shards (the Hugging Face layout) or a mapping; each is read when the pass
    needs it (NOTE [Weights from files] in fxmin/weights.py) and the result is on the CPU. ``write_to``: a new
    (or empty) directory the result's weights are written to as safetensors shards with an index, each as it
    is made, so that the result is never all in memory (NOTE [Results written as they are made] in
    fxmin/result_shards.py); the module returned then holds its tensors on the meta device
    (``fxmin.shards.load_shards(result.module, write_to)`` fills it), and a failed or interrupted pass
    leaves the directory as it was; ``shard_bytes``: the most bytes a shard holds (default 5 GB, as
    transformers' ``save_pretrained``), which is also about what the pass holds of the result at once.

    >>> import torch, fxmin
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> mask = torch.ones(8, 4, dtype=torch.bool); mask[5:] = False
    >>> result = fxmin.minimize(net, {"0.weight": mask})
    >>> result.module.get_submodule("0").out_features  # 3 units with no input fold into the next bias
    5
    """
    level = verification_level(verify)
    if level is not None:
        trials = checked_trials(level, trials)
    if shard_bytes is not None and write_to is None:
        raise InputError("shard_bytes sets the size of the shards write_to= writes: pass write_to=directory too")
    files = ResultShards(write_to, shard_bytes) if write_to is not None else None
    try:
        graph_module, used_masks, example_inputs, frontend, convention = prepare(
            model, masks, example_inputs, tracer=tracer, leaf_modules=leaf_modules, concrete_args=concrete_args,
            frontend=frontend, weights=weights)
        analysis = analyze_graph(graph_module, barriers)
        plan = make_plan(analysis, files)
        analysis.forget_weight_reads()
        module = rewrite(plan)
        if files is not None:  # NOTE [Results written as they are made]: verified from the files written
            attach(module, {}, files.close())
        verification = None
        if level is not None:  # NOTE [Streamed runs]: no copy of either model
            verification = verify_equivalence(graph_module, module, example_inputs, level=level, plan=plan,
                                              trials=trials, seed=seed, tolerances=tolerances)
        if files is not None:
            attach(module, {}, files.publish())
    except BaseException:  # Ctrl-C included: nothing half-written is left
        if files is not None:
            files.discard()
        raise
    report = build_report(plan, graph_module, module, verification)
    report.frontend = frontend
    device = model_device(model, files=weights is not None)
    if device.type != "cpu" and files is None:
        module, graph_module = module.to(device), masked_graph(graph_module).to(device)  # masks keyed by host storage
        example_inputs = to_device(example_inputs, device)
    return MinimizeResult(module, report, plan, analysis, graph_module, used_masks, example_inputs, frontend, convention)
