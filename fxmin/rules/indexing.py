"""Indexing (pieces of a split, sizes, tensor slices) and reductions over non-channel axes."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx

from ..facts import TupleFact, ValueFact
from .api import REGISTRY, rule
from .kit import index_new_axes_forward, no_cost, opaque_backward, opaque_forward, per_input


# -- indexing ---------------------------------------------------------------------------------------------------

def _getitem_forward(ctx):
    """Exact: picking a piece of a split takes that piece's channels; indexing a size reads no
    channel; indexing a tensor is followed when the indices before the channel axis are full
    slices and the channel axis is taken whole or sliced with step 1 (bounds patched)."""
    source, index = ctx.node.args
    fact = ctx.fact(source)
    shape = ctx.shape()
    if isinstance(fact, TupleFact):
        if isinstance(index, int) and -len(fact.parts) <= index < len(fact.parts):
            return fact.parts[index], fact.units[index]
        return (ValueFact.untracked() if shape is not None else None), None
    if fact is None or not fact.tracked:
        return (ValueFact.untracked() if shape is not None else None), None
    moved = index_new_axes_forward(ctx)  # x[:, :, None]: NOTE [Grouped heads]
    if moved is not None:
        return moved
    if not fact.simple:
        return opaque_forward(ctx)
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(item, torch.fx.Node) or item is Ellipsis or item is None for item in items[: fact.axis + 1]):
        return opaque_forward(ctx)
    if any(isinstance(item, torch.fx.Node) for item in items):
        return opaque_forward(ctx)
    full = slice(None, None, None)
    if any(item != full for item in items[: fact.axis]):
        return opaque_forward(ctx)
    if len(items) <= fact.axis or items[fact.axis] == full:
        return fact, ctx.units(source)
    cut = items[fact.axis]
    if not isinstance(cut, slice) or cut.step not in (None, 1):
        return opaque_forward(ctx)
    start, stop, _ = cut.indices(fact.size)
    piece = ValueFact(fact.axis, max(stop - start, 0), fact.const[start:stop], fact.value[start:stop])
    return piece, ctx.units(source)[start:stop]


def _getitem_plan(ctx):
    source, index = ctx.node.args
    fact = ctx.fact(source)
    if not isinstance(fact, ValueFact) or not fact.tracked or not ctx.fact(ctx.node).tracked:
        return
    items = index if isinstance(index, tuple) else (index,)
    if len(items) <= fact.axis or not isinstance(items[fact.axis], slice) or items[fact.axis] == slice(None):
        return
    present = ctx.present(source)
    start, stop, _ = items[fact.axis].indices(fact.size)
    if present.all():
        return
    cut = slice(int(present[:start].sum()), int(present[:stop].sum()))
    items = list(items)
    items[fact.axis] = cut
    ctx.patch((source, tuple(items) if isinstance(index, tuple) else cut), {})


def _getitem_constant_view(node, root, axis):
    """NOTE [Constant views]: a table sliced along other axes (``self.cos[:T]``) keeps ``axis`` whole."""
    source, index = node.args
    meta = index.meta.get("tensor_meta") if isinstance(index, torch.fx.Node) else None
    if meta is not None and isinstance(source, torch.fx.Node) and not meta.dtype.is_floating_point \
            and meta.dtype is not torch.bool:
        # rows gathered by an integer index (Swin's table[relative_position_index]): the other axes stay whole
        rank = len(meta.shape)
        return (source, axis - rank + 1) if axis >= rank else None
    index = index if isinstance(index, tuple) else (index,)
    if not isinstance(source, torch.fx.Node) or not all(isinstance(i, slice) for i in index):
        return None
    return (source, axis) if axis >= len(index) or index[axis] == slice(None) else None


def _getitem_backward(ctx):
    source = ctx.node.args[0]
    fact_in = ctx.fact(source)
    fact = ctx.fact(ctx.node)
    if isinstance(fact_in, ValueFact) and fact_in.tracked and (fact is None or not fact.tracked):
        ctx.require_all(source)


rule("getitem", doc=(
         'Picking a piece of a split; indexing a size; indexing a tensor with full slices before the '
         'channel axis and the channel axis whole or sliced with step 1.',
         'Follows the channels; slice bounds on the channel axis are patched.',
         'Every channel for other indexing (advanced indices, steps, indices before the channel '
         'axis but full slices and `None`).',
         ),
     functions=(operator.getitem,), backward=_getitem_backward, plan=_getitem_plan,
     heads_aware=True, backward_untracked=True, constant_view=_getitem_constant_view, macs=no_cost)(_getitem_forward)


# -- reductions ---------------------------------------------------------------------------------------------------
#
# NOTE [Channel means]
# A mean over the channel axis (ConvNeXt-V2's GRN: ``Gx / Gx.mean(dim=-1, keepdim=True)``) mixes
# every channel, and a removed channel still counts: its constant adds ``c · m`` to the sum (``m``
# reduced elements per channel) and 1 to the divisor. So only constant channels may leave, and the
# call becomes ``(x.sum(dim) + S) / N``, with ``S`` the removed constants' share of the sum and ``N``
# the original count (:func:`sum_with_removed`); ``sum`` keeps ``N = 1``. As for
# CompensatedLayerNorm, the statistics keep what left (compensated-layernorm.md).


def _reduce_spec(ctx):
    """(input, fact, shape, reduced axes, keepdim, name) of a mean/sum/amax/amin with literal axes, or None."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    dims = ctx.arg(1, "dim")
    keepdim = ctx.arg(2, "keepdim", False)
    if fact is None or not fact.tracked or shape is None or dims is None or ctx.node.kwargs.get("dtype") is not None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
        return None
    target = ctx.node.target
    name = target if isinstance(target, str) else getattr(target, "overloadpacket", target).__name__
    return x, fact, shape, {d % len(shape) for d in dims}, keepdim, name


def _over_channels(spec) -> bool:
    """A mean or sum whose reduced axes include the (single) channel axis (NOTE [Channel means])."""
    return spec is not None and spec[1].simple and spec[1].axis in spec[3] and spec[5] in ("mean", "sum")


def _reduce_forward(ctx):
    """Exact when the reduced axes exclude the channel axis: mean/amax keep a constant, sum
    multiplies it by the number of reduced elements. A mean or sum over the channel axis keeps
    the removed constants' share (NOTE [Channel means])."""
    spec = _reduce_spec(ctx)
    if spec is None or spec[1].axis in spec[3]:
        return opaque_forward(ctx)
    x, fact, shape, dims, keepdim, name = spec
    axis = fact.axis if keepdim else fact.axis - sum(1 for d in dims if d < fact.axis)
    value = fact.value
    if name == "sum":
        value = value * math.prod(shape[d] for d in dims)
    return ValueFact.constants(axis, fact.const, value), ctx.units(x)


def _reduce_backward(ctx):
    spec = _reduce_spec(ctx)
    fact = ctx.fact(ctx.node)
    if isinstance(fact, ValueFact) and fact.tracked:
        return  # channels pass through
    if _over_channels(spec):
        ctx.require(spec[0], spec[1].varying_mask, "feeds a mean over channels (only constant channels can leave)")
        return
    opaque_backward(ctx)


def sum_with_removed(x, dim, keepdim: bool, removed: float, count: int):
    """``(x.sum(dim, keepdim) + removed) / count``: a mean (or sum, ``count=1``) over channels some of
    which left as constants (NOTE [Channel means])."""
    return (x.sum(dim, keepdim=keepdim) + removed) / count


def _reduce_plan(ctx):
    spec = _reduce_spec(ctx)
    if not _over_channels(spec):
        return
    x, fact, shape, dims, keepdim, name = spec
    present = ctx.present(x)
    if present.all():
        return
    per_channel = math.prod(shape[d] for d in dims if d != fact.axis)
    removed = float(fact.value[~present].sum()) * per_channel
    count = math.prod(shape[d] for d in dims) if name == "mean" else 1
    ctx.patch((x, tuple(sorted(dims)), keepdim, removed, count), {}, op="call_function", target=sum_with_removed)


rule("reduction", doc=(
         'Reductions over axes other than the channel axis: mean/amax/amin keep a constant, sum '
         'multiplies it by the number of reduced elements. A mean or sum over the channel axis (GRN) '
         'becomes `(x.sum(dim) + S) / N`: the removed constants\' share and the original count.',
         'Nothing itself: channels pass through; over the channel axis, constant channels (NOTE [Channel means]).',
         'Every channel for amax/amin over the channel axis, or when `dim`/`dtype` are not literals; '
         'varying channels under a mean or sum over the channel axis.',
         ),
     functions=(torch.mean, torch.sum, torch.amax, torch.amin), methods=("mean", "sum", "amax", "amin"),
     backward=_reduce_backward, plan=_reduce_plan, backward_untracked=True, macs=per_input)(_reduce_forward)


# -- index_select with a constant index (what minimize writes at the inputs) -----------------------------------

def _index_select_spec(ctx):
    x, dim, index = ctx.arg(0, "input"), ctx.arg(1, "dim"), ctx.arg(2, "index")
    fact, shape = ctx.fact(x), ctx.shape(x)
    value = ctx.attr_value(index)
    if fact is None or not fact.tracked or not fact.simple or shape is None or value is None or not isinstance(dim, int):
        return None
    if dim % len(shape) != fact.axis or len(index.users) > 1:
        return None
    return x, fact, value.long().numpy(), index


def _index_select_forward(ctx):
    """Exact: selecting channels with a constant index maps each output channel to its source
    (a minimized model minimized again); the index is rewritten for the channels that stay."""
    spec = _index_select_spec(ctx)
    if spec is None:
        return opaque_forward(ctx)
    x, fact, index, _ = spec
    picked = ValueFact(fact.axis, len(index), fact.const[index], fact.value[index])
    return picked, ctx.units(x)[index]


def _index_select_backward(ctx):
    if _index_select_spec(ctx) is None:
        opaque_backward(ctx)


def _index_select_plan(ctx):
    spec = _index_select_spec(ctx)
    if spec is None:
        return
    x, fact, index, index_node = spec
    present_in = ctx.present(x)
    kept_out = ctx.kept()
    if present_in.all() and len(kept_out) == len(index):
        return
    if x.op == "placeholder" and len(x.users) == 1:
        # the selection minimize wrote at an input: select straight from the input (no second select)
        ctx.select_input_here(x)
        ctx.replace_attr(index_node, torch.as_tensor(index[kept_out], dtype=torch.float64))
        return
    position = np.cumsum(present_in) - 1  # where each kept input channel lands in the smaller input
    ctx.replace_attr(index_node, torch.as_tensor(position[index[kept_out]], dtype=torch.float64))


rule("index_select", doc=(
         'With a constant index along the channel axis (what minimize writes at the inputs): each '
         'output channel maps to its source.',
         'Channels nobody reads; the index is rewritten, so a minimized module minimizes again.',
         'A computed index, or one along another axis: every channel of the input.',
         ),
     functions=(torch.index_select,), methods=("index_select",), backward=_index_select_backward,
     backward_untracked=True,
     plan=_index_select_plan, macs=no_cost)(_index_select_forward)


# ATen keys of these rules, with the torch-level signature (NOTE [ATen aliases] in functional.py)
_aten = torch.ops.aten
REGISTRY.alias(torch.sum, _aten.sum.dim_IntList)
REGISTRY.alias(torch.amax, _aten.amax.default)
REGISTRY.alias(torch.amin, _aten.amin.default)
REGISTRY.alias(torch.index_select, _aten.index_select.default)


# -- advanced indexing on the leading axes (torch.export's ``x[rows, tokens]``) ------------------------------------

def _advanced_index_forward(ctx):
    """Exact: ``aten.index.Tensor(x, [i0, ..., ik])`` with index tensors on leading axes before the
    channel axis picks whole rows: the channel axis keeps its channels, at its place after the
    broadcast index axes. An index on the channel axis (or a skipped axis) keeps every channel."""
    x, indices = ctx.arg(0, "self"), ctx.arg(1, "indices")
    fact, shape, out = ctx.fact(x), ctx.shape(x), ctx.shape()
    if fact is None or not fact.tracked or not fact.simple or shape is None or out is None \
            or not isinstance(indices, (list, tuple)) or any(i is None for i in indices) or fact.axis < len(indices):
        return opaque_forward(ctx)
    return fact.moved(len(out) - (len(shape) - fact.axis)), ctx.units(x)


rule("advanced index", doc=(
         '`aten.index.Tensor` with index tensors on leading axes before the channel axis (a pooled token).',
         'Nothing itself: channels pass through.',
         'Every channel when the channel axis (or an axis before it) is indexed or skipped.',
         ),
     functions=(torch.ops.aten.index.Tensor,), macs=no_cost)(_advanced_index_forward)


def _argmax_forward(ctx):
    """Exact: indices carry no channel; every channel of the input is kept."""
    return opaque_forward(ctx)


rule("argmax", doc=(
         'Always: `argmax`/`argmin` give indices, which carry no channel.',
         '—',
         'Every channel of the input.',
         ),
     functions=(torch.argmax, torch.argmin, torch.ops.aten.argmax.default, torch.ops.aten.argmin.default),
     methods=("argmax", "argmin"), backward=opaque_backward)(_argmax_forward)



# -- narrow along another axis (a rotary table cut to the sequence length) ---------------------------------------

def _narrow_forward(ctx):
    """Exact: narrowing an axis the channels do not occupy keeps every channel (a model constant
    narrowed so is adopted by its reader); narrowing the channel axis keeps all of it."""
    x, dim = ctx.arg(0, "input"), ctx.arg(1, "dim")
    fact, shape = ctx.fact(x), ctx.shape(x)
    if fact is None or not fact.tracked or shape is None or not isinstance(dim, int) or dim % len(shape) in fact.axes:
        return opaque_forward(ctx)
    return fact, ctx.units(x)


def _narrow_constant_view(node, root, axis):
    """NOTE [Constant views]: a table narrowed along another axis (``self.cos.narrow(0, 0, T)``)
    keeps ``axis`` whole."""
    source, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(source, torch.fx.Node) or not isinstance(dim, int) or source.meta.get("tensor_meta") is None:
        return None
    return (source, axis) if dim % len(source.meta["tensor_meta"].shape) != axis else None


rule("narrow", doc=(
         'Along an axis the channels do not occupy (a rotary table cut to the sequence length).',
         'Nothing itself; a narrowed model constant is adopted by its reader.',
         'Every channel when the channel axis itself is narrowed.',
         ),
     functions=(torch.narrow,), methods=("narrow",), heads_aware=True,
     constant_view=_narrow_constant_view, macs=no_cost)(_narrow_forward)
