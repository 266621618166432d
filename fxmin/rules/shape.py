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
# A view's sizes are literals (``view(B, T, 4, 16)``), sizes read at run time (``x.size(0)``),
# numbers computed from them (``C // n_head``), or a tuple computed in the graph (HF:
# ``x.size()[:-1] + (4, 16)``, an ``operator.add`` of a slice of a size and a literal tuple).
# ``_view_entries`` resolves them to one entry per output axis, with ``where`` = (node, position,
# index) of the argument that holds it so that the plan can patch it:
# ("literal", value, where); ("size", source, axis, where, node) for a run-time read of
# ``source.size(axis)`` (``where`` and ``node`` None inside a slice of a whole size);
# ("computed", node, where) for another number computed in the graph; ("unknown",).
#
# NOTE [Computed sizes]
# At a channel axis of the view, a computed size (``C // n_head`` in ``q.view(B, T, n_head, C //
# n_head)``, ``num_channels`` read from another tensor in ShuffleNet's second view) is replaced by
# the literal count of kept channels whenever that count differs from the original or the number
# may change at run time (it reads a size of a tensor that loses channels). A tracked axis has the
# size the weights give it, so the literal is right for every input. The size reads themselves are
# handled in sizes.py (NOTE [Size reads]).

def _literal_entries(value, owner, position):
    entries = []
    for index, item in enumerate(value):
        where = (owner, position, index)
        if isinstance(item, int):
            entries.append(("literal", item, where))
        elif isinstance(item, torch.fx.Node):
            entries.append(_node_entry(item, where))
        else:
            entries.append(("unknown",))
    return entries


def _node_entry(node, where):
    size = _size_entry(node)
    if size[0] == "size":
        return size + (where, node)
    if node.meta.get("type") is int and node.meta.get("tensor_meta") is None:
        return ("computed", node, where)
    return ("unknown",)


def _where(entry):
    """(node, position, index) of the argument holding a view entry, or None."""
    if entry[0] in ("literal", "computed"):
        return entry[2]
    return entry[3] if entry[0] == "size" else None


def _entry_node(entry):
    """The graph node a size or computed entry reads, or None."""
    return entry[4] if entry[0] == "size" else entry[1] if entry[0] == "computed" else None


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
        return [("size", source, axis, None, None) for axis in axes]
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


def size_use_kinds(ctx, view, cone) -> set:
    """How ``view`` uses the numbers in ``cone`` (a size read and what is computed from it), per
    entry that reads one: "follows" (a coupled size: its run-time value is the new size),
    "patched" (replaced by a literal, NOTE [Computed sizes]) or "other" (shapes an axis that is not
    tracked, or cannot be patched: its value must not change)."""
    entries, fact = _view_entries(view), ctx.fact(view)
    if entries is None:
        return {"other"}
    kinds = set()
    for position, entry in enumerate(entries):
        if _entry_node(entry) not in cone:
            continue
        if not (isinstance(fact, ValueFact) and fact.tracked and position in fact.axes):
            kinds.add("other")
        elif _coupled_size(ctx, entry, position, view):
            kinds.add("follows")
        else:
            kinds.add("patched" if _where(entry) is not None else "other")
    return kinds


def _view_forward(ctx):
    """Exact: reshapes that keep the channel axis whole, merge it into one axis, or split it
    (into uniform blocks, or into heads) are followed with literal sizes patched; others keep
    every channel."""
    mapped = _view_mapping(ctx)
    if mapped is None:
        return _opaque(ctx)
    fact, units = mapped
    entries = _view_entries(ctx.node) if fact.simple else None
    if entries is not None and entries[fact.axis][0] == "size" and _where(entries[fact.axis]) is None:
        source, axis = entries[fact.axis][1], entries[fact.axis][2]
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
    if entries is None or any(not (_coupled_size(ctx, entries[axis], axis) or _where(entries[axis]) is not None)
                              for axis in fact.axes):
        ctx.require_all(ctx.node, "a size computed at run time shapes it")  # keep it unchanged
        return
    for axis in fact.axes:
        owner = _where(entries[axis])[0] if not _coupled_size(ctx, entries[axis], axis) else None
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
    if fact is None or not fact.tracked:
        return
    entries = _view_entries(ctx.node)
    computed = [axis for axis in fact.axes if entries[axis][0] in ("size", "computed")
                and _where(entries[axis]) is not None and not _coupled_size(ctx, entries[axis], axis)]
    if len(kept) == fact.size and not any(_may_change(ctx, _entry_node(entries[axis])) for axis in computed):
        return
    sizes = new_radix(kept, fact.radix) if not fact.simple else (int(len(kept)),)
    edits = {}  # owner node -> {(position, index): new size}
    for axis, size in zip(fact.axes, sizes):
        if (entries[axis][0] == "literal" and entries[axis][1] != -1) or axis in computed:
            owner, position, index = _where(entries[axis])
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


def _may_change(ctx, node) -> bool:
    """Whether a number computed in the graph reads a size of a tensor that loses channels."""
    pending, seen = [node], {node}
    while pending:
        for source in pending.pop().all_input_nodes:
            if source.meta.get("tensor_meta") is not None:
                fact = ctx.fact(source)
                if isinstance(fact, ValueFact) and fact.tracked and not ctx.present(source).all():
                    return True
            elif source not in seen:
                seen.add(source)
                pending.append(source)
    return False


rule("view/reshape", functions=(torch.reshape,), methods=("view", "reshape"),
     backward=_view_backward, plan=_view_plan, heads_aware=True)(_view_forward)
