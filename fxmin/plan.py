"""Facts -> Plan: what each parameter keeps, which constants fold where, which arguments change.

Each rule's ``plan`` records its edits (:mod:`fxmin.edits`) through a
:class:`fxmin.rules.api.PlanContext`; this module collects them into a :class:`Plan`.

The plan is data: the rewrite installs it without deciding anything. Rules build
replacement modules with their weights sliced in the model's dtype and folded constants
in float64; the plan stores them in the model's dtype, keeping the float64 value of each
constant the rounding changed (``ModuleEdit.exact``), which the float64 build and
verification use.

NOTE [Fold precision]
Every folded constant (a bias, a BatchNorm's running mean, a constant operand, the constants of a
CompensatedLayerNorm) is computed in float64 from the model's own values and rounded once to the
model's dtype, when the plan records it (``fxmin.edits.rounded``; a constant operand by the rewrite):
rules read parameters as exact float64 copies (``Context.param``, one tensor at a time), value facts
are float64, rules run ops on constants in float64. Nothing on the way computes in the model's dtype. The stored constant is then the nearest value that
dtype holds, not the exact one: read back in float64 (``result.module.double()``) the result differs
from the masked model in float64 by that rounding (docs/concepts.md, "Precision and tolerances").
Verification's float64 comparison runs the float64 build, where nothing was rounded: the plan keeps
the float64 value of every constant the rounding changed (tests/test_precision.py checks the folds
bit for bit).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx

from .analysis import Analysis
from .progress import phase
from .graph_helpers import free_name  # noqa: F401  (fxmin.plan.free_name, its 0.1.0 home)
from .rules.api import AttrEdit, ParamEdit, PlanContext


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
    #: where the result's tensors go as they are made (a ResultShards: NOTE [Results written as they are
    #: made] in fxmin/result_shards.py); None: they stay in the plan
    files: object = None

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.analysis.graph_module

    def store(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, a tensor of the result just made, as the result holds it: written to :attr:`files` when
        the plan has them (a stand-in on the meta device returned: NOTE [Results written as they are made]
        in fxmin/result_shards.py), else itself."""
        return self.files.store(name, tensor) if self.files is not None else tensor

    def store_module(self, prefix: str, module: torch.nn.Module) -> None:
        """:meth:`store` every parameter and buffer of ``module`` (named under ``prefix``), in place."""
        if self.files is not None:
            self.files.store_module(prefix, module)

    def keeps(self, name: str) -> tuple:
        """Indices each axis of parameter ``name`` keeps (None: the whole axis); () if unchanged.

        >>> plan.keeps("fc1.weight")  # doctest: +SKIP
        (array([0, 2, 5]), array([...]))
        """
        for edit in self.param_edits():
            if edit.name == name:
                return edit.kept
        return ()

    def exact_values(self) -> dict:
        """``{name in the result: float64 value}`` of every tensor the result holds rounded (folded
        constants, NOTE [Fold precision]): what the float64 build holds instead."""
        values = {f"{target}.{name}": value for target, edit in self.modules.items() for name, value in edit.exact.items()}
        values.update({target: attr.exact for target, attr in self.attrs.items() if attr.exact is not None})
        values.update({operand.target: operand.value for operand in self.operands.values()})
        return values

    def param_edits(self) -> list:
        edits = [edit for module in self.modules.values() for edit in module.params]
        edits += [attr.edit for attr in self.attrs.values()]
        return edits


@phase("plan")
def make_plan(analysis: Analysis, files=None) -> Plan:
    """Turn an analysis into a plan (pure: reads the analysis, writes only the new plan). ``files``: a
    :class:`fxmin.result_shards.ResultShards` that each tensor of the result is written to as it is made."""
    plan = Plan(analysis, files=files)
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
        plan.dropped = _unread(analysis.graph_module, plan.operands, analysis)
        # a sum of constants read as a constant itself goes whole: no constant of its own to install
        plan.operands = {name: operand for name, operand in plan.operands.items() if name not in plan.dropped}
    return plan


def _unread(graph_module, operands: dict, analysis) -> tuple:
    """NOTE [Constant operands]: the nodes that nothing reads once each operand's argument is replaced:
    every read of them is a replaced argument or comes from an unread node. Placeholders, in-place and
    side-effecting calls stay, and so does anything nobody read to begin with (it is not the plan's to
    remove), except a size read (NOTE [Unused size reads])."""
    cut = {(operand.source, operand.node) for operand in operands.values()}
    unread: set = set()
    for node in reversed(graph_module.graph.nodes):
        if node.op in ("placeholder", "output") or _keeps_effects(node, graph_module, analysis):
            continue
        if not node.users:
            if _reads_a_size(node):
                unread.add(node.name)
            continue
        if all(user.name in unread or ((node.name, user.name) in cut and _reads(user, node) == 1)
               for user in node.users):
            unread.add(node.name)
    return tuple(node.name for node in graph_module.graph.nodes if node.name in unread)


# NOTE [Unused size reads]
# `batch, _, tokens, _ = x.shape` (repeat_kv) leaves getitems nobody reads; each still reads `x.shape`,
# so a branch whose value became a constant operand would stay for them alone, beside the constant
# that replaced it, and the result would be larger than the model. A size read computes a Python
# number from a tensor's metadata and has no effect, so one nobody reads is dropped with the rest.


def _reads_a_size(node) -> bool:
    """``x.shape``, ``x.shape[i]``, ``x.size()``, ``x.size(d)``, ``x.dim()``: a number from metadata."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        return _reads_a_size(node.args[0])
    return False


def _reads(user, node) -> int:
    """How many arguments of ``user`` are ``node`` (``c * c`` reads ``c`` twice; replacing one argument
    leaves the other reading it)."""
    reads = []
    torch.fx.node.map_arg((user.args, user.kwargs), lambda arg: reads.append(arg is node))
    return sum(reads)


def _keeps_effects(node, graph_module, analysis) -> bool:
    """In-place, ``out=`` and side-effecting calls (what torch.fx's dead-code elimination keeps, and more)
    are never dropped."""
    if "out" in node.kwargs:
        return True
    if node.op == "get_attr":
        return False
    rule = analysis.engine.registry.lookup(node, graph_module)
    if rule is None or (rule.mutates is not None and rule.mutates(node, graph_module)):
        return True  # a call only a barrier covers is not known to be free of effects
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
    value = analysis.engine.weights.load(node.target).index_select(fact.axis, torch.from_numpy(kept))  # own dtype
    value = plan.store(node.target, value)
    edit = ParamEdit(node.target, tuple(original.shape), tuple(value.shape))
    plan.attrs[node.target] = AttrEdit(node.target, value, original.dtype, original.requires_grad,
                                       isinstance(original, torch.nn.Parameter), edit)
