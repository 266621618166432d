"""Channelwise rules: activations, dropout, identity, elementwise arithmetic, pooling.

These ops keep channel ``c`` in channel ``c``: the output reuses the input's units
(so presence is shared, see NOTE [Units]) and a constant channel stays constant,
with its value computed by running the op itself on the constants in float64.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import (BINARY_OPS, check_in_place, in_place_call, mutates, no_cost, opaque_forward,  # noqa: F401
                  per_input, per_output, pointwise_forward, register_pointwise)

# -- unary pointwise -------------------------------------------------------------------------------


register_pointwise(
    modules=(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
             nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Softsign, nn.Tanhshrink,
             nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
    functions=(torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
               F.tanh, F.hardswish, F.hardsigmoid, F.elu, F.celu, F.selu, F.softplus, F.mish, F.hardtanh,
               torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.clamp,
               torch.clip, operator.neg, F.logsigmoid, F.softsign),
    methods=("relu", "relu_", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "erf", "clamp",
             "clip", "clamp_", "contiguous", "clone", "detach", "float", "double", "half", "sigmoid_", "tanh_",
             "bool", "long", "int"),
)


def _dropout_forward(ctx):
    """Exact in eval mode, where dropout is the identity (the result keeps it for training)."""
    return pointwise_forward(ctx)


rule("dropout", doc=(
         'In eval mode, where dropout is the identity (the module stays in place for training).',
         'Nothing itself: channels pass through.',
         'As `pointwise`.',
         ),
     functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout),
     heads_aware=True, passes_axis=True, mutates=mutates, identity_in_eval=lambda node, root: True,
     macs=no_cost)(_dropout_forward)


# -- binary elementwise ---------------------------------------------------------------------------------


def _operand(ctx, value, out_rank, partner_axis=None):
    """(kind, payload): 'tracked' (fact, aligned axis), 'scalar' (number), 'broadcast' (node), 'other'.

    A model constant (``get_attr``) that varies along the partner's channel axis is adopted as
    tracked on that axis (layer scale, position embeddings); one that holds a single value is a
    scalar; one that is constant along the channel axis broadcasts.
    """
    if isinstance(value, (int, float, bool)):
        return "scalar", float(value)
    if not isinstance(value, torch.fx.Node):
        return "other", None
    fact, shape = ctx.fact(value), ctx.shape(value)
    if shape is None:
        # a number computed at run time (``h.size(2) * h.size(3)``): one value for every channel
        return ("symbolic", None) if value.meta.get("type") in (int, float, bool) else ("other", None)
    if not (fact is not None and fact.tracked):
        constant = ctx.attr_value(value)
        uniform = constant is not None and constant.numel() and bool((constant == constant.flatten()[0]).all())
        if uniform and constant.numel() == 1:
            return "scalar", float(constant.flatten()[0])
        own_axis = None if partner_axis is None else partner_axis - (out_rank - len(shape))
        runs_along = own_axis is not None and 0 <= own_axis < len(shape) and shape[own_axis] > 1
        if runs_along:
            fact = ctx.adopt(value, own_axis)  # a model constant (or a slice/expand of one)
        elif uniform and partner_axis is not None:
            # NOTE [Uniform constants]: one value everywhere, and size 1 along the partner's channels
            # (or not reaching them): a scalar that still broadcasts once those channels are sliced.
            # One that runs along them (a layer scale still at its init value 1e-6) is adopted and
            # sliced like any other: treated as a scalar it kept its full length and no longer
            # broadcast against the sliced partner.
            return "scalar", float(constant.flatten()[0])
    if fact is not None and fact.tracked:
        offset = out_rank - len(shape)
        return "tracked", (fact.with_axes([a + offset for a in fact.axes]), fact.axis + offset)
    return "broadcast", value


def _binary_forward(ctx):
    """Exact for elementwise binary ops: both operands' channels couple (a residual stream goes
    stage-wide or not at all); ``const op const`` is constant, ``0 * x`` is ``const(0)``."""
    node = ctx.node
    a, b = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("other"))
    if mutates(ctx.node, ctx.root):
        check_in_place(ctx, a)
    if set(node.kwargs) - {"other"} or len(node.args) > 2:
        return opaque_forward(ctx)  # alpha=, rounding_mode=: not the op the table computes constants with
    op = BINARY_OPS[node.target]
    shape = ctx.shape()
    if shape is None:
        return opaque_forward(ctx)
    rank = len(shape)
    kind_a, pa = _operand(ctx, a, rank)
    kind_b, pb = _operand(ctx, b, rank, _adoption_axis(pa) if kind_a == "tracked" else None)
    if kind_b == "tracked" and kind_a == "broadcast":
        kind_a, pa = _operand(ctx, a, rank, _adoption_axis(pb))
    if kind_a == "tracked" and kind_b == "tracked" and pa[0].simple != pb[0].simple:
        return _head_dim_table(ctx, op, a, b, pa[0], pb[0])
    if kind_a == "tracked" and kind_b == "tracked":
        (fa, _), (fb, _) = pa, pb
        if fa.axes != fb.axes or fa.radix != fb.radix or any(shape[a] != r for a, r in zip(fa.axes, fa.radix)):
            return opaque_forward(ctx)
        ctx.unify(ctx.units(a), ctx.units(b))
        const = fa.const & fb.const
        with torch.no_grad():
            value = op(torch.tensor(fa.value), torch.tensor(fb.value)).numpy()
        if op is torch.mul:
            zero = (fa.const & (fa.value == 0)) | (fb.const & (fb.value == 0))
            const = const | zero
            value = np.where(zero, 0.0, value)
        return fa.replaced(const, np.where(const, value, 0.0)), ctx.units(a)
    for (kind, payload, other_kind, other, tracked_node, first) in (
        (kind_a, pa, kind_b, pb, a, True), (kind_b, pb, kind_a, pa, b, False)
    ):
        if kind != "tracked" or other_kind not in ("scalar", "broadcast", "symbolic"):
            continue
        fact, axis = payload
        if any(shape[a] != r for a, r in zip(fact.axes, fact.radix)):
            return opaque_forward(ctx)
        if other_kind == "symbolic":  # its value is unknown here: only 0 * s stays a known constant
            const = fact.const & (fact.value == 0) if op is torch.mul else np.zeros(fact.size, bool)
            return fact.replaced(const, np.zeros(fact.size)), ctx.units(tracked_node)
        if other_kind == "broadcast":
            other_shape = ctx.shape(other)
            offset = rank - len(other_shape)
            if any(a - offset >= 0 and other_shape[a - offset] != 1 for a in fact.axes):
                return opaque_forward(ctx)  # a tensor that varies along the channel axis: not followed here
            const = np.zeros(fact.size, bool)
            if op is torch.mul:
                const = fact.const & (fact.value == 0)
            return fact.replaced(const, np.zeros(fact.size)), ctx.units(tracked_node)
        scalar = torch.tensor(other, dtype=torch.float64)
        with torch.no_grad():
            values = torch.tensor(fact.value)
            value = (op(values, scalar) if first else op(scalar, values)).numpy()
        return fact.replaced(fact.const, np.where(fact.const, value, 0.0)), ctx.units(tracked_node)
    return opaque_forward(ctx)


def _adoption_axis(payload):
    """Where a model constant meets the partner's channels: its channel axis, or for channels
    split into heads the head_dim axis (rotary cos/sin tables vary along head_dim only)."""
    fact = payload[0]
    return fact.axes[-1] if not fact.simple else payload[1]


def _head_dim_table(ctx, op, a, b, fa, fb):
    """NOTE [Rotary pairs]: a per-head-dim table (cos/sin of rotary embeddings, shape (T, hd))
    times channels split into (heads, head_dim): entry ``e`` of the table stays when dim ``e`` of
    some head stays, and every kept head keeps exactly the table's entries (see _head_dim_backward),
    so the table is sliced like the dims and every kept head keeps the same dims; heads still leave
    one by one."""
    split, table = (fa, fb) if not fa.simple else (fb, fa)
    split_node, table_node = (a, b) if not fa.simple else (b, a)
    if table.axis != split.axes[-1] or table.size != split.radix[-1]:
        return opaque_forward(ctx)
    ctx.watch(ctx.units(table_node))  # backward runs again when the table's entries stay
    table_const = np.tile(table.const, split.size // table.size)
    table_value = np.tile(table.value, split.size // table.size)
    const = split.const & table_const
    with torch.no_grad():
        first, second = (split.value, table_value) if split is fa else (table_value, split.value)
        value = op(torch.tensor(first), torch.tensor(second)).numpy()
    if op is torch.mul:
        zero = (split.const & (split.value == 0)) | (table_const & (table_value == 0))
        const, value = const | zero, np.where(zero, 0.0, value)
    return split.replaced(const, np.where(const, value, 0.0)), ctx.units(split_node)


def _head_dim_backward(ctx) -> bool:
    """NOTE [Rotary pairs]: the product of kept heads and kept table entries; True if this applies."""
    operands = [n for n in ctx.input_nodes() if isinstance(ctx.fact(n), ValueFact) and ctx.fact(n).tracked]
    if ctx.fact(ctx.node).simple or len(operands) != 2 or ctx.fact(operands[0]).simple == ctx.fact(operands[1]).simple:
        return False
    table = operands[0] if ctx.fact(operands[0]).simple else operands[1]
    grid = ctx.present().reshape(-1, ctx.fact(table).size)
    ctx.require(table, grid.any(axis=0), "a kept head keeps this dim")
    need = grid.any(axis=1)[:, None] & ctx.present(table)[None, :]
    ctx.require(ctx.node, need.reshape(-1), "every kept head keeps the table's dims")
    return True


def _binary_backward(ctx):
    if _head_dim_backward(ctx):
        return
    for node in ctx.input_nodes():
        input_fact = ctx.fact(node)
        if input_fact is None or not input_fact.tracked:
            ctx.require_all(node)  # a broadcast operand is read whole


# NOTE [Constant operands]
# Units couple both operands of an elementwise op, so a branch that joins a residual stream keeps
# its channels while the stream does, even when every one of them is a proven constant: a ConvNeXt
# block whose MLP was emptied still adds its last Linear's bias (times its layer scale), and its
# depthwise convolution and norm still run to feed a norm that emits nothing. When such an operand
# has the result's shape and so does the other one, replacing it by its per-channel constants,
# shaped (1, ..., C, ..., 1), broadcasts to the same values; the branch behind it is then read by
# nothing and the rewrite drops it (its parameters leave the model). The constant is a parameter
# when the model trains any, so that training the minimized model can still move that bias.
# `c * c` (one node on both sides) is left as it is: replacing one argument would leave the other
# reading `c`, so the branch would stay beside a new constant. The plan drops a node only when every
# argument that reads it was replaced (plan._unread counts the reads).


def _binary_plan(ctx):
    node = ctx.node
    if len(node.args) != 2 or node.kwargs or mutates(ctx.node, ctx.root):
        return
    fact, shape = ctx.fact(node), ctx.shape()
    if fact is None or not fact.tracked or not fact.simple or shape is None:
        return
    kept = ctx.kept()
    for index in (0, 1):
        operand, other = node.args[index], node.args[1 - index]
        if (not isinstance(operand, torch.fx.Node) or not isinstance(other, torch.fx.Node) or operand.op == "get_attr"
                or other is operand):  # c * c: the other argument keeps reading c, so c stays either way
            continue
        operand_fact = ctx.fact(operand)
        if (operand_fact is None or not operand_fact.tracked or not operand_fact.simple
                or operand_fact.axis != fact.axis or not operand_fact.const.all()
                or ctx.shape(operand) != shape or ctx.shape(other) != shape):
            continue
        meta = operand.meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", None)
        if dtype is None or not dtype.is_floating_point:
            continue
        broadcast = [1] * len(shape)
        broadcast[fact.axis] = len(kept)
        value = torch.from_numpy(operand_fact.value[kept]).to(torch.float64).reshape(broadcast)
        ctx.constant_operand(index, value, dtype)
        return


rule("elementwise", doc=(
         "Always for add/sub/mul/div/maximum/minimum: operands' channels couple; `const ∘ const` is "
         'constant, `0 · x` is `const(0)`.',
         'A channel of the coupled group when it is removable at every member (a residual stream goes'
         " stage-wide or not at all). An operand constant in every channel, of the result's shape as "
         'the other operand is, becomes a broadcast constant (a parameter when the model trains) and '
         'the branch behind it, read by nothing else, leaves the model (NOTE [Constant operands]: a '
         'block whose MLP was emptied).',
         'Every channel with `alpha=`, or when a broadcast operand varies along the channel axis; a '
         'broadcast operand is read whole.',
         ),
     functions=[k for k in BINARY_OPS if not isinstance(k, (str, torch._ops.OpOverload))],
     methods=[k for k in BINARY_OPS if isinstance(k, str)], backward=_binary_backward, plan=_binary_plan,
     heads_aware=True, passes_axis=True, mutates=mutates, macs=per_output(1))(_binary_forward)


# -- pooling ----------------------------------------------------------------------------------------------

_POOL_DIMS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}
_ATEN_POOLS = {"max_pool2d": 2, "avg_pool2d": 2, "adaptive_avg_pool2d": 2, "max_pool1d": 1, "avg_pool1d": 1,
               "adaptive_avg_pool1d": 1}
_POOL_DIMS.update({getattr(torch.ops.aten, name).default: dims for name, dims in _ATEN_POOLS.items()})
_AVERAGING = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
              torch.ops.aten.avg_pool2d.default, torch.ops.aten.avg_pool1d.default)
_POOL_TARGETS = [F.max_pool2d, *(k for k in _POOL_DIMS if not isinstance(k, type) and k is not F.max_pool2d
                                 and not isinstance(k, torch._ops.OpOverload))]  # ATen ones are aliases


def _pool_setting(ctx, name, index, default):
    if ctx.module is not None:
        return getattr(ctx.module, name, default)
    return ctx.arg(index, name, default)


def _pool_forward(ctx):
    """Exact: pooling works within each channel; a constant stays constant, except a nonzero
    constant under average pooling that counts zero padding (or ceil-mode/divisor tricks)."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    key = type(ctx.module) if ctx.module is not None else ctx.node.target
    spatial = _POOL_DIMS[key]
    if fact is None or not fact.tracked or shape is None or fact.axis >= len(shape) - spatial:
        return opaque_forward(ctx)
    const = fact.const.copy()
    if key in _AVERAGING:
        padding = _pool_setting(ctx, "padding", 3, 0)
        padded = any(p > 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
        tricky = (padded and _pool_setting(ctx, "count_include_pad", 5, True)) or _pool_setting(ctx, "ceil_mode", 4, False) \
            or _pool_setting(ctx, "divisor_override", 6, None) is not None
        if tricky:
            const &= fact.value == 0
    if isinstance(ctx.module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)) and ctx.module.return_indices:
        return opaque_forward(ctx)
    if ctx.node.op != "call_module" and ctx.node.kwargs.get("return_indices", False):
        return opaque_forward(ctx)
    return ValueFact.constants(fact.axis, const, np.where(const, fact.value, 0.0)), ctx.units(x)


rule("pooling", doc=(
         'Max/avg/adaptive pooling work within each channel: a constant stays constant.',
         'Nothing itself: channels pass through.',
         'Average pooling that counts zero padding (or uses `ceil_mode`/`divisor_override`) keeps '
         'only `const(0)` constant; `return_indices` and pooling over the channel axis are opaque '
         '(all kept).',
         ),
     modules=[k for k in _POOL_DIMS if isinstance(k, type)],
     functions=_POOL_TARGETS, macs=per_input)(_pool_forward)


# trigonometric functions (sin/cos positional encodings: EdgeNeXt, DETR-style models)
register_pointwise(functions=(torch.sin, torch.cos), methods=("sin", "cos"))

# ATen keys of these rules, with the torch-level signature (NOTE [ATen aliases] in functional.py)
_aten = torch.ops.aten
REGISTRY.alias(torch.rsqrt, _aten.rsqrt.default)
REGISTRY.alias(torch.sqrt, _aten.sqrt.default)
REGISTRY.alias(torch.erf, _aten.erf.default)
