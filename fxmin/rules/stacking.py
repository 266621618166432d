"""``torch.stack``: tensors joined along a new axis (EVA-02's rotary ``stack([-x[..., 1::2], x[..., ::2]], -1)``).

Stacking is a ``cat`` of the inputs each given a new size-1 axis, joined along that new axis: never
along a channel axis, so the inputs' channels couple (as the operands of a residual add do) and the
channel axis shifts by one when the new axis comes before it. Model constants are adopted on it.
"""
from __future__ import annotations

import torch
import torch.fx

from .api import REGISTRY, rule
from .kit import adopt_missing, coupled_join, no_cost, opaque_forward, tracked_fact


def _stack_forward(ctx):
    """Exact: the inputs' channels couple (each output channel holds the same channel of every
    input); a channel is constant when it is the same constant in every input."""
    tensors, dim = ctx.arg(0, "tensors"), ctx.arg(1, "dim", 0)
    shape = ctx.shape()
    if shape is None or not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) \
            or not all(isinstance(t, torch.fx.Node) for t in tensors):
        return opaque_forward(ctx)
    dim = dim % len(shape)
    facts = [tracked_fact(ctx, t) for t in tensors]
    axes = {f.axis for f in facts if f is not None}
    if len(axes) != 1 or any(f is not None and not f.simple for f in facts):
        return opaque_forward(ctx)
    axis = axes.pop()
    if not adopt_missing(ctx, tensors, facts, axis):
        return opaque_forward(ctx)
    return coupled_join(ctx, tensors, facts, axis + 1 if dim <= axis else axis) or opaque_forward(ctx)


rule("stack", doc=(
         'Always: the inputs\' channels couple (each output channel holds the same channel of every input); '
         'model constants are adopted.',
         'A channel of the coupled group when it is removable in every input.',
         'Every channel when an input\'s channel axis cannot be followed or is split into heads.',
         ),
     functions=(torch.stack,), macs=no_cost)(_stack_forward)
REGISTRY.alias(torch.stack, torch.ops.aten.stack.default)
