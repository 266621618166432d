"""Attention: softmax over keys, masks, ``q @ k^T``, ``weights @ v`` and
``F.scaled_dot_product_attention``; see transformers.md.

NOTE [Attention]
After ``view(B, T, H, hd)`` the q/k/v channels occupy two axes (NOTE [Heads]). The rules:

- q and k channels couple: dim ``d`` of head ``h`` is kept in both or in neither, since they
  contract. It is required when a kept head reads it and neither side is ``const(0)``
  (a nonzero constant on one side still varies the scores).
- value channels couple with the output channels: ``(h, e)`` goes when nobody reads the
  output there; a constant value channel gives a constant output (softmax rows sum to 1).
- a head stays when any of its value/output channels stays; it then keeps at least one q/k
  and one value channel. The views that split the heads make every kept head keep equally many.
- the softmax scale stays ``1/sqrt(original head_dim)``: SDPA gets ``scale=`` explicitly,
  and sizes read for a hand-written scale keep their original value (see shape.py).
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import (dot_products, first_per_head, grouped_sdpa_backward, grouped_sdpa_forward, head_mask, heads_on,
                  mix_backward, mix_forward, opaque_backward, opaque_forward, per_output, qk_required, scores_backward,
                  scores_forward, softmax_weights, tracked_fact)


def _passthrough_backward(ctx):
    x = ctx.node.args[0]
    for node in ctx.input_nodes():
        if node is not x:
            ctx.require_all(node)


# -- softmax over the keys ---------------------------------------------------------------------------------------

def _softmax_forward(ctx):
    """Exact: softmax along an axis the channels do not occupy works within each channel; a
    constant channel becomes ``const(1/n)`` (``log_softmax``: ``const(-log n)``)."""
    x = ctx.arg(0, "input")
    fact, shape = tracked_fact(ctx, x), ctx.shape(x)
    dim = ctx.module.dim if ctx.module is not None else ctx.arg(1, "dim")
    if fact is None or shape is None or not isinstance(dim, int) or dim % len(shape) in fact.axes:
        return opaque_forward(ctx)
    count = shape[dim % len(shape)]  # a constant channel is uniform along dim: 1/n (log: -log n)
    log = not _sums_to_one(ctx.node, ctx.root)
    return fact.replaced(fact.const, np.full(fact.size, -math.log(count) if log else 1.0 / count)), ctx.units(x)


def _sums_to_one(node, root) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), nn.Softmax)
    return node.target not in (F.log_softmax, torch.log_softmax, "log_softmax", torch.ops.aten.log_softmax.int)


rule("softmax", doc=(
         'Along an axis the channels do not occupy: it works within each channel; a constant channel '
         'becomes `const(1/n)` (`log_softmax`: `const(-log n)`).',
         'Nothing itself.',
         'Every channel for a softmax along the channel axis.',
         ),
     functions=(F.softmax, torch.softmax, F.log_softmax, torch.log_softmax), modules=(nn.Softmax, nn.LogSoftmax),
     methods=("softmax", "log_softmax"), backward=_passthrough_backward, heads_aware=True,
     sums_to_one=_sums_to_one, macs=per_output(3))(_softmax_forward)


# -- masks --------------------------------------------------------------------------------------------------------

def _broadcast_only(ctx, fact, other, rank) -> bool:
    if not isinstance(other, torch.fx.Node):
        return True
    shape = ctx.shape(other)
    if shape is None:
        return True
    offset = rank - len(shape)
    return all(a - offset < 0 or shape[a - offset] == 1 for a in fact.axes)


def _masked_fill_forward(ctx):
    """Exact: a mask that is the same for every channel fills positions within each channel."""
    x = ctx.arg(0, "input")
    fact, shape = tracked_fact(ctx, x), ctx.shape()
    if fact is None or shape is None:
        return opaque_forward(ctx)
    if not all(_broadcast_only(ctx, fact, other, len(shape)) for other in ctx.node.args[1:]):
        return opaque_forward(ctx)
    return fact.replaced(np.zeros(fact.size, bool), np.zeros(fact.size)), ctx.units(x)


def _where_forward(ctx):
    """Exact: ``torch.where(mask, x, fill)`` with a mask and fill the same for every channel."""
    condition, x, other = (ctx.arg(0, "condition"), ctx.arg(1, "input"), ctx.arg(2, "other"))
    fact, shape = tracked_fact(ctx, x), ctx.shape()
    if fact is None or shape is None or ctx.shape(x) != shape:
        return opaque_forward(ctx)
    if not (_broadcast_only(ctx, fact, condition, len(shape)) and _broadcast_only(ctx, fact, other, len(shape))):
        return opaque_forward(ctx)
    return fact.replaced(np.zeros(fact.size, bool), np.zeros(fact.size)), ctx.units(x)


def _where_backward(ctx):
    ctx.require_all(ctx.arg(0, "condition"))
    ctx.require_all(ctx.arg(2, "other"))


rule("masked_fill", doc=(
         'With a mask that is the same for every channel.',
         'Nothing itself.',
         'Every channel when the mask varies along the channel axis.',
         ),
     methods=("masked_fill",), functions=(torch.masked_fill,), backward=_passthrough_backward,
     heads_aware=True, macs=per_output(1))(_masked_fill_forward)
rule("where", doc=(
         '`torch.where(mask, x, fill)` with a mask and fill the same for every channel.',
         'Nothing itself.',
         'Every channel otherwise.',
         ),
     functions=(torch.where,), backward=_where_backward, heads_aware=True, macs=per_output(1))(_where_forward)


# -- q @ k^T and weights @ v ---------------------------------------------------------------------------------------

def _matmul_kind(ctx):
    a, b = ctx.node.args[0], ctx.node.args[1]
    fa, fb = tracked_fact(ctx, a), tracked_fact(ctx, b)
    sa, sb, out = ctx.shape(a), ctx.shape(b), ctx.shape()
    if None in (sa, sb, out) or len(sa) < 3 or len(sa) != len(sb):
        return None
    rank = len(sa)
    if heads_on(fa, rank, -3, -1) and heads_on(fb, rank, -3, -2) and fa.radix == fb.radix:
        return "scores", a, b, fa, fb
    if fa is not None and fa.simple and fa.axis == rank - 3 and heads_on(fb, rank, -3, -1) and fa.size == fb.radix[0]:
        return "mix", a, b, fa, fb
    return None


def _matmul_forward(ctx):
    """Exact for attention: ``q @ k^T`` couples q and k channels and yields one score channel
    per head; ``weights @ v`` keeps v's channels (a constant v channel stays constant when the
    weights are a softmax). Other matrix products keep every channel."""
    kind = _matmul_kind(ctx)
    if kind is None:
        return opaque_forward(ctx)
    name, a, b, fa, fb = kind
    if name == "scores":
        return scores_forward(ctx, a, b, fa, len(ctx.shape()) - 3)
    return mix_forward(ctx, a, b, fb, fb.axes, softmax_weights(ctx, a))


def _matmul_backward(ctx):
    kind = _matmul_kind(ctx)
    if kind is None:
        opaque_backward(ctx)
        return
    name, a, b, fa, fb = kind
    if name == "scores":
        scores_backward(ctx, a, b, fa, fb)
    else:
        mix_backward(ctx, a, b, fb)


def _sdpa_macs(_target, args, kwargs, out) -> tuple:
    """``Rule.macs``: ``B * L * S * (E + Ev)`` products (scores and mix, dense even when causal) and three
    operations per score (scale, softmax)."""
    query, key = args[0], args[1] if len(args) > 1 else kwargs["key"]
    value = args[2] if len(args) > 2 else kwargs["value"]
    queries, keys = query.shape[-2], key.shape[-2]
    batch = out.numel() // (queries * value.shape[-1])
    products = batch * queries * keys
    return products * (query.shape[-1] + value.shape[-1]), 3 * products


rule("matmul", doc=(
         'For attention: `q @ k^T` couples q and k channels (one score channel per head); `weights @ '
         "v` keeps v's channels, and a constant v channel stays constant when the weights are a "
         'softmax.',
         'Query/key dims that are `const(0)` in q or k; value dims.',
         'Every channel for other matrix products.',
         ),
     functions=(operator.matmul, torch.matmul), methods=("matmul",), backward=_matmul_backward,
     reads_input_presence=True, heads_aware=True, backward_untracked=True, macs=dot_products)(_matmul_forward)


# -- scaled_dot_product_attention -----------------------------------------------------------------------------------

def _sdpa_inputs(ctx):
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    fq, fk, fv = tracked_fact(ctx, q), tracked_fact(ctx, k), tracked_fact(ctx, v)
    shape = ctx.shape(q)
    if shape is None or len(shape) < 3 or _grouped(ctx):
        return None
    rank = len(shape)
    if not (heads_on(fq, rank, -3, -1) and heads_on(fk, rank, -3, -1) and heads_on(fv, rank, -3, -1)):
        return None
    if fq.radix != fk.radix or fq.radix[0] != fv.radix[0]:
        return None
    mask = ctx.arg(3, "attn_mask")
    # the mask is (..., heads, queries, keys): only its heads axis meets the channels
    if isinstance(mask, torch.fx.Node) and not _broadcast_only(ctx, ValueFact.varying(rank - 3, fq.radix[0]), mask, rank):
        return None
    return q, k, v, fq, fk, fv


def _grouped(ctx) -> bool:
    """``enable_gqa=True``: key/value heads shared by groups of query heads (NOTE [Grouped heads])."""
    return bool(ctx.arg(7, "enable_gqa", False))


def _grouped_inputs(ctx):
    """(q, k, v, fq, fk, fv, rep) for ``enable_gqa=True`` with q/k/v split into heads, or None."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    fq, fk, fv = tracked_fact(ctx, q), tracked_fact(ctx, k), tracked_fact(ctx, v)
    shape = ctx.shape(q)
    if shape is None or len(shape) < 3:
        return None
    rank = len(shape)
    if not (heads_on(fq, rank, -3, -1) and heads_on(fk, rank, -3, -1) and heads_on(fv, rank, -3, -1)):
        return None
    if fq.radix[1] != fk.radix[1] or fk.radix[0] != fv.radix[0] or fq.radix[0] % fk.radix[0]:
        return None
    mask = ctx.arg(3, "attn_mask")
    if isinstance(mask, torch.fx.Node) and not _broadcast_only(ctx, ValueFact.varying(rank - 3, fq.radix[0]), mask, rank):
        return None
    return q, k, v, fq, fk, fv, fq.radix[0] // fk.radix[0]


def _sdpa_forward(ctx):
    """Exact: see NOTE [Attention]; a constant value channel gives a constant output when no
    dropout is applied. With ``enable_gqa``, see NOTE [Grouped heads]."""
    if _grouped(ctx):
        return grouped_sdpa_forward(ctx, _grouped_inputs(ctx))
    inputs = _sdpa_inputs(ctx)
    if inputs is None:
        return opaque_forward(ctx)
    q, k, v, fq, fk, fv = inputs
    ctx.unify(ctx.units(q), ctx.units(k))
    dropout = ctx.arg(4, "dropout_p", 0.0)
    const = fv.const if dropout == 0 else fv.const & (fv.value == 0)
    return fv.replaced(const, np.where(const, fv.value, 0.0)), ctx.units(v)


def _sdpa_backward(ctx):
    if _grouped(ctx):
        grouped_sdpa_backward(ctx, _grouped_inputs(ctx))
        return
    inputs = _sdpa_inputs(ctx)
    if inputs is None:
        opaque_backward(ctx)
        return
    q, k, v, fq, fk, fv = inputs
    alive = head_mask(fv, ctx.present()) | head_mask(fq, ctx.present(q))
    ctx.require(q, qk_required(fq, fk, alive), "read by a kept attention head (q.k)")
    ctx.choose(q, first_per_head(alive, ctx.present(q), fq.radix[1], ctx.copied_present(q)), "a kept head keeps a q/k dim")
    ctx.choose(v, first_per_head(alive, ctx.present(v), fv.radix[1], ctx.copied_present(v)), "a kept head keeps a value dim")
    mask = ctx.arg(3, "attn_mask")
    if isinstance(mask, torch.fx.Node):
        ctx.require_all(mask)


def _sdpa_plan(ctx):
    inputs = _grouped_inputs(ctx) if _grouped(ctx) else _sdpa_inputs(ctx)
    if inputs is None or ctx.arg(6, "scale") is not None:
        return
    q = inputs[0]
    if ctx.present(q).all():
        return
    kwargs = dict(ctx.node.kwargs)
    kwargs["scale"] = 1.0 / math.sqrt(ctx.shape(q)[-1])  # the original head size (NOTE [Attention])
    ctx.patch(tuple(ctx.node.args), kwargs)


rule("scaled_dot_product_attention", doc=(
         'See `transformers.md` and NOTE [Attention]: q/k dims couple; a constant value channel gives'
         ' a constant output when no dropout is applied.',
         'q/k dims that are `const(0)`; value dims and whole heads; the softmax scale is kept at the '
         'original head size.',
         'A nonzero constant q/k dim (it changes every score). With `enable_gqa` (NOTE [Grouped heads]): equal '
         "query heads per group (the fullest group's count); a group's query heads keep its key head's dims.",
         ),
     functions=(F.scaled_dot_product_attention,), backward=_sdpa_backward,
     plan=_sdpa_plan, reads_input_presence=True, heads_aware=True, backward_untracked=True, macs=_sdpa_macs)(_sdpa_forward)


# ATen keys of these rules, with the torch-level signature (NOTE [ATen aliases] in functional.py);
# ``enable_gqa`` makes the attention rule keep every head (grouped-query attention is not followed)
_aten = torch.ops.aten
REGISTRY.alias(torch.softmax, _aten.softmax.int)
REGISTRY.alias(torch.matmul, _aten.matmul.default)
REGISTRY.alias(F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default)
REGISTRY.alias(torch.where, _aten.where.self, _aten.where.ScalarOther, _aten.where.ScalarSelf, _aten.where.Scalar)
REGISTRY.alias(torch.masked_fill, _aten.masked_fill.Scalar, _aten.masked_fill.Tensor)
