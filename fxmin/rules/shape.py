"""Shape rules: flatten and view/reshape (sizes: sizes.py; indexing and reductions: indexing.py).

NOTE [Literal sizes]
``x.view(-1, 400)`` bakes the channel count into the graph. When the tracked axis of
the result shrinks, the literal at that position is patched to the new size. A size
computed at run time (``x.size(1)``) is left alone: reading the size of a tracked
axis pins that axis (every channel kept), so such sizes never change.
"""
from __future__ import annotations

import builtins
import math
import operator

import numpy as np
import torch
import torch.fx
from torch import nn

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import coupled_size, new_radix, opaque_forward, uniform_digits, view_entries


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
     modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",),
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
    if entries is not None and entries[fact.axis][0] == "size":
        _, source, axis = entries[fact.axis]
        source_fact = ctx.fact(source)
        if (isinstance(source_fact, ValueFact) and source_fact.tracked and source_fact.simple
                and source_fact.axis == axis and source_fact.size == fact.size):
            ctx.unify(ctx.units(source), units)  # NOTE [Shape tuples]: the size read follows the view
    return mapped


def _view_backward(ctx):
    fact = ctx.fact(ctx.node)
    entries = view_entries(ctx.node)
    if entries is None or any(not (entries[axis][0] == "literal" or coupled_size(ctx, entries[axis], axis))
                              for axis in fact.axes):
        ctx.require_all(ctx.node, "a size computed at run time shapes it")  # keep it unchanged
        return
    for axis in fact.axes:
        owner = entries[axis][2][0] if entries[axis][0] == "literal" else None
        if owner is not None and owner is not ctx.node and len(owner.users) > 1:
            ctx.require_all(ctx.node, "its size tuple is shared with other readers")
            return
    source = ctx.fact(ctx.arg(0, "input"))
    if not fact.simple and len(source.axes) <= len(fact.axes):
        present = ctx.present()
        ctx.require(ctx.node, uniform_digits(present, fact.radix), "keeps heads uniform (equal dims per head)")
    # a merge of finer digits ((g, r) -> h, NOTE [Grouped heads]): the rule that made them keeps
    # them uniform, which keeps the merged ones uniform; growing heads here, before the repeat has
    # given every copy its group's dims, would pick dims the group does not need


def _view_plan(ctx):
    fact = ctx.fact(ctx.node)
    kept = ctx.kept()
    if fact is None or not fact.tracked or len(kept) == fact.size:
        return
    entries = view_entries(ctx.node)
    sizes = new_radix(kept, fact.radix) if not fact.simple else (int(len(kept)),)
    edits = {}  # owner node -> {(position, index): new size}
    for axis, size in zip(fact.axes, sizes):
        if entries[axis][0] == "literal" and entries[axis][1] != -1:
            owner, position, index = entries[axis][2]
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


rule("view/reshape", doc=(
         'Reshapes that keep the channel axis whole, merge it into one axis, or split it into uniform'
         ' blocks or heads.',
         'Follows the channels; literal sizes at the channel axis are patched.',
         'Every channel for other reshapes, and when the size at the channel axis is computed at run '
         "time, unless it is read from a tensor whose channels couple with the view's (`x.view(-1, "
         "x.size(-1))`, HF's `x.size()[:-1] + (4, 16)`: literals inside the `operator.add` tuple are "
         'patched).',
         ),
     functions=(torch.reshape,), methods=("view", "reshape"),
     backward=_view_backward, plan=_view_plan, heads_aware=True)(_view_forward)


# ``_unsafe_view`` is ``view`` without the aliasing guarantee: the same values and sizes
REGISTRY.alias(torch.reshape, torch.ops.aten._unsafe_view.default)
