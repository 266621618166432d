"""Union-find over channel *units*: the coupling groups of the analysis.

NOTE [Units]
Every channel of every tracked axis maps to a unit. Ops whose channels pass
through unchanged (activations, BatchNorm, pooling, flatten) reuse their input's
units; ops that must keep the same index set on several axes (a residual add, a
depthwise conv) unify them. A unit is *present* in the result iff some reader
requires it at some member, so a residual-stream channel goes everywhere or
nowhere, with no extra bookkeeping.
"""
from __future__ import annotations

import numpy as np


class UnitTable:
    """Vectorized union-find with path compression over integer unit ids."""

    def __init__(self):
        self._parent = np.zeros(1024, np.int64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def fresh(self, size: int) -> np.ndarray:
        start = self._count
        end = start + size
        if end > self._parent.size:
            grown = np.zeros(max(end, 2 * self._parent.size), np.int64)
            grown[: self._count] = self._parent[: self._count]
            self._parent = grown
        self._parent[start:end] = np.arange(start, end)
        self._count = end
        return np.arange(start, end)

    def find(self, units: np.ndarray) -> np.ndarray:
        units = np.asarray(units, np.int64)
        parent = self._parent
        roots = parent[units]
        while True:
            up = parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        parent[units] = roots  # compress
        return roots

    def unify(self, first: np.ndarray, second: np.ndarray) -> None:
        """Merge the sets of ``first[i]`` and ``second[i]`` for every ``i``; a set's root is its least unit.

        NOTE [Vectorized union]
        Each round links the larger root of every differing pair under the smaller one
        (``np.minimum.at``: of several links from one root the least wins, the others are redone
        in the next round), so ``parent[u] <= u`` always holds and the roots are the least
        members, the same partition and the same roots as linking the pairs one at a time.
        """
        first = np.asarray(first, np.int64)
        second = np.asarray(second, np.int64)
        if first.shape != second.shape:
            raise ValueError(f"cannot couple axes of different sizes {first.shape} and {second.shape}")
        while True:
            a = self.find(first)
            b = self.find(second)
            differ = a != b
            if not differ.any():
                return
            a, b = a[differ], b[differ]
            np.minimum.at(self._parent, np.maximum(a, b), np.minimum(a, b))


class OwnerIndex:
    """Which nodes own which units: built once from ``(node, unit ids)`` pairs (a node may appear twice),
    then :meth:`owners` answers for many units at once.

    >>> index = OwnerIndex([("a", np.array([0, 1])), ("b", np.array([1, 2]))])
    >>> index.owners(np.array([1])), index.owners(np.array([2, 3]))
    (['a', 'b'], ['b'])
    """

    def __init__(self, owned):
        nodes = [node for node, _ in owned]
        sizes = [len(units) for _, units in owned]
        units = np.concatenate([units for _, units in owned]) if owned else np.zeros(0, np.int64)
        order = np.argsort(units, kind="stable")  # owners() reads a set of nodes: duplicates are harmless
        self._units, self._nodes = units[order], np.repeat(np.arange(len(nodes)), sizes)[order]
        self._node_list = nodes

    def owners(self, units: np.ndarray) -> list:
        """The nodes that own any of ``units``, each once, in the order they were given."""
        start = np.searchsorted(self._units, units, "left")
        lengths = np.searchsorted(self._units, units, "right") - start
        # every position of every run [start, start + length) of the sorted index, in one array
        positions = np.arange(int(lengths.sum())) + np.repeat(start - np.cumsum(lengths) + lengths, lengths)
        return [self._node_list[i] for i in np.unique(self._nodes[positions]).tolist()]
