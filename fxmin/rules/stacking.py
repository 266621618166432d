"""``torch.stack``: tensors joined along a new axis (EVA-02's rotary ``stack([-x[..., 1::2], x[..., ::2]], -1)``).

Stacking is a ``cat`` of the inputs each given a new size-1 axis, joined along that new axis: never
along a channel axis, so the inputs' channels couple (as the operands of a residual add do) and the
channel axis shifts by one when the new axis comes before it. Model constants are adopted on it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import no_cost, opaque_forward


def _stack_forward(ctx):
    """Exact: the inputs' channels couple (each output channel holds the same channel of every
    input); a channel is constant when it is the same constant in every input."""
    tensors, dim = ctx.arg(0, "tensors"), ctx.arg(1, "dim", 0)
    shape = ctx.shape()
    if shape is None or not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) \
            or not all(isinstance(t, torch.fx.Node) for t in tensors):
        return opaque_forward(ctx)
    dim = dim % len(shape)
    facts = [ctx.fact(t) if isinstance(ctx.fact(t), ValueFact) and ctx.fact(t).tracked else None for t in tensors]
    axes = {f.axis for f in facts if f is not None}
    if len(axes) != 1 or any(f is not None and not f.simple for f in facts):
        return opaque_forward(ctx)
    axis = axes.pop()
    for index, tensor in enumerate(tensors):
        if facts[index] is None:
            facts[index] = ctx.adopt(tensor, axis)
            if facts[index] is None:
                return opaque_forward(ctx)
    if len({f.size for f in facts}) != 1:
        return opaque_forward(ctx)
    units = [ctx.units(t) for t in tensors]
    for other in units[1:]:
        ctx.unify(units[0], other)
    const = np.logical_and.reduce([f.const for f in facts]) & np.logical_and.reduce(
        [f.value == facts[0].value for f in facts])
    out_axis = axis + 1 if dim <= axis else axis
    return ValueFact.constants(out_axis, const, np.where(const, facts[0].value, 0.0)), units[0]


rule("stack", doc=(
         'Always: the inputs\' channels couple (each output channel holds the same channel of every input); '
         'model constants are adopted.',
         'A channel of the coupled group when it is removable in every input.',
         'Every channel when an input\'s channel axis cannot be followed or is split into heads.',
         ),
     functions=(torch.stack,), macs=no_cost)(_stack_forward)
REGISTRY.alias(torch.stack, torch.ops.aten.stack.default)
