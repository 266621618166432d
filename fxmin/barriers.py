"""Where the analysis keeps every channel: the user's barriers, and the refusal for an op without a rule.

``barriers=`` (module paths, node names, module types or functions) make :data:`BARRIER` the rule of the
nodes they name: every channel around such a node stays (always exact). A node no rule knows and no
barrier names stops the pass with :func:`missing_rule_error`, which names the node, its source line and
both ways out.
"""
from __future__ import annotations

import torch

from .errors import MissingRuleError, describe_node
from .facts import ValueFact
from .rules.api import Rule


def _barrier_forward(ctx):
    return ValueFact.untracked(), None


def _barrier_backward(ctx):
    for node in ctx.input_nodes():
        ctx.require_all(node)


BARRIER = Rule("barrier", _barrier_forward, _barrier_backward, None, "always exact: keeps every channel around it",
               backward_untracked=True)


def missing_rule_error(missing, root) -> MissingRuleError:
    """The error for the nodes ``missing`` (no rule, no barrier): the first named, with its source line."""
    first = missing[0]
    lines = [
        f"fxmin has no rule for {describe_node(first, root)}.",
        "fxmin never guesses what an op computes. Ways out:",
        "  - register a rule for it (a one-line family helper such as fxmin.register_pointwise(...),",
        "    fxmin.REGISTRY.alias(known_target, new_target), or a full fxmin.rule; see fxmin.rules.api), or",
        f"  - pass barriers=[{_target_text(first.target)}] (or the node name {first.name!r}) to keep every channel "
        "around it.",
    ]
    if len(missing) > 1:
        others = ", ".join(f"'{n.name}'" for n in missing[1:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        lines.append(f"Other nodes without a rule: {others}{more}.")
    return MissingRuleError("\n".join(lines), node_name=first.name)


def _target_text(target) -> str:
    """How to write ``target`` in Python: ``torch.ops.aten.embedding.default`` for an ATen op, else its repr."""
    return f"torch.ops.{target}" if isinstance(target, torch._ops.OpOverload) else repr(target)


def make_barrier_test(barriers, root):
    """A predicate over nodes from user barriers: module paths, node names, module types or callables."""
    names, types, callables = set(), [], []
    for barrier in barriers or ():
        if isinstance(barrier, str):
            names.add(barrier)
        elif isinstance(barrier, type):
            types.append(barrier)
        else:
            callables.append(barrier)

    def is_barrier(node) -> bool:
        if node.name in names:
            return True
        if node.op == "call_module":
            if node.target in names or any(node.target.startswith(name + ".") for name in names):
                return True
            if types and isinstance(root.get_submodule(node.target), tuple(types)):
                return True
        if node.op == "call_method" and node.target in names:
            return True
        if node.op == "call_function":
            if any(node.target is fn for fn in callables):
                return True
            if getattr(node.target, "__name__", None) in names:
                return True
        return False

    return is_barrier
