"""What a rule sees of the graph while it runs for one node (part of the rule API, re-exported by
:mod:`fxmin.rules.api`): :class:`Context` in ``forward``/``backward``, :class:`PlanContext` in ``plan``.

They talk to the engine only through :class:`EngineView` and :class:`PlanRecords` (the methods and
tables :mod:`fxmin.analysis` and :mod:`fxmin.plan` provide); rules never touch the engine itself.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.fx

from ..edits import ArgEdit, AttrEdit, ConstantOperand, ModuleEdit, ParamEdit, rounded, store_rounded
from ..errors import describe_node
from ..facts import TupleFact, ValueFact
from ..graph_helpers import copy_module, free_name, tensor_shape
from ..weights import WeightSource


class EngineView(Protocol):
    """What the fixed point offers the contexts (implemented by ``fxmin.analysis.Engine``)."""

    root: torch.fx.GraphModule
    memo: dict
    weights: WeightSource

    def fact(self, node): ...
    def units_of(self, node): ...
    def rule_of(self, node): ...
    def order(self, node) -> int: ...
    def module_tensor(self, target: str, name: str, dtype=torch.float64): ...
    def attr_tensor(self, target: str, dtype=torch.float64): ...
    def fresh(self, size: int) -> np.ndarray: ...
    def unify(self, first, second) -> None: ...
    def adopt(self, node, axis: int): ...
    def watch(self, node, units) -> None: ...
    def copies(self, units, sources) -> None: ...
    def source_present(self, units) -> np.ndarray: ...
    def present(self, node) -> np.ndarray: ...
    def present_of(self, units) -> np.ndarray: ...
    def require(self, node, mask, why) -> None: ...
    def require_units(self, units, why) -> None: ...
    def choose(self, node, mask, why) -> None: ...
    def choose_units(self, units, why) -> None: ...


class PlanRecords(Protocol):
    """The tables a plan collects edits in (implemented by ``fxmin.plan.Plan``), keyed by target or node name."""

    modules: dict
    attrs: dict
    args: dict
    inputs: dict
    notes: dict
    operands: dict


class Context:
    """What a rule sees of the graph while it runs for one node."""

    def __init__(self, engine: EngineView, node: torch.fx.Node, rule):
        self._engine = engine
        self.node = node
        self.rule = rule
        self.root = engine.root
        self.module = self.root.get_submodule(node.target) if node.op == "call_module" else None

    # -- reading the node --------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name`` of the node."""
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def input_nodes(self) -> list[torch.fx.Node]:
        return list(self.node.all_input_nodes)

    def fact(self, value) -> ValueFact | None:
        """The value facts of an argument, or None for a non-tensor (int, shape, ...)."""
        return self._engine.fact(value) if isinstance(value, torch.fx.Node) else None

    def shape(self, value=None) -> tuple[int, ...] | None:
        return tensor_shape(self.node if value is None else value)

    def describe(self) -> str:
        return describe_node(self.node, self.root)

    def param(self, name: str) -> torch.Tensor | None:
        """The module's (masked) parameter or buffer ``name`` as a float64 tensor, or None; a dotted
        name reaches a submodule's (``"out_proj.weight"``)."""
        path, _, leaf = name.rpartition(".")
        target = ".".join(p for p in (self.node.target, path) if p)
        return self._engine.module_tensor(target, leaf)

    def attr_value(self, node) -> torch.Tensor | None:
        """The float64 (masked) value of a ``get_attr`` node, or None if ``node`` is not one."""
        if isinstance(node, torch.fx.Node) and node.op == "get_attr":
            return self._engine.attr_tensor(node.target)
        return None

    def weight(self, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor | None:
        """As :meth:`param`, in the tensor's own dtype: for reading a large weight without a float64 copy
        (NOTE [Weights on demand] in fxmin/weights.py), whole or only its ``rows`` / ``cols`` (int64
        indices into dims 0 / 1). Read-only: it may be the model's own tensor."""
        return self._engine.weights.load(self._module_key(name), rows, cols)

    def weight_nonzero(self, name: str) -> np.ndarray | None:
        """bool numpy array: where :meth:`weight` is nonzero, without a copy of its values (None when not a tensor)."""
        return self._engine.weights.nonzero(self._module_key(name))

    def _module_key(self, name: str) -> str:
        return ".".join(p for p in (self.node.target, name) if p)

    def masked_module(self) -> torch.nn.Module:
        """A copy of this node's module holding its tensors as the pass reads them (masked), in their own
        dtypes: for a rule that builds from a small module's values (a norm). ``self.module`` is the
        model's own module, whose tensors are not masked (NOTE [Weights on demand])."""
        return copy_module(self.module, load=lambda name: self._engine.module_tensor(self.node.target, name, None))

    def attr_weight(self, node) -> torch.Tensor | None:
        """As :meth:`attr_value`, in the tensor's own dtype (read-only, as :meth:`weight`)."""
        if isinstance(node, torch.fx.Node) and node.op == "get_attr":
            return self._engine.attr_tensor(node.target, None)
        return None

    def order(self, node) -> int:
        """Position of ``node`` in the graph."""
        return self._engine.order(node)

    def rule_of(self, node):
        """The :class:`~fxmin.rules.api.Rule` the analysis gave ``node`` (None before it ran, or for
        placeholders and constants). Ask its properties (``sums_to_one``...), never its name."""
        return self._engine.rule_of(node) if isinstance(node, torch.fx.Node) else None

    def graph_memo(self, key, compute):
        """A value computed once per graph (not per node), e.g. an index of tied parameters."""
        cache = self._engine.memo
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def memo(self, key, compute):
        """A value computed once per node and ``key`` (forward, backward and plan share it)."""
        return self.graph_memo((self.node, key), compute)

    # -- forward -------------------------------------------------------------
    def units(self, node) -> np.ndarray | None:
        return self._engine.units_of(node)

    def fresh(self, size: int) -> np.ndarray:
        return self._engine.fresh(size)

    def unify(self, first: np.ndarray, second: np.ndarray) -> None:
        self._engine.unify(first, second)

    def adopt(self, node, axis: int) -> ValueFact | None:
        """Track a model constant (a ``get_attr`` tensor, or a ``Rule.constant_view`` of one) along
        ``axis``, as its reader aligns it.

        Channel ``c`` is ``const`` when the tensor holds one value across its other axes. The
        plan slices the tensor along ``axis`` to the kept channels. Returns the fact, or None
        when ``node`` is not a model constant (or is already tracked on another axis).
        """
        return self._engine.adopt(node, axis)

    def watch(self, units) -> None:
        """Process this node again whenever one of ``units`` becomes present: for a rule whose
        output is a tuple of fresh pieces (their units belong to the ``getitem`` nodes)."""
        self._engine.watch(self.node, units)

    def copies(self, units, sources) -> None:
        """Channels ``units`` hold copies of the channels ``sources`` (a repeat of heads, NOTE [Grouped
        heads]): a kept copy keeps its source, so a choice among channels prefers copies of kept ones
        (:meth:`copied_present`)."""
        self._engine.copies(units, sources)

    # -- backward ------------------------------------------------------------
    def present(self, node=None) -> np.ndarray:
        """Which channels of ``node`` (default: this node) are present; all True if untracked."""
        return self._engine.present(self.node if node is None else node)

    def require(self, node, mask, why: str | None = None) -> None:
        """Channels ``mask`` of ``node`` must stay; ``why`` says so for ``Analysis.explain``."""
        self._engine.require(node, mask, why)

    def copied_present(self, node) -> np.ndarray:
        """Which channels of ``node`` are present or hold a copy of a present channel (:meth:`copies`):
        where a rule chooses a channel (:meth:`choose`), such a copy adds no row to its source. All
        False when ``node`` is untracked."""
        units = self._engine.units_of(node)
        if units is None:
            return np.zeros(len(self.present(node)), bool)
        return self._engine.source_present(units)

    def present_units(self, units) -> np.ndarray:
        """Presence of raw unit ids (e.g. the pieces of a TupleFact)."""
        return self._engine.present_of(units)

    def require_units(self, units, why: str | None = None) -> None:
        self._engine.require_units(units, why)

    def choose(self, node, mask, why: str | None = None) -> None:
        """Channels ``mask`` of ``node`` stay, as this rule's *choice*: how many must stay is forced,
        which ones is not (channel 0 of a conv that would be empty, a dim of a kept head, the fillers
        of a group). Made only once the mandatory requirements are met, when other readers may have
        met it already; until then this node runs again later (NOTE [Choices at the fixed point] in
        fxmin/choices.py). Compute ``mask`` from ``present()`` as it is; the rule runs again after
        a choice is made, so what it requires from the choice's channels can wait for that run."""
        self._engine.choose(node, mask, why)

    def choose_units(self, units, why: str | None = None) -> None:
        """:meth:`choose` for raw unit ids (e.g. the pieces of a TupleFact)."""
        self._engine.choose_units(units, why)

    def require_all(self, node, why: str | None = None) -> None:
        """Every channel of ``node`` stays (every piece of a tuple)."""
        fact = self.fact(node)
        why = why or f"{self.rule.name} keeps every channel of its inputs"
        if isinstance(fact, TupleFact):
            for units in fact.units:
                self._engine.require_units(units, why)
        elif fact is not None and fact.tracked:
            self._engine.require(node, np.ones(fact.size, bool), why)


def _edits(target: str, module: torch.nn.Module, params: dict) -> tuple:
    edits = []
    for name, (before, folded_from, *kept) in params.items():
        after = tuple(getattr(module, name).shape) if getattr(module, name, None) is not None else ()
        edits.append(ParamEdit(f"{target}.{name}", tuple(before), after, tuple(folded_from),
                               tuple(kept[0]) if kept else ()))
    return tuple(edits)


class PlanContext(Context):
    """A rule's view while planning: kept channels, and ways to record edits."""

    def __init__(self, analysis, plan: PlanRecords, node, rule):
        super().__init__(analysis.engine, node, rule)
        self._analysis = analysis
        self._plan = plan

    def kept(self, node=None) -> np.ndarray | None:
        """Indices of kept channels on the tracked axis of ``node`` (default: this node), None if untracked."""
        return self._analysis.kept(self.node if node is None else node)

    def folded(self, node) -> np.ndarray:
        """Channels of ``node`` that are removed and constant: their values must be folded by the reader."""
        fact = self.fact(node)
        if fact is None or not fact.tracked:
            return np.zeros(0, bool)
        return fact.const & ~self._analysis.present(node)

    def replace_module(self, module: torch.nn.Module, params: dict, *, report: tuple | None = None) -> None:
        """Install ``module`` (float64, or weights sliced in the model's dtype) for this call_module node; it is
        stored in the model's dtype, rounded once (NOTE [Fold precision]). ``params`` maps name -> (shape before,
        folded from[, kept per axis]). ``report``: the :class:`ParamEdit` records the report lists
        instead (a replacement whose parameters are named differently from the original's)."""
        original = self.module
        reference = next((t for t in list(original.parameters()) + list(original.buffers()) if t.is_floating_point()), None)
        dtype = reference.dtype if reference is not None else torch.float32
        device = _home(reference)
        edits = tuple(report) if report is not None else _edits(self.node.target, module, params)
        exact = store_rounded(module, dtype)  # NOTE [Fold precision]: rounded once, here
        self._plan.store_module(self.node.target, module)
        self._plan.modules[self.node.target] = ModuleEdit(self.node.target, type(original).__qualname__, module,
                                                          dtype, device, edits, exact)

    def add_module(self, target: str, module: torch.nn.Module, params: dict, like: torch.Tensor | None) -> None:
        """Install a new module (float64) at ``target`` (the node must be patched to call it);
        ``params`` maps its parameter names to (shape before, folded from); ``like`` gives dtype/device."""
        dtype = like.dtype if like is not None else torch.float32
        device = _home(like)
        edits = _edits(target, module, params)
        exact = store_rounded(module, dtype)
        self._plan.store_module(target, module)
        self._plan.modules[target] = ModuleEdit(target, type(module).__qualname__, module, dtype, device, edits, exact)

    def select_input_here(self, placeholder) -> None:
        """This node selects the channels of input ``placeholder`` itself: no input selection before it."""
        self._plan.inputs.pop(placeholder.name, None)

    def shift_input(self, reader, value: torch.Tensor, folded_from=()) -> None:
        """Hand the constant ``value`` (float64, per channel) to ``reader``'s plan, to subtract from its
        input (NOTE [BatchNorm absorbs]); only for a reader whose rule ``absorbs_shift``. ``folded_from``:
        the channels (as 'node[index]') whose constants it sums, for the report."""
        self._plan.notes[("input shift", reader.name)] = value
        self._plan.notes[("input shift from", reader.name)] = tuple(folded_from)

    def input_shift(self) -> torch.Tensor | None:
        """The constant this node's writer handed over with :meth:`shift_input`, or None."""
        return self._plan.notes.get(("input shift", self.node.name))

    def input_shift_sources(self) -> tuple:
        """The channels whose constants :meth:`input_shift` sums (``folded_from`` of :meth:`shift_input`)."""
        return self._plan.notes.get(("input shift from", self.node.name), ())

    def original(self, node) -> torch.Tensor | None:
        """The model's own tensor behind a ``get_attr`` node (dtype and device as in the model)."""
        if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
            return None
        module_path, _, name = node.target.rpartition(".")
        return getattr(self.root.get_submodule(module_path), name)

    def replace_attr(self, node, value: torch.Tensor, folded_from=()) -> None:
        """Replace the tensor a ``get_attr`` node reads by ``value`` (float64 or the model's dtype; stored in the
        model's dtype, rounded once)."""
        original = self.original(node)
        edit = ParamEdit(node.target, tuple(original.shape), tuple(value.shape), tuple(folded_from))
        stored, exact = rounded(value, original.dtype)
        stored = self._plan.store(node.target, stored)
        self._plan.attrs[node.target] = AttrEdit(node.target, stored, original.dtype, original.requires_grad,
                                                 isinstance(original, torch.nn.Parameter), edit, exact)

    def constant_operand(self, index: int, value: torch.Tensor, dtype: torch.dtype) -> None:
        """NOTE [Constant operands]: call this node with positional argument ``index`` replaced by the
        constant ``value`` (float64, broadcastable to what it replaces), stored in ``dtype``; a
        parameter when the model trains any parameter (what it stands for was computed from them)."""
        trainable = any(p.requires_grad for p in self.root.parameters())
        target = free_name(self.root, f"_fxmin_constant_{self.node.name}")
        self._plan.operands[self.node.name] = ConstantOperand(self.node.name, index, value, dtype, trainable,
                                                              self.node.args[index].name, target)

    def patch(self, args: tuple, kwargs: dict | None = None, *, op: str | None = None, target=None) -> None:
        """Call this node with new arguments (nodes in them are nodes of the analysed graph),
        optionally as another call (``op``, ``target``)."""
        self.patch_node(self.node, args, kwargs if kwargs is not None else self.node.kwargs, op=op, target=target)

    def patch_node(self, node, args: tuple, kwargs: dict, *, op: str | None = None, target=None) -> None:
        """Like :meth:`patch`, for another node this rule owns the meaning of (a size read's user)."""
        self._plan.args[node.name] = ArgEdit(node.name, tuple(args), dict(kwargs), op, target)


def _home(tensor) -> torch.device:
    """Where a replacement of ``tensor``'s module lives: its device, the CPU for a tensor on the meta device
    (its values were read from files: NOTE [Weights from files] in fxmin/weights.py) or for none."""
    return torch.device("cpu") if tensor is None or tensor.is_meta else tensor.device
