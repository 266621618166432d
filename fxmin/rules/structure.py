"""Rules that cut, join and move channel axes: cat, split/chunk, slicing, permute/transpose,
unsqueeze/squeeze, expand.

NOTE [Joins and cuts]
Concatenating along the channel axis concatenates the inputs' units, so each input
keeps its own channels and the result keeps their union in order. Concatenating along
another axis couples the inputs (like a residual add). Cutting along the channel axis
(split, chunk, slicing) hands each piece a slice of the units; the sizes written in
the call are patched to the kept counts of each piece.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.fx

from ..facts import TupleFact, ValueFact
from ..graph_helpers import tensor_shape
from .api import REGISTRY, rule
from .kit import expand_heads_backward, expand_heads_forward, expand_heads_plan, opaque_forward


def _tracked(ctx, node):
    fact = ctx.fact(node)
    if isinstance(fact, ValueFact) and fact.tracked:
        return fact
    return None


def _concat_facts(facts, axis):
    return ValueFact(axis, sum(f.size for f in facts), np.concatenate([f.const for f in facts]),
                     np.concatenate([f.value for f in facts]))


# -- cat -----------------------------------------------------------------------------------------------------

def _cat_forward(ctx):
    """Exact: along the channel axis the inputs' channels line up one after the other; along
    another axis the inputs couple. Model constants (class tokens) are adopted on that axis."""
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    shape = ctx.shape()
    if shape is None or not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
        return opaque_forward(ctx)
    rank = len(shape)
    dim = dim % rank
    facts = [_tracked(ctx, t) for t in tensors]
    if any(f is not None and not f.simple for f in facts):
        return _cat_heads(ctx, tensors, facts, dim)
    axes = {f.axis for f in facts if f is not None}
    if len(axes) != 1:
        axis = dim if not axes else None
        if axis is None:
            return opaque_forward(ctx)
    else:
        axis = axes.pop()
    for index, tensor in enumerate(tensors):
        if facts[index] is None:
            facts[index] = ctx.adopt(tensor, axis)
            if facts[index] is None:
                return opaque_forward(ctx)
    units = [ctx.units(t) for t in tensors]
    if axis == dim:
        return _concat_facts(facts, axis), np.concatenate(units)
    if len({f.size for f in facts}) != 1:
        return opaque_forward(ctx)
    for other in units[1:]:
        ctx.unify(units[0], other)
    const = np.logical_and.reduce([f.const for f in facts])
    same = np.logical_and.reduce([f.value == facts[0].value for f in facts])
    const &= same
    return ValueFact.constants(axis, const, np.where(const, facts[0].value, 0.0)), units[0]


def _cat_heads(ctx, tensors, facts, dim):
    """Tensors whose channels sit on (heads, head_dim): joined along head_dim (rotate_half's
    ``cat((-x2, x1), -1)``) the dims line up head by head; joined elsewhere they couple."""
    if any(f is None or f.simple or f.axes != facts[0].axes or f.radix[:-1] != facts[0].radix[:-1] for f in facts):
        return opaque_forward(ctx)
    units = [ctx.units(t) for t in tensors]
    first = facts[0]
    if dim == first.axes[-1]:
        prefix = first.radix[:-1]
        def joined(arrays, sizes):
            return np.concatenate([a.reshape(prefix + (n,)) for a, n in zip(arrays, sizes)], axis=-1).reshape(-1)
        sizes = [f.radix[-1] for f in facts]
        inner = first.inner[:-1] + ((first.axes[-1], sum(sizes)),)
        fact = ValueFact(first.axis, sum(f.size for f in facts), joined([f.const for f in facts], sizes),
                         joined([f.value for f in facts], sizes), inner)
        return fact, joined(units, sizes)
    if dim in first.axes or any(f.radix != first.radix for f in facts):
        return opaque_forward(ctx)
    for other in units[1:]:
        ctx.unify(units[0], other)
    const = np.logical_and.reduce([f.const for f in facts]) & np.logical_and.reduce([f.value == first.value for f in facts])
    return first.replaced(const, np.where(const, first.value, 0.0)), units[0]


rule("cat", doc=(
         "Always: along the channel axis the inputs' channels line up one after the other (offsets); "
         'along another axis the inputs couple. Model constants (class tokens) are adopted on that '
         'axis.',
         "Each input's removed channels.",
         "Every channel when an input's channel axis cannot be followed.",
         ),
     functions=(torch.cat, torch.concat, torch.concatenate),
     heads_aware=True)(_cat_forward)


# -- split / chunk --------------------------------------------------------------------------------------------

def _split_spec(ctx):
    """(sizes of the pieces, dim) for split/chunk/unbind nodes, or None."""
    node = ctx.node
    x = node.args[0]
    shape = ctx.shape(x)
    if shape is None:
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "overloadpacket", node.target).__name__
    if name == "unbind":
        dim = ctx.arg(1, "dim", 0) % len(shape)
        return [1] * shape[dim], dim, name
    dim = ctx.arg(2, "dim", 0) % len(shape)
    length = shape[dim]
    if name == "chunk":
        chunks = ctx.arg(1, "chunks")
        step = -(-length // chunks)
        sizes = [min(step, length - start) for start in range(0, length, step)]
    else:
        split = ctx.arg(1, "split_size_or_sections", ctx.arg(1, "split_size"))
        if isinstance(split, int):
            sizes = [min(split, length - start) for start in range(0, length, split)]
        elif isinstance(split, (list, tuple)) and all(isinstance(s, int) for s in split):
            sizes = list(split)
        else:
            return None
    return sizes, dim, name


def _split_forward(ctx):
    """Exact: cutting along the channel axis gives each piece its slice of the channels (sizes
    patched); cutting along another axis gives every piece all of them."""
    x = ctx.arg(0, "input")
    fact = _tracked(ctx, x)
    spec = _split_spec(ctx)
    if fact is None or spec is None:
        return None, None
    sizes, dim, name = spec
    units = ctx.units(x)
    if not fact.simple:
        result, extra = _split_heads(fact, units, sizes, dim, name, x)
        if isinstance(extra, tuple) and extra and extra[0] == "unify":
            for other in extra[1][1:]:
                ctx.unify(extra[1][0], other)
            extra = None
        return result, extra
    if dim != fact.axis:
        axis = fact.axis - (1 if name == "unbind" and dim < fact.axis else 0)
        moved = fact.moved(axis)
        return TupleFact(tuple(moved for _ in sizes), tuple(units for _ in sizes), x), None
    if name == "unbind":
        return None, None  # pieces are single channels: kept whole (see backward)
    bounds = np.cumsum([0] + sizes)
    parts = tuple(ValueFact(fact.axis, e - s, fact.const[s:e], fact.value[s:e]) for s, e in zip(bounds[:-1], bounds[1:]))
    return TupleFact(parts, tuple(units[s:e] for s, e in zip(bounds[:-1], bounds[1:])), x), None


def _split_heads(fact, units, sizes, dim, name, x):
    """Cut a split channel axis (e.g. fused qkv as (3, heads, head_dim)) along its outer digit
    into whole pieces, or along an axis it does not occupy."""
    shift = (lambda axis: axis - 1 if axis > dim else axis) if name == "unbind" else (lambda axis: axis)
    if dim not in fact.axes:
        moved = fact.with_axes([shift(a) for a in fact.axes])
        return TupleFact(tuple(moved for _ in sizes), tuple(units for _ in sizes), x), None
    if dim == fact.axes[-1] and len(set(sizes)) == 1 and fact.radix[-1] % len(sizes) == 0 and name == "chunk":
        return _split_innermost(fact, units, len(sizes), x)
    if dim != fact.axis or name != "unbind" or len(fact.inner) < 2:
        return None, None
    per = fact.size // fact.radix[0]
    inner_axes = [shift(a) for a, _ in fact.inner]
    parts, pieces = [], []
    for index in range(fact.radix[0]):
        cut = slice(index * per, (index + 1) * per)
        parts.append(ValueFact(inner_axes[0], per, fact.const[cut], fact.value[cut],
                               tuple((a, size) for a, (_, size) in zip(inner_axes[1:], fact.inner[1:]))))
        pieces.append(units[cut])
    return TupleFact(tuple(parts), tuple(pieces), x), None


def _split_innermost(fact, units, pieces, x):
    """NOTE [Rotary pairs]: equal pieces of the head dim (``x.chunk(2, -1)`` in rotate_half) keep
    the same dims: dim ``e`` of each piece couples with dim ``e`` of the others, so the pieces stay
    equal and rotary pairs ``(e, e + hd/2)`` stay or go together."""
    radix = fact.radix
    grid = units.reshape(radix[:-1] + (pieces, radix[-1] // pieces))
    const = fact.const.reshape(grid.shape)
    value = fact.value.reshape(grid.shape)
    parts, piece_units = [], []
    inner = tuple((a, size) for a, size in fact.inner[:-1]) + ((fact.axes[-1], radix[-1] // pieces),)
    for index in range(pieces):
        piece = grid[..., index, :].reshape(-1)
        piece_units.append(piece)
        parts.append(ValueFact(fact.axis, piece.size, const[..., index, :].reshape(-1),
                               value[..., index, :].reshape(-1), inner))
    return TupleFact(tuple(parts), tuple(piece_units), x), ("unify", piece_units)


def _split_backward(ctx):
    spec = _split_spec(ctx)
    fact = ctx.fact(ctx.node)
    if spec[2] == "chunk" and spec[1] == fact.parts[0].axis and fact.parts[0].simple:
        # chunk(n) makes equal pieces: keep the same count in each (NOTE [Joins and cuts])
        present = [ctx.present_units(units) for units in fact.units]
        target = max(int(p.sum()) for p in present)
        for units, mask in zip(fact.units, present):
            missing = target - int(mask.sum())
            if missing:
                grow = np.zeros_like(mask)
                grow[np.nonzero(~mask)[0][:missing]] = True
                ctx.require_units(units[grow], "chunk keeps its pieces equal")


def _split_plan(ctx):
    fact = ctx.fact(ctx.node)
    if not isinstance(fact, TupleFact):
        return
    sizes, dim, name = _split_spec(ctx)
    if dim != fact.parts[0].axis or not fact.parts[0].simple or name == "unbind":
        return
    kept = [int(ctx.present_units(units).sum()) for units in fact.units]
    if kept == sizes:
        return
    x = ctx.node.args[0]
    if name == "chunk":
        if len(set(kept)) == 1 and ctx.node.op == "call_method":
            return  # equal pieces: chunk(n) still cuts them right
        ctx.patch((x, kept, dim), {}, op="call_function", target=torch.split)
        return
    if isinstance(ctx.node.target, torch._ops.OpOverload):  # aten.split.Tensor takes one size: sizes go to its twin
        ctx.patch((x, kept, dim), {}, target=torch.ops.aten.split_with_sizes.default)
        return
    args = list(ctx.node.args)
    if len(args) > 1:
        args[1] = kept
        ctx.patch(tuple(args), {k: v for k, v in ctx.node.kwargs.items() if k not in ("split_size_or_sections", "split_size")})
    else:
        kwargs = dict(ctx.node.kwargs)
        kwargs["split_size_or_sections" if "split_size_or_sections" in kwargs else "split_size"] = kept
        ctx.patch(tuple(args), kwargs)


rule("split", doc=(
         'Always: cutting along the channel axis gives each piece its slice of the channels; along '
         'another axis every piece has all of them.',
         'Channels within each piece; split sizes are patched.',
         'Every channel when the sizes cannot be patched.',
         ),
     functions=(torch.split, torch.chunk, torch.unbind), methods=("split", "chunk", "unbind"),
     backward=_split_backward, plan=_split_plan, reads_input_presence=True, heads_aware=True)(_split_forward)


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
     heads_aware=True, constant_view=_moved_constant_view)(_permute_forward)
rule("transpose", doc=(
         'Always: the channel axis swaps with another.',
         'Nothing itself.',
         '—',
         ),
     functions=(torch.transpose, torch.t, torch.swapaxes), methods=("transpose", "t", "swapaxes"),
     heads_aware=True, constant_view=_moved_constant_view)(_transpose_forward)
rule("unsqueeze", doc=(
         'Always: a new size-1 axis shifts the channel axis (every axis of attention heads).',
         'Nothing itself.',
         '—',
         ),
     functions=(torch.unsqueeze,), methods=("unsqueeze",), heads_aware=True,
     constant_view=_moved_constant_view)(_unsqueeze_forward)
rule("squeeze", doc=(
         'Removing size-1 axes other than the channel axis.',
         'Nothing itself.',
         'Every channel when the channel axis itself could be squeezed.',
         ),
     functions=(torch.squeeze,), methods=("squeeze",))(_squeeze_forward)


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
     heads_aware=True, constant_view=_expand_constant_view)(_expand_forward)


# ATen keys of these rules, with the torch-level signature (NOTE [ATen aliases] in functional.py);
# ``aten.expand`` takes its sizes as one list (the plan patches the list)
_aten = torch.ops.aten
REGISTRY.alias(torch.permute, _aten.permute.default)
REGISTRY.alias(torch.transpose, _aten.transpose.int)
REGISTRY.alias(torch.t, _aten.t.default)
REGISTRY.alias(torch.unsqueeze, _aten.unsqueeze.default)
REGISTRY.alias(torch.squeeze, _aten.squeeze.default, _aten.squeeze.dim, _aten.squeeze.dims)
REGISTRY.alias(torch.split, _aten.split.Tensor, _aten.split_with_sizes.default)
REGISTRY.alias(torch.chunk, _aten.chunk.default)
REGISTRY.alias(torch.unbind, _aten.unbind.int)
REGISTRY.alias("expand", _aten.expand.default)
