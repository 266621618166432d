"""Rules that cut and join channel axes: cat, split/chunk (axis moves: axes.py).

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
from .api import REGISTRY, rule
from .kit import adopt_missing, coupled_join, no_cost, opaque_forward, tracked_fact


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
    facts = [tracked_fact(ctx, t) for t in tensors]
    if any(f is not None and not f.simple for f in facts):
        return _cat_heads(ctx, tensors, facts, dim)
    axes = {f.axis for f in facts if f is not None}
    if len(axes) != 1:
        axis = dim if not axes else None
        if axis is None:
            return opaque_forward(ctx)
    else:
        axis = axes.pop()
    if not adopt_missing(ctx, tensors, facts, axis):
        return opaque_forward(ctx)
    if axis == dim:
        return _concat_facts(facts, axis), np.concatenate([ctx.units(t) for t in tensors])
    return coupled_join(ctx, tensors, facts, axis) or opaque_forward(ctx)


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
     heads_aware=True, macs=no_cost)(_cat_forward)


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
    fact = tracked_fact(ctx, x)
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
                ctx.choose_units(units[grow], "chunk keeps its pieces equal")


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
     backward=_split_backward, plan=_split_plan, reads_input_presence=True, heads_aware=True,
     macs=no_cost)(_split_forward)


# ATen keys of these rules, with the torch-level signature (NOTE [ATen aliases] in functional.py)
_aten = torch.ops.aten
REGISTRY.alias(torch.split, _aten.split.Tensor, _aten.split_with_sizes.default)
REGISTRY.alias(torch.chunk, _aten.chunk.default)
REGISTRY.alias(torch.unbind, _aten.unbind.int)
