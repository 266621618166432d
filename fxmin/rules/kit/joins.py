"""Tensors joined into one (``cat``, ``stack``): model constants adopted on the others' channel axis,
and inputs whose channels couple. Part of :mod:`fxmin.rules.kit`.
"""
from __future__ import annotations

import numpy as np

from ...facts import ValueFact


def adopt_missing(ctx, tensors, facts, axis) -> bool:
    """Fill the None entries of ``facts`` by adopting those tensors as model constants on ``axis``
    (``Context.adopt``: a class token, a constant table); False when one cannot be adopted."""
    for index, tensor in enumerate(tensors):
        if facts[index] is None:
            facts[index] = ctx.adopt(tensor, axis)
            if facts[index] is None:
                return False
    return True


def coupled_join(ctx, tensors, facts, out_axis):
    """``(fact, units)`` of tensors joined along an axis their channels do not occupy: each output channel
    holds the same channel of every input, so their units unify, and a channel is constant when it is the
    same constant in every input. None when their channel counts differ."""
    if len({f.size for f in facts}) != 1:
        return None
    units = [ctx.units(t) for t in tensors]
    for other in units[1:]:
        ctx.unify(units[0], other)
    const = np.logical_and.reduce([f.const for f in facts]) & np.logical_and.reduce(
        [f.value == facts[0].value for f in facts])
    return ValueFact.constants(out_axis, const, np.where(const, facts[0].value, 0.0)), units[0]
