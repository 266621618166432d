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
from .pointwise import _opaque, opaque_backward
from .registry import rule
from .shuffle import merge_order, product_closure


def _mapped(fact: ValueFact, units, axis: int, inner: int, outer: int):
    fact_out = ValueFact(axis, fact.size * inner * outer, np.tile(np.repeat(fact.const, inner), outer),
                         np.tile(np.repeat(fact.value, inner), outer))
    return fact_out, np.tile(np.repeat(units, inner), outer)


def _tracked_backward(ctx):
    fact = ctx.fact(ctx.node)
    if fact is None or not fact.tracked:
        opaque_backward(ctx)


# -- flatten -----------------------------------------------------------------------------------------------

def _flatten_forward(ctx):
    """Exact: flattening moves channel ``c`` to a block of consecutive features."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    if fact is None or not fact.tracked or shape is None:
        return _opaque(ctx)
    if ctx.module is not None:
        start, end = ctx.module.start_dim, ctx.module.end_dim
    else:
        default_start = 0
        start, end = ctx.arg(1, "start_dim", default_start), ctx.arg(2, "end_dim", -1)
    rank = len(shape)
    if rank == 0:
        return _opaque(ctx)
    start, end = start % rank, end % rank
    axis = fact.axis
    if axis < start:
        return fact, ctx.units(x)
    if axis > end:
        return fact.moved(axis - (end - start)), ctx.units(x)
    outer = math.prod(shape[start:axis])
    inner = math.prod(shape[axis + 1 : end + 1])
    return _mapped(fact, ctx.units(x), start, inner, outer)


rule("flatten", modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",),
     backward=_tracked_backward)(_flatten_forward)


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
    mapped = []
    for (i0, i1, j0, j1), inside in owner.items():
        if i1 - i0 != 1 or j1 - j0 != 1:
            return None
        mapped.append(j0)
    return fact.with_axes(mapped), units


def _shape_arguments(node):
    """(list of shape entries, position of the first entry in node.args, packed-as-tuple)."""
    if node.op == "call_function":  # torch.reshape(x, shape)
        return list(node.args[1]) if isinstance(node.args[1], (tuple, list)) else [node.args[1]], 1, True
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return list(node.args[1]), 1, True
    return list(node.args[1:]), 1, False


# NOTE [Shape tuples]
# A view's sizes are literals (``view(B, T, 4, 16)``), sizes read at run time (``x.size(0)``), or
# a tuple computed in the graph (HF: ``x.size()[:-1] + (4, 16)``, an ``operator.add`` of a slice
# of a size and a literal tuple). ``_view_entries`` resolves them to one entry per output axis:
# ("literal", value, where) with ``where`` saying which node's argument holds it, so the plan can
# patch it; ("size", source, axis) for a run-time read of ``source.size(axis)``; ("unknown",).

def _literal_entries(value, owner, position):
    entries = []
    for index, item in enumerate(value):
        if isinstance(item, int):
            entries.append(("literal", item, (owner, position, index)))
        else:
            entries.append(_size_entry(item) if isinstance(item, torch.fx.Node) else ("unknown",))
    return entries


def _size_entry(node):
    """("size", source, axis) when ``node`` reads one size of a tensor at run time."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        source, dim = node.args
    elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)
          and isinstance(node.args[0], torch.fx.Node) and _whole_size(node.args[0])):
        source, dim = node.args[0].args[0], node.args[1]
    else:
        return ("unknown",)
    rank = len(source.meta["tensor_meta"].shape) if source.meta.get("tensor_meta") is not None else None
    return ("size", source, dim % rank) if rank else ("unknown",)


def _whole_size(node) -> bool:
    return (node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs) or (
        node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape")


def _tuple_entries(node):
    """Entries of a tuple computed in the graph, or None when it cannot be followed."""
    if _whole_size(node) or (node.op == "call_function" and node.target is operator.getitem
                             and isinstance(node.args[1], slice) and _whole_size(node.args[0])):
        whole = node if _whole_size(node) else node.args[0]
        source = whole.args[0]
        if source.meta.get("tensor_meta") is None:
            return None
        axes = range(len(source.meta["tensor_meta"].shape))
        axes = axes if whole is node else axes[node.args[1]]
        return [("size", source, axis) for axis in axes]
    if node.op == "call_function" and node.target is operator.add and len(node.args) == 2 and not node.kwargs:
        entries = []
        for position, part in enumerate(node.args):
            if isinstance(part, tuple):
                entries += _literal_entries(part, node, position)
            elif isinstance(part, torch.fx.Node):
                inner = _tuple_entries(part)
                if inner is None:
                    return None
                entries += inner
            else:
                return None
        return entries
    return None


def _view_entries(node):
    """One entry per output axis of a view/reshape (NOTE [Shape tuples]), or None."""
    entries, position, packed = _shape_arguments(node)
    if len(entries) == 1 and isinstance(entries[0], torch.fx.Node) and entries[0].meta.get("type") is not int:
        found = _tuple_entries(entries[0])  # view(shape) with the shape computed in the graph
    elif packed:
        found = _literal_entries(entries, node, (position, "packed"))
    else:
        found = _literal_entries(entries, node, (position, "unpacked"))
    shape = node.meta.get("tensor_meta")
    if found is None or shape is None or len(found) != len(shape.shape):
        return None
    return found


def _coupled_size(ctx, entry, axis, view=None) -> bool:
    """A run-time size read that yields the new size by itself: ``source.size(a)`` where the
    source's channels on ``a`` are coupled with the view's channels on ``axis`` (the view's
    forward couples them), as in ``x.view(-1, x.size(-1))``."""
    view = ctx.node if view is None else view
    if entry[0] != "size":
        return False
    fact, source_fact = ctx.fact(view), ctx.fact(entry[1])
    return (isinstance(source_fact, ValueFact) and source_fact.tracked and source_fact.simple
            and isinstance(fact, ValueFact) and fact.tracked and fact.simple
            and source_fact.axis == entry[2] and fact.axis == axis and source_fact.size == fact.size
            and ctx.units(entry[1]) is not None and np.array_equal(ctx.units(entry[1]), ctx.units(view)))


def _feeds_coupled_views(ctx, read, source, axis) -> bool:
    """True when the size ``read`` (of ``source`` on ``axis``) only shapes views at positions
    whose channels are coupled with it (NOTE [Shape tuples]): its run-time value is then the
    new size by itself."""
    for user in read.users:
        if user.op == "call_function" and user.target is operator.add and user.meta.get("tensor_meta") is None:
            if not _feeds_coupled_views(ctx, user, source, axis):
                return False
            continue
        if not (user.op in ("call_method", "call_function") and user.target in ("view", "reshape", torch.reshape)):
            return False
        entries = _view_entries(user)
        if entries is None:
            return False
        if not all(_coupled_size(ctx, entry, position, user) for position, entry in enumerate(entries)
                   if entry[0] == "size" and entry[1] is source and entry[2] == axis):
            return False
    return True


def _view_forward(ctx):
    """Exact: reshapes that keep the channel axis whole, merge it into one axis, or split it
    (into uniform blocks, or into heads) are followed with literal sizes patched; others keep
    every channel."""
    mapped = _view_mapping(ctx)
    if mapped is None:
        return _opaque(ctx)
    fact, units = mapped
    entries = _view_entries(ctx.node) if fact.simple else None
    if entries is not None and entries[fact.axis][0] == "size":
        _, source, axis = entries[fact.axis]
        source_fact = ctx.fact(source)
        if (isinstance(source_fact, ValueFact) and source_fact.tracked and source_fact.simple
                and source_fact.axis == axis and source_fact.size == fact.size):
            ctx.unify(ctx.units(source), units)  # NOTE [Shape tuples]: the size read follows the view
    return mapped


def uniform_digits(mask: np.ndarray, radix: tuple) -> np.ndarray:
    """Grow a channel mask over a split axis so that it is a uniform product: every kept head
    keeps the same number of dims (and so on at every level). Growing keeps the result exact.

    >>> uniform_digits(np.array([1, 1, 0, 1, 0, 0], bool), (3, 2)).astype(int).tolist()
    [1, 1, 1, 1, 0, 0]
    """
    grid = mask.reshape(radix).copy()
    for level in range(1, len(radix)):
        alive = grid.reshape(radix[: level + 1] + (-1,)).any(axis=-1)  # prefixes of length level+1
        parents = alive.any(axis=-1)
        if not parents.any():
            break
        target = alive.sum(axis=-1)[parents].max()
        for parent in zip(*np.nonzero(parents)):
            children = alive[parent]
            for child in np.nonzero(~children)[0][: target - children.sum()]:
                grid[parent + (child,) + (0,) * (len(radix) - level - 1)] = True
    return grid.reshape(-1)


def _view_backward(ctx):
    fact = ctx.fact(ctx.node)
    if fact is None or not fact.tracked:
        opaque_backward(ctx)
        return
    entries = _view_entries(ctx.node)
    if entries is None or any(not (entries[axis][0] == "literal" or _coupled_size(ctx, entries[axis], axis))
                              for axis in fact.axes):
        ctx.require_all(ctx.node, "a size computed at run time shapes it")  # keep it unchanged
        return
    for axis in fact.axes:
        owner = entries[axis][2][0] if entries[axis][0] == "literal" else None
        if owner is not None and owner is not ctx.node and len(owner.users) > 1:
            ctx.require_all(ctx.node, "its size tuple is shared with other readers")
            return
    if not fact.simple:
        present = ctx.present()
        ctx.require(ctx.node, uniform_digits(present, fact.radix), "keeps heads uniform (equal dims per head)")
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


def new_radix(kept: np.ndarray, radix: tuple) -> tuple:
    """Sizes of the split axes after keeping ``kept`` (a uniform product, see uniform_digits)."""
    if len(kept) == 0:
        return (0,) * len(radix)
    digits = np.stack(np.unravel_index(kept, radix))
    sizes, previous = [], 1
    for level in range(len(radix)):
        prefixes = len({tuple(column) for column in digits[: level + 1].T})
        if prefixes % previous:
            raise AssertionError(f"kept channels are not a uniform product over {radix}")
        sizes.append(prefixes // previous)
        previous = prefixes
    return tuple(sizes)


def _view_plan(ctx):
    fact = ctx.fact(ctx.node)
    kept = ctx.kept()
    if fact is None or not fact.tracked or len(kept) == fact.size:
        return
    entries = _view_entries(ctx.node)
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


rule("view/reshape", functions=(torch.reshape,), methods=("view", "reshape"),
     backward=_view_backward, plan=_view_plan, heads_aware=True)(_view_forward)
