"""Facts -> Plan: what each parameter keeps, which constants fold where, which arguments change.

The plan is data: the rewrite installs it without deciding anything. Replacement
modules are built here in float64 (exact folded constants); the rewrite casts
them back to the model's dtype, and verification uses them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx

from .analysis import Analysis
from .context import Context
from .rules.pointwise import in_place_call


@dataclass(frozen=True)
class ParamEdit:
    """One parameter or buffer: its shape before and after, and whether constants were folded into it."""

    name: str
    shape_before: tuple
    shape_after: tuple
    folded_from: tuple = ()  # channels (as 'node[index]') whose constants were folded in
    kept: tuple = ()  # per axis: indices kept (None: the whole axis), when the rule records them


@dataclass(frozen=True)
class ModuleEdit:
    target: str
    module_type: str
    module: torch.nn.Module  # float64 replacement
    dtype: torch.dtype
    device: torch.device
    params: tuple


@dataclass(frozen=True)
class AttrEdit:
    target: str
    value: torch.Tensor  # float64
    dtype: torch.dtype
    requires_grad: bool
    is_parameter: bool
    edit: ParamEdit


@dataclass(frozen=True)
class ArgEdit:
    node: str
    args: tuple
    kwargs: dict
    op: str | None = None  # a new call kind and target, e.g. chunk -> torch.split with sizes
    target: object = None


@dataclass(frozen=True)
class ConstantOperand:
    """NOTE [Constant operands]: argument ``index`` of node ``node`` becomes a model constant ``value``
    (float64, shaped to broadcast), an ``nn.Parameter`` when ``trainable``; ``source`` is the node it
    replaces, which nothing else may need any more."""

    node: str
    index: int
    value: torch.Tensor
    dtype: torch.dtype
    trainable: bool
    source: str
    target: str  # the new attribute's name


@dataclass(frozen=True)
class InputSelect:
    placeholder: str
    axis: int
    index: np.ndarray


@dataclass
class Plan:
    """Everything the rewrite needs, and what the report shows."""

    analysis: Analysis
    modules: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # node name -> kept indices (None: untracked, all kept)
    axes: dict = field(default_factory=dict)  # node name -> tracked axis
    notes: dict = field(default_factory=dict)  # what one rule's plan hands to a later one
    operands: dict = field(default_factory=dict)  # node name -> ConstantOperand (NOTE [Constant operands])
    dropped: tuple = ()  # names of the nodes nothing reads once the operands are constants, in graph order

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.analysis.graph_module

    def keeps(self, name: str) -> tuple:
        """Indices each axis of parameter ``name`` keeps (None: the whole axis); () if unchanged.

        >>> plan.keeps("fc1.weight")  # doctest: +SKIP
        (array([0, 2, 5]), array([...]))
        """
        for edit in self.param_edits():
            if edit.name == name:
                return edit.kept
        return ()

    def param_edits(self) -> list:
        edits = [edit for module in self.modules.values() for edit in module.params]
        edits += [attr.edit for attr in self.attrs.values()]
        return edits


class PlanContext(Context):
    """A rule's view while planning: kept channels, and ways to record edits."""

    def __init__(self, analysis: Analysis, plan: Plan, node, rule):
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

    def replace_module(self, module: torch.nn.Module, params: dict) -> None:
        """Install ``module`` (float64) for this call_module node; ``params`` maps name -> (shape before, folded from)."""
        original = self.module
        reference = next((t for t in list(original.parameters()) + list(original.buffers()) if t.is_floating_point()), None)
        dtype = reference.dtype if reference is not None else torch.float32
        device = reference.device if reference is not None else torch.device("cpu")
        edits = []
        for name, (before, folded_from, *kept) in params.items():
            after = tuple(getattr(module, name).shape) if getattr(module, name, None) is not None else ()
            edits.append(ParamEdit(f"{self.node.target}.{name}", tuple(before), after, tuple(folded_from),
                                   tuple(kept[0]) if kept else ()))
        self._plan.modules[self.node.target] = ModuleEdit(
            self.node.target, type(original).__qualname__, module, dtype, device, tuple(edits)
        )

    def select_input_here(self, placeholder) -> None:
        """This node selects the channels of input ``placeholder`` itself: no input selection before it."""
        self._plan.inputs.pop(placeholder.name, None)

    def note(self, key, value) -> None:
        """Hand ``value`` to a later node's plan (e.g. a constant for a BatchNorm to absorb)."""
        self._plan.notes[key] = value

    def noted(self, key, default=None):
        return self._plan.notes.get(key, default)

    def patch_node(self, node, args: tuple, kwargs: dict, *, op: str | None = None, target=None) -> None:
        """Like :meth:`patch`, for another node this rule owns the meaning of (a size read's user)."""
        self._plan.args[node.name] = ArgEdit(node.name, tuple(args), dict(kwargs), op, target)

    def add_module(self, target: str, module: torch.nn.Module, params: dict, like: torch.Tensor | None) -> None:
        """Install a new module (float64) at ``target`` (the node must be patched to call it);
        ``params`` maps its parameter names to (shape before, folded from); ``like`` gives dtype/device."""
        edits = []
        for name, (before, folded_from, *kept) in params.items():
            after = tuple(getattr(module, name).shape) if getattr(module, name, None) is not None else ()
            edits.append(ParamEdit(f"{target}.{name}", tuple(before), after, tuple(folded_from),
                                   tuple(kept[0]) if kept else ()))
        dtype = like.dtype if like is not None else torch.float32
        device = like.device if like is not None else torch.device("cpu")
        self._plan.modules[target] = ModuleEdit(target, type(module).__qualname__, module, dtype, device, tuple(edits))

    def original(self, node) -> torch.Tensor | None:
        """The model's own tensor behind a ``get_attr`` node (dtype and device as in the model)."""
        if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
            return None
        module_path, _, name = node.target.rpartition(".")
        return getattr(self.root.get_submodule(module_path), name)

    def replace_attr(self, node, value: torch.Tensor, folded_from=()) -> None:
        """Replace the tensor a ``get_attr`` node reads by ``value`` (float64)."""
        module_path, _, name = node.target.rpartition(".")
        owner = self.root.get_submodule(module_path)
        original = getattr(owner, name)
        edit = ParamEdit(node.target, tuple(original.shape), tuple(value.shape), tuple(folded_from))
        self._plan.attrs[node.target] = AttrEdit(
            node.target, value, original.dtype, original.requires_grad,
            isinstance(original, torch.nn.Parameter), edit,
        )

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
        self._plan.args[self.node.name] = ArgEdit(self.node.name, tuple(args),
                                                  dict(kwargs if kwargs is not None else self.node.kwargs), op, target)


def free_name(root: torch.fx.GraphModule, name: str, taken=()) -> str:
    """``name``, or ``name_2``, ``name_3``, ...: the first attribute name that neither ``root`` (nor its
    graph) nor ``taken`` uses."""
    used = {n.target for n in root.graph.nodes if n.op in ("get_attr", "call_module")} | set(taken)
    candidate, suffix = name, 1
    while candidate in used or hasattr(root, candidate):
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate


def make_plan(analysis: Analysis) -> Plan:
    """Turn an analysis into a plan (pure: reads the analysis, writes only the new plan)."""
    plan = Plan(analysis)
    for node in analysis.graph_module.graph.nodes:
        fact = analysis.facts.get(node)
        if fact is not None and fact.tracked:
            plan.kept[node.name] = analysis.kept(node)
            plan.axes[node.name] = fact.axis
        if node.op == "placeholder" and fact is not None and fact.tracked:
            kept = analysis.kept(node)
            if kept.size != fact.size:
                plan.inputs[node.name] = InputSelect(node.name, fact.axis, kept)
        if node.op == "get_attr" and fact is not None and fact.tracked:
            _slice_constant(analysis, plan, node, fact)
        rule = analysis.rules.get(node)
        if rule is not None and rule.plan is not None:
            rule.plan(PlanContext(analysis, plan, node, rule))
    if plan.operands:
        plan.dropped = _unread(analysis.graph_module, plan.operands)
        # a sum of constants read as a constant itself goes whole: no constant of its own to install
        plan.operands = {name: operand for name, operand in plan.operands.items() if name not in plan.dropped}
    return plan


def _unread(graph_module, operands: dict) -> tuple:
    """NOTE [Constant operands]: the nodes that nothing reads once each operand's edge is cut: every one
    of their readers is cut or unread itself. Placeholders, in-place and side-effecting calls stay, and
    so does anything nobody read to begin with (it is not the plan's to remove)."""
    cut = {(operand.source, operand.node) for operand in operands.values()}
    unread: set = set()
    for node in reversed(graph_module.graph.nodes):
        if not node.users or node.op in ("placeholder", "output") or _keeps_effects(node, graph_module):
            continue
        if all((node.name, user.name) in cut or user.name in unread for user in node.users):
            unread.add(node.name)
    return tuple(node.name for node in graph_module.graph.nodes if node.name in unread)


def _keeps_effects(node, graph_module) -> bool:
    """In-place, ``out=`` and side-effecting calls (what torch.fx's dead-code elimination keeps, and more)
    are never dropped."""
    if "out" in node.kwargs or in_place_call(node):
        return True
    if node.op == "call_function":
        return node.target in getattr(torch.fx.node, "_side_effectful_functions", set())
    if node.op == "call_module":
        return bool(getattr(graph_module.get_submodule(node.target), "_is_impure", False))
    return False


def _slice_constant(analysis: Analysis, plan: Plan, node, fact) -> None:
    """A model constant tracked along an axis (layer scale, position embedding) loses removed channels."""
    kept = analysis.kept(node)
    if len(kept) == fact.size:
        return
    module_path, _, name = node.target.rpartition(".")
    original = getattr(analysis.graph_module.get_submodule(module_path), name)
    value = original.detach().to(torch.float64).index_select(fact.axis, torch.from_numpy(kept))
    edit = ParamEdit(node.target, tuple(original.shape), tuple(value.shape))
    plan.attrs[node.target] = AttrEdit(node.target, value, original.dtype, original.requires_grad,
                                       isinstance(original, torch.nn.Parameter), edit)
