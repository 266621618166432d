"""Shape rules: flatten and view/reshape (sizes: sizes.py; indexing and reductions: indexing.py).

NOTE [Literal sizes]
``x.view(-1, 400)`` bakes the channel count into the graph. When the tracked axis of
the result shrinks, the literal at that position is patched to the new size. A size
computed at run time at that position is either the size of coupled channels (it follows
them), or replaced by the kept count too (NOTE [Computed sizes] in kit/views.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx
from torch import nn

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import (coupled_size, entry_node, entry_where, may_change, merge_order, new_radix, no_cost, opaque_forward,
                  product_closure, uniform_digits, view_entries)


def _mapped(fact: ValueFact, units, axis: int, inner: int, outer: int):
    fact_out = ValueFact(axis, fact.size * inner * outer, np.tile(np.repeat(fact.const, inner), outer),
                         np.tile(np.repeat(fact.value, inner), outer))
    return fact_out, np.tile(np.repeat(units, inner), outer)


# -- flatten -----------------------------------------------------------------------------------------------

def _flatten_forward(ctx):
    """Exact: flattening moves channel ``c`` to a block of consecutive features."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    if fact is None or not fact.tracked or shape is None:
        return opaque_forward(ctx)
    if ctx.module is not None:
        start, end = ctx.module.start_dim, ctx.module.end_dim
    else:
        default_start = 0
        start, end = ctx.arg(1, "start_dim", default_start), ctx.arg(2, "end_dim", -1)
    rank = len(shape)
    if rank == 0:
        return opaque_forward(ctx)
    start, end = start % rank, end % rank
    axis = fact.axis
    if axis < start:
        return fact, ctx.units(x)
    if axis > end:
        return fact.moved(axis - (end - start)), ctx.units(x)
    outer = math.prod(shape[start:axis])
    inner = math.prod(shape[axis + 1 : end + 1])
    return _mapped(fact, ctx.units(x), start, inner, outer)


rule("flatten", doc=(
         'Always: channel `c` becomes a block of consecutive features.',
         "The block of every removed channel (the reader's columns follow).",
         'Every channel when the input is untracked.',
         ),
     modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",), macs=no_cost,
     )(_flatten_forward)


# -- view / reshape ------------------------------------------------------------------------------------------

def _groups(source, target):
    """Pair up runs of axes with equal products: [((i0, i1), (j0, j1)), ...], or None."""
    if math.prod(source) != math.prod(target) or 0 in source or 0 in target:
        return None
    groups, i, j = [], 0, 0
    while i < len(source) or j < len(target):
        i0, j0 = i, j
        pi = source[i] if i < len(source) else 1
        pj = target[j] if j < len(target) else 1
        i, j = min(i + 1, len(source)), min(j + 1, len(target))
        while pi != pj:
            if pi < pj:
                if i >= len(source):
                    return None
                pi *= source[i]
                i += 1
            else:
                if j >= len(target):
                    return None
                pj *= target[j]
                j += 1
        groups.append(((i0, i), (j0, j)))
    return groups


def _view_mapping(ctx):
    """(output fact, units) for a reshape, or None when the channel axis cannot be followed."""
    x = ctx.arg(0, "input")
    fact, source, target = ctx.fact(x), ctx.shape(x), ctx.shape()
    if fact is None or not fact.tracked or source is None or target is None:
        return None
    groups = _groups(source, target)
    if groups is None:
        return None
    if not fact.simple:
        return _view_split_axes(fact, ctx.units(x), groups, source, target)
    axis = fact.axis
    for (i0, i1), (j0, j1) in groups:
        if not i0 <= axis < i1:
            continue
        if j1 - j0 == 1:  # identity or merge into one axis
            return _mapped(fact, ctx.units(x), j0, math.prod(source[axis + 1 : i1]), math.prod(source[i0:axis]))
        if i1 - i0 == 1:  # split of the channel axis
            inner = math.prod(target[j0 + 1 : j1])
            units = ctx.units(x).reshape(-1, inner)
            const = fact.const.reshape(-1, inner)
            value = fact.value.reshape(-1, inner)
            if (units == units[:, :1]).all() and (const == const[:, :1]).all() and (value == value[:, :1]).all():
                # blocks of one unit (an unflatten of a flatten): follow the first part
                return ValueFact(j0, units.shape[0], const[:, 0], value[:, 0]), units[:, 0].copy()
            # NOTE [Heads]: d_model split into (heads, head_dim): the channels occupy both axes
            sizes = target[j0 + 1 : j1]
            return ValueFact(j0, fact.size, fact.const, fact.value,
                             tuple((j0 + 1 + k, size) for k, size in enumerate(sizes))), ctx.units(x)
        return None
    return None


def _view_split_axes(fact, units, groups, source, target):
    """A split channel axis through a reshape: kept axis by axis, or merged back into one."""
    axes = fact.axes
    owner = {}
    for (i0, i1), (j0, j1) in groups:
        for axis in axes:
            if i0 <= axis < i1:
                owner.setdefault((i0, i1, j0, j1), []).append(axis)
    if len(owner) == 1:
        (i0, i1, j0, j1), inside = next(iter(owner.items()))
        if j1 - j0 == 1 and list(range(i0, i1)) == list(axes):  # heads merged back: (H, hd) -> H*hd
            return ValueFact(j0, fact.size, fact.const, fact.value), units
        if j1 - j0 == 1 and list(range(i0, i1)) == sorted(axes):  # NOTE [Channel shuffle]: merged in another order
            order = merge_order(axes, fact.radix)
            return ValueFact(j0, fact.size, fact.const[order], fact.value[order]), units[order]
    # each group maps one digit to one axis, or merges adjacent digits into one (repeated key/value
    # heads (g, r) -> g * rep + r, NOTE [Grouped heads]): the channel numbering is unchanged
    goes_to, merged = {}, []
    for (i0, i1, j0, j1), inside in owner.items():
        if j1 - j0 != 1 or (i1 - i0 != 1 and inside != list(range(i0, i1))):
            return None
        goes_to.update({axis: j0 for axis in inside})
        merged.append(len(inside) > 1)
    if not any(merged):
        return fact.with_axes([goes_to[axis] for axis in axes]), units
    if list(axes) != sorted(axes):
        return None
    mapped, sizes = [], []
    for axis, size in zip(axes, fact.radix):
        if mapped and mapped[-1] == goes_to[axis]:
            sizes[-1] *= size
        else:
            mapped.append(goes_to[axis])
            sizes.append(size)
    if len(mapped) == 1:
        return ValueFact(mapped[0], fact.size, fact.const, fact.value), units
    return ValueFact(mapped[0], fact.size, fact.const, fact.value, tuple(zip(mapped[1:], sizes[1:]))), units


def _view_forward(ctx):
    """Exact: reshapes that keep the channel axis whole, merge it into one axis, or split it
    (into uniform blocks, or into heads) are followed with literal sizes patched; others keep
    every channel."""
    mapped = _view_mapping(ctx)
    if mapped is None:
        return opaque_forward(ctx)
    fact, units = mapped
    entries = view_entries(ctx.node) if fact.simple else None
    if entries is not None and entries[fact.axis][0] == "size" and entry_where(entries[fact.axis]) is None:
        source, axis = entries[fact.axis][1], entries[fact.axis][2]
        source_fact = ctx.fact(source)
        if (isinstance(source_fact, ValueFact) and source_fact.tracked and source_fact.simple
                and source_fact.axis == axis and source_fact.size == fact.size):
            ctx.unify(ctx.units(source), units)  # NOTE [Shape tuples]: the size read follows the view
    return mapped


def _view_backward(ctx):
    fact = ctx.fact(ctx.node)
    entries = view_entries(ctx.node)
    if entries is None or any(not (coupled_size(ctx, entries[axis], axis) or entry_where(entries[axis]) is not None)
                              for axis in fact.axes):
        ctx.require_all(ctx.node, "a size computed at run time shapes it")  # keep it unchanged
        return
    for axis in fact.axes:
        owner = entry_where(entries[axis])[0] if not coupled_size(ctx, entries[axis], axis) else None
        if owner is not None and owner is not ctx.node and len(owner.users) > 1:
            ctx.require_all(ctx.node, "its size tuple is shared with other readers")
            return
    source = ctx.fact(ctx.arg(0, "input"))
    if not fact.simple and len(source.axes) <= len(fact.axes):
        present = ctx.present()
        ctx.choose(ctx.node, uniform_digits(present, fact.radix), "keeps heads uniform (equal dims per head)")
    # a merge of finer digits ((g, r) -> h, NOTE [Grouped heads]): the rule that made them keeps
    # them uniform, which keeps the merged ones uniform; growing heads here, before the repeat has
    # given every copy its group's dims, would pick dims the group does not need
    shuffled = _shuffled_input(ctx)
    if shuffled is not None:
        ctx.require(ctx.node, product_closure(ctx.present(), shuffled.radix, merge_order(shuffled.axes, shuffled.radix)),
                    "a channel shuffle keeps the same positions in every kept group (NOTE [Channel shuffle])")


def _shuffled_input(ctx):
    """The input's split fact when this view merges it in another order (NOTE [Channel shuffle])."""
    fact_in = ctx.fact(ctx.arg(0, "input"))
    if not isinstance(fact_in, ValueFact) or not fact_in.tracked or fact_in.simple or not ctx.fact(ctx.node).simple:
        return None
    return fact_in if list(fact_in.axes) != sorted(fact_in.axes) else None


def _view_plan(ctx):
    fact = ctx.fact(ctx.node)
    kept = ctx.kept()
    if fact is None or not fact.tracked:
        return
    entries = view_entries(ctx.node)
    computed = [axis for axis in fact.axes if entries[axis][0] in ("size", "computed")
                and entry_where(entries[axis]) is not None and not coupled_size(ctx, entries[axis], axis)]
    if len(kept) == fact.size and not any(may_change(ctx, entry_node(entries[axis])) for axis in computed):
        return
    sizes = new_radix(kept, fact.radix) if not fact.simple else (int(len(kept)),)
    edits = {}  # owner node -> {(position, index): new size}
    for axis, size in zip(fact.axes, sizes):
        if (entries[axis][0] == "literal" and entries[axis][1] != -1) or axis in computed:
            owner, position, index = entry_where(entries[axis])
            edits.setdefault(owner, {})[(position, index)] = int(size)
    for owner, changes in edits.items():
        args = list(owner.args)
        for (position, index), size in changes.items():
            if owner is ctx.node and position[1] == "unpacked":
                args[position[0] + index] = size
                continue
            slot = position[0] if owner is ctx.node else position
            items = list(args[slot])
            items[index] = size
            args[slot] = type(args[slot])(items)
        if owner is ctx.node:
            ctx.patch(tuple(args))
        else:
            ctx.patch_node(owner, tuple(args), dict(owner.kwargs))


def _view_constant_view(node, root, axis):
    """NOTE [Constant views]: a view that only adds or drops size-1 axes (``bias.view(1, 1, 1, -1)``,
    GRN's per-channel parameters), or reshapes other axes around one it keeps whole (Swin's
    ``table[index].view(N, N, -1)``), keeps the source's axis."""
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or source.meta.get("tensor_meta") is None \
            or node.meta.get("tensor_meta") is None:
        return None
    before, after = tuple(source.meta["tensor_meta"].shape), tuple(node.meta["tensor_meta"].shape)
    kept_before = [a for a, size in enumerate(before) if size != 1]
    kept_after = [a for a, size in enumerate(after) if size != 1]
    if [before[a] for a in kept_before] == [after[a] for a in kept_after] and axis in kept_after:
        return source, kept_before[kept_after.index(axis)]
    for (i0, i1), (j0, j1) in _groups(before, after) or ():  # an axis that maps one to one (table.view(N, N, -1))
        if j0 <= axis < j1:
            return (source, i0) if i1 - i0 == 1 and j1 - j0 == 1 else None
    return None


def _reshape_as_forward(ctx):
    """Exact: ``x.reshape_as(y)`` is ``x.reshape(y.shape)``, followed when ``y``'s channels are the
    result's (coupled), so that ``y``'s run-time shape follows the kept channels."""
    mapped = _view_mapping(ctx)
    other = ctx.arg(1, "other")
    other_fact = ctx.fact(other)
    if mapped is None or not mapped[0].simple or not isinstance(other_fact, ValueFact) or not other_fact.tracked \
            or other_fact.axes != mapped[0].axes or other_fact.size != mapped[0].size:
        return opaque_forward(ctx)
    ctx.unify(ctx.units(other), mapped[1])
    return mapped


rule("reshape_as", doc=(
         '`x.reshape_as(y)` (LeViT\'s `bn(x.flatten(0, 1)).reshape_as(x)`) when `y`\'s channels couple '
         'with the result\'s: as `reshape`.',
         'Follows the channels (the shape is read from `y` at run time).',
         'Every channel when `y` is untracked or its channels sit elsewhere.',
         ),
     methods=("reshape_as", "view_as"), macs=no_cost)(_reshape_as_forward)


rule("view/reshape", doc=(
         'Reshapes that keep the channel axis whole, merge it into one axis, split it into uniform'
         ' blocks or heads, or merge split axes in another order (a channel shuffle: a permutation).',
         'Follows the channels; sizes at the channel axis are patched: literals, and numbers computed'
         ' at run time (`C // n_head`, `c * h * w` from `x.shape`) unless they read the size of '
         "coupled channels (`x.view(-1, x.size(-1))`), which follow by themselves.",
         'Every channel for other reshapes, or when the size at the channel axis is computed inside a '
         'tuple it cannot patch (HF: `x.size()[:-1]`); a channel shuffle keeps a product of groups and '
         'positions (NOTE [Channel shuffle]).',
         ),
     functions=(torch.reshape,), methods=("view", "reshape"),
     backward=_view_backward, plan=_view_plan, heads_aware=True, constant_view=_view_constant_view,
     macs=no_cost)(_view_forward)


# ``_unsafe_view`` is ``view`` without the aliasing guarantee: the same values and sizes
REGISTRY.alias(torch.reshape, torch.ops.aten._unsafe_view.default)
