"""Helpers of the channelwise rules that other families share: opaque forward/backward, the
unary pointwise forward and its one-line registration, in-place checks, the binary op table.
Part of :mod:`fxmin.rules.kit`.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from ...errors import FxminError, describe_node
from ...facts import ValueFact
from ...graph_helpers import count_elements
from ..api import rule


def check_in_place(ctx, mutated) -> None:
    """NOTE [In-place]: an in-place op that overwrites a value some later node still reads
    would make that reader see something the analysis did not: refuse loudly."""
    if not isinstance(mutated, torch.fx.Node):
        return
    here = ctx.order(ctx.node)
    later = [user for user in mutated.users if user is not ctx.node and ctx.order(user) > here]
    if later:
        raise FxminError(
            f"{describe_node(ctx.node, ctx.root)} overwrites '{mutated.name}' in place, and "
            f"'{later[0].name}' reads '{mutated.name}' afterwards. fxmin cannot follow aliasing: make the op "
            "out-of-place (inplace=False, x = x + y instead of x += y) or pass it in barriers=[...]."
        )


def in_place_call(node: torch.fx.Node) -> bool:
    """A function or method call that writes into its input: ``x.add_(y)``, ``x += y``, ``inplace=True``."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace", False)) or node.target in _IN_PLACE_OPERATORS
    return False


def mutates(node: torch.fx.Node, root) -> bool:
    """``Rule.mutates`` of the channelwise rules: an in-place call, or a module with ``inplace=True``."""
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    return in_place_call(node)


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift}


def _apply_unary(ctx, constants: torch.Tensor) -> torch.Tensor:
    node = ctx.node
    with torch.no_grad():
        if node.op == "call_module":
            return ctx.module(constants.clone())
        rest = node.args[1:]
        kwargs = dict(node.kwargs)
        if node.op == "call_method":
            return getattr(constants.clone(), node.target)(*rest, **kwargs)
        return node.target(constants.clone(), *rest, **kwargs)


def _has_node_operands(ctx) -> bool:
    found = []
    torch.fx.node.map_arg((ctx.node.args[1:], ctx.node.kwargs), found.append)
    return bool(found)


def pointwise_forward(ctx):
    """Exact for any op applied independently to each element: ``const(c) -> const(f(c))``."""
    x = ctx.arg(0, "input")
    fact = ctx.fact(x)
    if mutates(ctx.node, ctx.root):
        check_in_place(ctx, x)
    if fact is None or not fact.tracked or _has_node_operands(ctx):
        return opaque_forward(ctx)
    value = fact.value.copy()
    if fact.const.any():
        constants = torch.from_numpy(fact.value[fact.const])
        rank = len(ctx.shape(x) or ())
        if rank > 1 and fact.axis < rank:
            # Shaped like the input, channels on their axis: ops that check the rank
            # (nn.Dropout1d/2d/3d) accept it; elementwise ops do not care.
            constants = constants.reshape([-1 if axis == fact.axis else 1 for axis in range(rank)])
        result = _apply_unary(ctx, constants)
        value[fact.const] = result.reshape(-1).to(torch.float64).numpy()
    return fact.replaced(fact.const, value), ctx.units(x)


def tracked_fact(ctx, node):
    """``node``'s fact when it is a tracked value (channels on an axis), else None."""
    fact = ctx.fact(node)
    return fact if isinstance(fact, ValueFact) and fact.tracked else None


def opaque_forward(ctx):
    shape = ctx.shape()
    return (ValueFact.untracked() if shape is not None else None), None


def opaque_backward(ctx):
    """Keep every channel of every input: exact, shrinks nothing across the op."""
    for node in ctx.input_nodes():
        ctx.require_all(node)


POINTWISE_DOC = (
    'Any op applied to each element alone (activations, identity, `contiguous`, dtype casts...): '
    '`const(c) -> const(f(c))`, computed by running the op in float64, so `f(0) != 0` (sigmoid, '
    'softplus) is handled.',
    'Nothing itself: channels pass through (same units).',
    'Every input channel when another operand is a tensor (`clamp(x, min=t)`) or the input is '
    'untracked. An in-place op that overwrites a value read later is an error.',
    )


def register_pointwise(*, modules=(), functions=(), methods=(), name="pointwise", doc=POINTWISE_DOC):
    """One line registers an elementwise unary op family (``f`` applied to each element alone).

    >>> register_pointwise(functions=[torch.erf], methods=["erf"])  # doctest: +SKIP
    """
    rule(name, modules=modules, functions=functions, methods=methods, heads_aware=True, passes_axis=True,
         mutates=mutates, identity_in_eval=identity_in_eval, doc=doc, constant_view=_copy_constant_view,
         macs=pointwise_macs)(pointwise_forward)


def _copy_constant_view(node, root, axis):
    """NOTE [Constant views]: ``contiguous``/``clone``/``detach`` of a model constant hold its values."""
    copies = ("contiguous", "clone", "detach")
    return (node.args[0], axis) if node.op == "call_method" and node.target in copies else None


_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


_IDENTITY_METHODS = ("contiguous", "clone", "detach", "float", "double", "half")


def identity_in_eval(node, root) -> bool:
    """Identity modules, eval-mode dropout, copies and float casts return their input's values."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _IDENTITY_MODULES)
    return node.op == "call_method" and node.target in _IDENTITY_METHODS


_FREE_METHODS = (*_IDENTITY_METHODS, "bool", "long", "int")
_FREE_FUNCTIONS = (torch.ops.aten.clone.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default)


def pointwise_macs(target, _args, _kwargs, out) -> tuple:
    """``Rule.macs`` of the pointwise rules: one operation per output element; identity modules,
    copies and casts cost nothing (NOTE [What is counted] in fxmin.audit.flops)."""
    if isinstance(target, _IDENTITY_MODULES) or target in _FREE_METHODS or target in _FREE_FUNCTIONS:
        return 0, 0
    return 0, count_elements(out)


BINARY_OPS = {
    torch.add: torch.add, operator.add: torch.add, operator.iadd: torch.add, "add": torch.add, "add_": torch.add,
    "__add__": torch.add, "__radd__": lambda a, b: torch.add(b, a),
    torch.sub: torch.sub, operator.sub: torch.sub, operator.isub: torch.sub, "sub": torch.sub, "sub_": torch.sub,
    "__sub__": torch.sub, "__rsub__": lambda a, b: torch.sub(b, a), torch.rsub: lambda a, b: torch.sub(b, a),
    torch.mul: torch.mul, operator.mul: torch.mul, operator.imul: torch.mul, "mul": torch.mul, "mul_": torch.mul,
    "__mul__": torch.mul, "__rmul__": torch.mul,
    torch.div: torch.div, operator.truediv: torch.div, operator.itruediv: torch.div, "div": torch.div,
    "div_": torch.div, "__truediv__": torch.div, "__rtruediv__": lambda a, b: torch.div(b, a),
    torch.maximum: torch.maximum, torch.minimum: torch.minimum,
    operator.floordiv: torch.floor_divide, "__floordiv__": torch.floor_divide, torch.floor_divide: torch.floor_divide,
    "floor_divide": torch.floor_divide, operator.mod: torch.remainder, "__mod__": torch.remainder,
    torch.remainder: torch.remainder, "remainder": torch.remainder,
    # the ATen overloads (torch.export graphs) compute the same; fxmin.rules.functional aliases them
    torch.ops.aten.add.Tensor: torch.add, torch.ops.aten.sub.Tensor: torch.sub, torch.ops.aten.mul.Tensor: torch.mul,
    torch.ops.aten.div.Tensor: torch.div, torch.ops.aten.rsub.Scalar: lambda a, b: torch.sub(b, a),
    torch.ops.aten.rsub.Tensor: lambda a, b: torch.sub(b, a),
}

