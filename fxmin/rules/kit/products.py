"""Products of tensors split into heads (NOTE [Attention] in ``fxmin/rules/attention.py``): the
``q . k`` scores and the ``weights . v`` mix, shared by ``matmul`` and ``einsum``. Part of
:mod:`fxmin.rules.kit`.

Both rules find the operands and where the heads sit; the facts and requirements below do not
depend on the tensor layout, only on which axes of the output the heads land on.
"""
from __future__ import annotations

import numpy as np
import torch.fx

from ...facts import ValueFact


def heads_on(fact: ValueFact, rank: int, head_axis: int, dim_axis: int):
    """(heads, dims) when the channels sit on (head_axis, dim_axis) of a rank-``rank`` tensor."""
    if fact is None or len(fact.axes) != 2 or fact.axes != (head_axis % rank, dim_axis % rank):
        return None
    return fact.radix


def head_mask(fact: ValueFact, mask: np.ndarray) -> np.ndarray:
    """Which heads have any channel in ``mask``."""
    heads, dims = fact.radix
    return mask.reshape(heads, dims).any(axis=1)


def first_per_head(heads_alive: np.ndarray, present: np.ndarray, dims: int, prefer: np.ndarray | None = None) -> np.ndarray:
    """One channel in every alive head that has none (a choice, NOTE [Choices at the fixed point]): the
    first of ``prefer`` in that head (``Context.copied_present``: a copy of a kept channel), else dim 0."""
    grid = present.reshape(len(heads_alive), dims)
    prefer = np.zeros_like(grid) if prefer is None else prefer.reshape(grid.shape)
    need = np.zeros_like(grid)
    for head in np.nonzero(heads_alive & ~grid.any(axis=1))[0]:
        need[head, int(np.argmax(prefer[head]))] = True  # argmax: the first preferred dim, else 0
    return need.reshape(-1)


def qk_required(q: ValueFact, k: ValueFact, heads_alive: np.ndarray) -> np.ndarray:
    """The q/k dims a kept head reads: every dim where neither side is ``const(0)``."""
    heads, dims = q.radix
    zero_q = q.const & (q.value == 0)
    zero_k = k.const & (k.value == 0)
    contributes = ~(zero_q | zero_k)
    return contributes & np.repeat(heads_alive, dims)


def softmax_weights(ctx, node) -> bool:
    """Whether ``node`` is a softmax over the last axis (through ops that are the identity in eval)."""
    while isinstance(node, torch.fx.Node):
        found = ctx.rule_of(node)
        if found is None:
            return False
        if found.sums_to_one is not None:
            return found.sums_to_one(node, ctx.root)
        if found.identity_in_eval is None or not found.identity_in_eval(node, ctx.root):
            return False
        node = node.args[0]
    return False


def scores_forward(ctx, q, k, fq: ValueFact, head_axis: int):
    """``q . k`` over the head dims: q and k channels couple; one score channel per head on
    ``head_axis`` of the output."""
    ctx.unify(ctx.units(q), ctx.units(k))
    heads = fq.radix[0]
    return ValueFact.varying(head_axis, heads), ctx.fresh(heads)


def scores_backward(ctx, q, k, fq: ValueFact, fk: ValueFact) -> None:
    # a head q or k keeps (e.g. a repeated key head kept for its group) is computed: its scores stay
    ctx.require(ctx.node, head_mask(fq, ctx.present(q)) | head_mask(fk, ctx.present(k)), "q and k keep this head")
    alive = ctx.present()
    ctx.require(q, qk_required(fq, fk, alive), "read by a kept attention head (q.k)")
    ctx.choose(q, first_per_head(alive, ctx.present(q), fq.radix[1], ctx.copied_present(q)), "a kept head keeps a q/k dim")


def mix_forward(ctx, weights, v, fv: ValueFact, axes, sums_to_one: bool):
    """``weights . v`` (one weight channel per head): v's channels, on ``axes`` of the output; a
    constant v channel stays constant when the weights sum to one over the contracted axis, else
    only a zero one does."""
    const = fv.const if sums_to_one else fv.const & (fv.value == 0)
    return fv.replaced(const, np.where(const, fv.value, 0.0)).with_axes(axes), ctx.units(v)


def mix_backward(ctx, weights, v, fv: ValueFact) -> None:
    alive = head_mask(fv, ctx.present()) | ctx.present(weights) | head_mask(fv, ctx.present(v))
    ctx.require(weights, alive, "weights of a kept attention head")
    ctx.choose(v, first_per_head(alive, ctx.present(v), fv.radix[1], ctx.copied_present(v)), "a kept head keeps a value dim")
