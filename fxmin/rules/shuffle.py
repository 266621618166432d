"""Channel shuffle: a channel axis split into digits, permuted, and merged back in another order.

NOTE [Channel shuffle]
ShuffleNet's ``x.view(b, g, c // g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)`` puts
channel ``i * (c // g) + j`` (group ``i``, position ``j``) at output channel ``j * g + i``. The split
view tracks the channel on (group, position) axes (NOTE [Heads]); the transpose swaps those axes;
the merging view then reads them in tensor order, which is a permutation of the channels: the
output's facts and units are the input's, permuted, so presence couples channel for channel.

Removing channels keeps the shuffle exact when the kept channels form a product: the same kept
positions in every kept group (and the views then read ``(g', c' // g')``). Any other set would
interleave the groups differently, so the merge requires the closure of its present channels to a
product (kept groups x kept positions); the split view's uniform heads are then met as well.
"""
from __future__ import annotations

import numpy as np


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
