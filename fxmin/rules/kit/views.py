"""Shape arguments of views and the sizes they read; uniform heads over split channel axes; channel shuffles.
Part of :mod:`fxmin.rules.kit`.
"""
from __future__ import annotations

import builtins
import operator

import numpy as np
import torch
import torch.fx

from ...facts import ValueFact


# NOTE [Shape tuples]
# A view's sizes are literals (``view(B, T, 4, 16)``), sizes read at run time (``x.size(0)``),
# numbers computed from them (``C // n_head``), or a tuple computed in the graph (HF:
# ``x.size()[:-1] + (4, 16)``, an ``operator.add`` of a slice of a size and a literal tuple).
# ``view_entries`` resolves them to one entry per output axis, with ``where`` = (node, position,
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


def _shape_arguments(node):
    """(list of shape entries, position of the first entry in node.args, packed-as-tuple)."""
    if node.op == "call_function":  # torch.reshape(x, shape)
        return list(node.args[1]) if isinstance(node.args[1], (tuple, list)) else [node.args[1]], 1, True
    if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
        return list(node.args[1]), 1, True
    return list(node.args[1:]), 1, False


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


def entry_where(entry):
    """(node, position, index) of the argument holding a view entry (NOTE [Shape tuples]), or None."""
    if entry[0] in ("literal", "computed"):
        return entry[2]
    return entry[3] if entry[0] == "size" else None


def entry_node(entry):
    """The graph node a size or computed view entry reads, or None."""
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


def view_entries(node):
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


def coupled_size(ctx, entry, axis, view=None) -> bool:
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
    entries, fact = view_entries(view), ctx.fact(view)
    if entries is None:
        return {"other"}
    kinds = set()
    for position, entry in enumerate(entries):
        if entry_node(entry) not in cone:
            continue
        if not (isinstance(fact, ValueFact) and fact.tracked and position in fact.axes):
            kinds.add("other")
        elif coupled_size(ctx, entry, position, view):
            kinds.add("follows")
        else:
            kinds.add("patched" if entry_where(entry) is not None else "other")
    return kinds


def may_change(ctx, node) -> bool:
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


# NOTE [Channel shuffle]
# ShuffleNet's ``x.view(b, g, c // g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)`` puts
# channel ``i * (c // g) + j`` (group ``i``, position ``j``) at output channel ``j * g + i``. The split
# view tracks the channel on (group, position) axes (NOTE [Heads]); the transpose swaps those axes;
# the merging view then reads them in tensor order, which is a permutation of the channels: the
# output's facts and units are the input's, permuted, so presence couples channel for channel.
#
# Removing channels keeps the shuffle exact when the kept channels form a product: the same kept
# positions in every kept group (and the views then read ``(g', c' // g')``). Any other set would
# interleave the groups differently, so the merge requires the closure of its present channels to a
# product (kept groups x kept positions); the split view's uniform heads are then met as well.


def merge_order(axes: tuple, radix: tuple) -> np.ndarray:
    """``order[m]``: the channel at position ``m`` once its axes, tracked in significance order
    ``axes`` with sizes ``radix``, are merged in tensor order (ascending axes).

    >>> merge_order((2, 1), (2, 3)).tolist()   # 2 groups of 3, transposed: channels 0 3 1 4 2 5
    [0, 3, 1, 4, 2, 5]
    """
    size = int(np.prod(radix))
    digits = np.unravel_index(np.arange(size), radix)
    in_tensor_order = np.argsort(axes)
    position = np.ravel_multi_index([digits[k] for k in in_tensor_order], [radix[k] for k in in_tensor_order])
    order = np.empty(size, np.int64)
    order[position] = np.arange(size)
    return order


def product_closure(present: np.ndarray, radix: tuple, order: np.ndarray) -> np.ndarray:
    """The smallest product set of channels (over the digits ``radix``) containing the present
    merged positions, as a mask over merged positions.

    >>> product_closure(np.array([1, 0, 0, 0, 0, 1], bool), (2, 3), merge_order((2, 1), (2, 3))).astype(int).tolist()
    [1, 1, 0, 0, 1, 1]
    """
    by_channel = np.empty_like(present)
    by_channel[order] = present
    grid = by_channel.reshape(radix)
    alive = [grid.any(axis=tuple(a for a in range(len(radix)) if a != k)) for k in range(len(radix))]
    closure = alive[0]
    for digit in alive[1:]:
        closure = np.logical_and.outer(closure, digit)
    return closure.reshape(-1)[order]
