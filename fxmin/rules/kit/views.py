"""Shape arguments of views and the sizes they read; uniform heads over split channel axes.
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
# A view's sizes are literals (``view(B, T, 4, 16)``), sizes read at run time (``x.size(0)``), or
# a tuple computed in the graph (HF: ``x.size()[:-1] + (4, 16)``, an ``operator.add`` of a slice
# of a size and a literal tuple). ``view_entries`` resolves them to one entry per output axis:
# ("literal", value, where) with ``where`` saying which node's argument holds it, so the plan can
# patch it; ("size", source, axis) for a run-time read of ``source.size(axis)``; ("unknown",).


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


def feeds_coupled_views(ctx, read, source, axis) -> bool:
    """True when the size ``read`` (of ``source`` on ``axis``) only shapes views at positions
    whose channels are coupled with it (NOTE [Shape tuples]): its run-time value is then the
    new size by itself."""
    for user in read.users:
        if user.op == "call_function" and user.target is operator.add and user.meta.get("tensor_meta") is None:
            if not feeds_coupled_views(ctx, user, source, axis):
                return False
            continue
        if not (user.op in ("call_method", "call_function") and user.target in ("view", "reshape", torch.reshape)):
            return False
        entries = view_entries(user)
        if entries is None:
            return False
        if not all(coupled_size(ctx, entry, position, user) for position, entry in enumerate(entries)
                   if entry[0] == "size" and entry[1] is source and entry[2] == axis):
            return False
    return True


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

