"""Choices the analysis makes once the mandatory requirements are met (used by :mod:`fxmin.analysis`).

NOTE [Choices at the fixed point]
Most requirements are *mandatory*: a kept row reads these input channels, a kept head
these dims. A few are *choices*: how many channels stay is forced, which ones is not.
A conv or a BatchNorm that would lose every channel keeps channel 0 (torch has none
with zero channels), a kept attention head keeps a dim, and a grouped conv, a chunk, a
repeat of heads or a view into heads fills its groups up to the fullest one. Made while
the queue still runs, a choice sees part of the picture: channels that other readers
require later would have met it, and the pick stays beside them (one or two channels,
or a cascade through repeated heads); which ones stay then depends on the order the
queue meets the nodes, not on the model.

So rules state choices with ``Context.choose``, not ``require``. While the queue runs,
a choice that would add a unit is not made: its node is set aside. Once the queue is
empty (every mandatory requirement met), one node set aside is run again and makes its
first choice that still adds a unit, and the queue drains again (setting aside any
choice it meets); this repeats until no node is set aside. The next node is the one
whose pending choice adds to the coupling group created last in the graph (unit ids are
handed out in graph order), then the later node: requirements flow backward, so a
choice of late channels can supply early ones that another choice would have to pick
(a conv that would be empty keeps a channel, and with it the inputs it reads, which a
BatchNorm beside it then holds). A kept head that has no dim yet
takes one that is a copy of a kept channel where there is one (``Context.copies``): a
query head that meets a repeated key head keeps a dim its key head already holds,
which adds no key row (NOTE [Grouped heads]). A choice only adds units, and a node is set
aside only when one of its choices would add one, so this ends, with no node whose
last run found a choice unmet. Exact either way: a choice keeps more than needed,
never less.
"""
from __future__ import annotations

import heapq

import numpy as np

from .units import UnitTable


class Choices:
    """The nodes whose choices wait, the copies among units, and which node chooses next."""

    def __init__(self, table: UnitTable, order: dict):
        self._table = table
        self._order = order  # node -> position in the graph
        self._waiting: list = []  # heap of (-latest group, -position, id, node)
        self._waiting_nodes: set = set()
        self._copies: list = []
        self._source_of = self._latest_member = None
        #: the node that makes its next choice now (None: every choice waits)
        self.chooser = None

    def copies(self, units, sources) -> None:
        """Units ``units`` hold copies of ``sources`` (``Context.copies``); recorded during the forward pass."""
        self._copies.append((np.asarray(units, np.int64), np.asarray(sources, np.int64)))

    def freeze(self) -> None:
        """After the forward pass, once every unit exists and every coupling is made."""
        every = np.arange(len(self._table))
        self._source_of = every.copy()  # a unit is its own source unless it holds a copy
        for units, sources in self._copies:
            self._source_of[self._table.find(units)] = self._table.find(sources)
        self._latest_member = every.copy()  # per group, at its root: its last unit (ids follow graph order)
        np.maximum.at(self._latest_member, self._table.find(every), every)

    def source_of(self, units: np.ndarray) -> np.ndarray:
        """The units ``units`` (roots) copy, or themselves."""
        return self._source_of[units]

    def wait(self, node, new: np.ndarray) -> None:
        """``node`` has a choice that would add the units ``new`` (roots): it runs again at the fixed point."""
        if node not in self._waiting_nodes:
            self._waiting_nodes.add(node)
            latest = int(self._latest_member[new].max())
            heapq.heappush(self._waiting, (-latest, -self._order[node], id(node), node))

    def next(self):
        """The node to make its next choice, or None when no choice waits."""
        if not self._waiting:
            return None
        node = heapq.heappop(self._waiting)[-1]
        self._waiting_nodes.discard(node)
        return node
