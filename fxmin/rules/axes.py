"""Rules that move channel axes: permute/transpose, unsqueeze/squeeze, expand (the channels keep
their units; only the axis they sit on changes, or a size-1 axis is broadcast)."""
from __future__ import annotations

import torch

from ..facts import ValueFact
from ..graph_helpers import tensor_shape
from .api import REGISTRY, rule
from .kit import expand_heads_backward, expand_heads_forward, expand_heads_plan, no_cost, opaque_forward


def _tracked(ctx, node):
    fact = ctx.fact(node)
    return fact if isinstance(fact, ValueFact) and fact.tracked else None


# -- permute / transpose / unsqueeze / squeeze ------------------------------------------------------------------

def _dims(ctx, start):
    node = ctx.node
    if node.op == "call_method":
        rest = node.args[start:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return list(rest[0])
        return list(rest) if rest else list(node.kwargs.get("dims", ()))
    return list(ctx.arg(start, "dims", ()))


def _moved(ctx, axis_out):
    x = ctx.arg(0, "input")
    fact = _tracked(ctx, x)
    if fact is None or axis_out is None:
        return opaque_forward(ctx)
    return fact.moved(axis_out), ctx.units(x)


def _remapped(ctx, where):
    """Move every axis the channels occupy with ``where(axis) -> new axis``."""
    x = ctx.arg(0, "input")
    fact = _tracked(ctx, x)
    if fact is None:
        return opaque_forward(ctx)
    return fact.with_axes([where(axis) for axis in fact.axes]), ctx.units(x)


def _permute_forward(ctx):
    """Exact: permuting axes moves the channel axis (both axes of attention heads)."""
    x = ctx.arg(0, "input")
    fact, shape = _tracked(ctx, x), ctx.shape(x)
    if fact is None:
        return opaque_forward(ctx)
    dims = [d % len(shape) for d in _dims(ctx, 1)]
    return _remapped(ctx, dims.index)


def _transpose_forward(ctx):
    """Exact: transposing swaps the channel axis with another."""
    x = ctx.arg(0, "input")
    fact, shape = _tracked(ctx, x), ctx.shape(x)
    if fact is None:
        return opaque_forward(ctx)
    if ctx.node.target in ("t", torch.t, torch.ops.aten.t.default):
        a, b = 0, len(shape) - 1
    else:
        a, b = ctx.arg(1, "dim0") % len(shape), ctx.arg(2, "dim1") % len(shape)
    return _remapped(ctx, lambda axis: b if axis == a else a if axis == b else axis)


def _unsqueeze_forward(ctx):
    """Exact: a new axis of size 1 shifts the channel axis."""
    x = ctx.arg(0, "input")
    fact, out = _tracked(ctx, x), ctx.shape()
    if fact is None or out is None:
        return opaque_forward(ctx)
    dim = ctx.arg(1, "dim") % len(out)
    return _remapped(ctx, lambda axis: axis + (1 if dim <= axis else 0))


def _squeeze_forward(ctx):
    """Exact: removing size-1 axes other than the channel axis shifts it."""
    x = ctx.arg(0, "input")
    fact, shape = _tracked(ctx, x), ctx.shape(x)
    if fact is None:
        return opaque_forward(ctx)
    dim = ctx.arg(1, "dim")
    if dim is None:
        dims = [d for d, size in enumerate(shape) if size == 1]
    else:
        dims = [d % len(shape) for d in (dim if isinstance(dim, (tuple, list)) else (dim,)) if shape[d % len(shape)] == 1]
    if fact.axis in dims:
        return opaque_forward(ctx)
    return _moved(ctx, fact.axis - sum(1 for d in dims if d < fact.axis))


def _moved_constant_view(node, root, axis):
    """NOTE [Constant views]: a permute, transpose or unsqueeze moves whole axes of its source."""
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or source.meta.get("tensor_meta") is None \
            or node.meta.get("tensor_meta") is None:
        return None
    rank_in, rank_out = len(source.meta["tensor_meta"].shape), len(node.meta["tensor_meta"].shape)
    rest = [a for a in node.args[1:] if isinstance(a, int)]
    if node.target in ("permute", torch.permute):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        dims = [d % rank_in for d in dims] if all(isinstance(d, int) for d in dims) else None
        return (source, dims[axis]) if dims is not None and len(dims) == rank_out else None
    if node.target in ("transpose", torch.transpose) and len(rest) == 2:
        a, b = (d % rank_in for d in rest)
        return source, (b if axis == a else a if axis == b else axis)
    if node.target in ("unsqueeze", torch.unsqueeze) and len(rest) == 1:
        dim = rest[0] % rank_out
        return None if axis == dim else (source, axis - (1 if dim < axis else 0))
    return None


rule("permute", doc=(
         'Always: the channel axis moves (both axes of attention heads).',
         'Nothing itself.',
         '—',
         ),
     functions=(torch.permute,), methods=("permute",),
     heads_aware=True, constant_view=_moved_constant_view, macs=no_cost)(_permute_forward)
rule("transpose", doc=(
         'Always: the channel axis swaps with another.',
         'Nothing itself.',
         '—',
         ),
     functions=(torch.transpose, torch.t, torch.swapaxes), methods=("transpose", "t", "swapaxes"),
     heads_aware=True, constant_view=_moved_constant_view, macs=no_cost)(_transpose_forward)
rule("unsqueeze", doc=(
         'Always: a new size-1 axis shifts the channel axis (every axis of attention heads).',
         'Nothing itself.',
         '—',
         ),
     functions=(torch.unsqueeze,), methods=("unsqueeze",), heads_aware=True,
     constant_view=_moved_constant_view, macs=no_cost)(_unsqueeze_forward)
rule("squeeze", doc=(
         'Removing size-1 axes other than the channel axis.',
         'Nothing itself.',
         'Every channel when the channel axis itself could be squeezed.',
         ),
     functions=(torch.squeeze,), methods=("squeeze",), macs=no_cost)(_squeeze_forward)


# -- expand -------------------------------------------------------------------------------------------------------

def _expand_forward(ctx):
    """Exact: expanding repeats values along size-1 axes; the channel axis keeps its channels
    (a literal size there is patched). A model constant expanded here is adopted by its reader."""
    x = ctx.arg(0, "input")
    fact, shape, out = _tracked(ctx, x), ctx.shape(x), ctx.shape()
    if fact is None or out is None:
        return opaque_forward(ctx)
    if not fact.simple:
        return expand_heads_forward(ctx)  # repeated heads: NOTE [Grouped heads]
    return fact.moved(fact.axis + len(out) - len(shape)), ctx.units(x)


def _expand_constant_view(node, root, axis):
    """NOTE [Constant views]: a class token expanded to the batch is its constant, axes shifted."""
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or tensor_shape(node) is None or tensor_shape(source) is None:
        return None
    return source, axis - (len(tensor_shape(node)) - len(tensor_shape(source)))


def _expand_backward(ctx):
    fact = ctx.fact(ctx.node)
    if not fact.simple:
        expand_heads_backward(ctx)
        return
    sizes = _dims(ctx, 1)
    if fact.axis < len(sizes) and not isinstance(sizes[fact.axis], int):
        ctx.require_all(ctx.node)


def _expand_plan(ctx):
    fact = ctx.fact(ctx.node)
    kept = ctx.kept()
    if fact is None or not fact.tracked or len(kept) == fact.size:
        return
    if not fact.simple:
        expand_heads_plan(ctx)
        return
    sizes = _dims(ctx, 1)
    if fact.axis < len(sizes) and sizes[fact.axis] != -1:
        sizes[fact.axis] = int(len(kept))
        as_list = isinstance(ctx.node.args[1], (list, tuple)) and len(ctx.node.args) == 2  # aten.expand(x, [sizes])
        ctx.patch((ctx.node.args[0], list(sizes)) if as_list else (ctx.node.args[0], *sizes), {})


rule("expand", doc=(
         'Always: values repeat along size-1 axes; the channel axis keeps its channels. Repeating heads '
         'along an axis between their digits (`repeat_kv`) makes each copy a channel (NOTE [Grouped heads]).',
         'Literal sizes at the channel axes are patched; an expanded model constant is adopted by its'
         ' reader.',
         'Repeated heads: equal copies per head (the fullest group\'s count), each copy all of its head\'s '
         'dims.',
         ),
     methods=("expand",), backward=_expand_backward, plan=_expand_plan, reads_input_presence=True,
     heads_aware=True, constant_view=_expand_constant_view, macs=no_cost)(_expand_forward)


def _expand_as_spec(ctx):
    """(x, other) when ``x.expand_as(other)`` keeps x's channels on an axis where ``other`` holds the same
    channels (ECA's ``x * y.expand_as(x)``), or None."""
    x, other = ctx.node.args[0], ctx.node.args[1]
    fact, other_fact, shape, out = _tracked(ctx, x), _tracked(ctx, other), ctx.shape(x), ctx.shape()
    if fact is None or other_fact is None or not fact.simple or not other_fact.simple or shape is None or out is None:
        return None
    axis = fact.axis + len(out) - len(shape)
    if other_fact.axis != axis or other_fact.size != fact.size:
        return None
    return x, other


def _expand_as_forward(ctx):
    """Exact: ``x.expand_as(other)`` repeats x along size-1 axes; when ``other`` holds channels on
    x's channel axis, the two couple (the size there is ``other``'s, so they keep the same channels)."""
    spec = _expand_as_spec(ctx)
    if spec is None:
        return opaque_forward(ctx)
    x, other = spec
    ctx.unify(ctx.units(x), ctx.units(other))
    fact = _tracked(ctx, x)
    return fact.moved(fact.axis + len(ctx.shape()) - len(ctx.shape(x))), ctx.units(x)


rule("expand_as", doc=(
         '`x.expand_as(other)`: values repeat along size-1 axes; x\'s channels couple with the channels '
         '`other` holds on the same axis (its size is read from `other`).',
         'Nothing itself: channels pass through, coupled with `other`\'s.',
         'Every channel of both when `other` is not tracked on x\'s channel axis.',
         ),
     methods=("expand_as",))(_expand_as_forward)


# ATen keys of these rules, with the torch-level signature (NOTE [ATen aliases] in functional.py);
# ``aten.expand`` takes its sizes as one list (the plan patches the list)
_aten = torch.ops.aten
REGISTRY.alias(torch.permute, _aten.permute.default)
REGISTRY.alias(torch.transpose, _aten.transpose.int)
REGISTRY.alias(torch.t, _aten.t.default)
REGISTRY.alias(torch.unsqueeze, _aten.unsqueeze.default)
REGISTRY.alias(torch.squeeze, _aten.squeeze.default, _aten.squeeze.dim, _aten.squeeze.dims)
REGISTRY.alias("expand", _aten.expand.default)
