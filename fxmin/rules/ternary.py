"""``torch.addcmul`` / ``torch.addcdiv``: ``input + value · t1 ∘ t2`` elementwise (timm's GRN:
``torch.addcmul(bias.view(1, 1, 1, -1), weight.view(1, 1, 1, -1), x * x_n)``).

The three operands' channels couple, as the operands of an elementwise add or mul do; per-channel
model constants (views of parameters) are adopted on the channel axis and sliced with it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from ..facts import ValueFact
from .api import rule
from .kit import opaque_forward, tracked_fact

_OPS = {torch.addcmul: torch.mul, "addcmul": torch.mul, torch.addcdiv: torch.div, "addcdiv": torch.div,
        torch.ops.aten.addcmul.default: torch.mul, torch.ops.aten.addcdiv.default: torch.div}


def _ternary_forward(ctx):
    """Exact: an elementwise map of three operands whose channels couple; a channel is constant when
    it is constant in all three (its value computed in float64)."""
    operands = [ctx.arg(0, "input"), ctx.arg(1, "tensor1"), ctx.arg(2, "tensor2")]
    value, shape = ctx.arg(3, "value", 1), ctx.shape()
    if shape is None or not isinstance(value, (int, float)) or not all(isinstance(o, torch.fx.Node) for o in operands):
        return opaque_forward(ctx)
    tracked = [tracked_fact(ctx, o) for o in operands]
    anchor = next((f for f in tracked if f is not None), None)
    if anchor is None or not anchor.simple:
        return opaque_forward(ctx)
    facts = []
    for operand, fact in zip(operands, tracked):
        offset = len(shape) - len(ctx.shape(operand))
        fact = fact if fact is not None else ctx.adopt(operand, anchor.axis - offset)
        if fact is None or not fact.simple or fact.axis + offset != anchor.axis or fact.size != shape[anchor.axis]:
            return opaque_forward(ctx)  # a broadcast or other operand: not followed here
        facts.append(fact)
    for operand in operands[1:]:
        ctx.unify(ctx.units(operands[0]), ctx.units(operand))
    const = facts[0].const & facts[1].const & facts[2].const
    with torch.no_grad():
        a, b, c = (torch.tensor(f.value) for f in facts)
        result = (a + value * _OPS[ctx.node.target](b, c)).numpy()
    return ValueFact.constants(anchor.axis, const, np.where(const, result, 0.0)), ctx.units(operands[0])


rule("addcmul/addcdiv", doc=(
         'Always: `input + value · t1 ∘ t2` elementwise; the three operands\' channels couple; per-channel '
         'model constants (`weight.view(1, 1, 1, -1)`) are adopted.',
         'A channel of the coupled group when it is removable in every operand; adopted constants are sliced.',
         'Every channel when an operand broadcasts or cannot be followed.',
         ),
     functions=tuple(k for k in _OPS if not isinstance(k, str)), methods=tuple(k for k in _OPS if isinstance(k, str)))(
    _ternary_forward)
