"""``torch.einsum`` (and ``aten.einsum``) with two operands, read through its equation: the attention
products written as einsums (MaxViT's ``"bghid,bghjd->bghij"`` and ``"bghij,bghjd->bghid"``)
follow the heads as ``q @ k^T`` and ``weights @ v`` do (NOTE [Attention] in attention.py).

NOTE [Einsum]
The equation names every axis with a letter. Two forms are followed, each exact for any letters
and any order of the axes:

- scores: q and k carry their channels as (head, dim) on the letters (H, D) both; H is an output
  letter (a batch axis) and D is summed. Output head ``h`` reads only q and k head ``h``, so the
  q/k dims couple and a dim may leave where q or k is ``const(0)``; one score channel per head.
- mix: the weights carry one channel per head on H, v carries (head, dim) on (H, D), both H and D
  are output letters and the summed letters are the weights' alone with v. Output channel
  ``(h, e)`` reads weights head ``h`` and v channel ``(h, e)`` only. A constant v channel stays
  constant when the weights are a softmax over their last axis and that axis is the one summed.

Every other equation (one operand, three, an ellipsis, a repeated letter, heads on other
letters) keeps every channel of its operands: exact, nothing removed across it.
"""
from __future__ import annotations

import torch

from .api import rule
from .kit import (mix_backward, mix_forward, opaque_backward, opaque_forward, scores_backward, scores_forward,
                  softmax_weights, tracked_fact)


def _operands(ctx) -> list:
    args = ctx.node.args
    if len(args) == 2 and isinstance(args[1], (list, tuple)):  # einsum(eq, [a, b]) and aten.einsum
        return list(args[1])
    return list(args[1:])


def parse_equation(equation) -> tuple[list[str], str] | None:
    """(the letters of each operand, the output's letters), or None for a form not followed: no
    explicit output, an ellipsis, or a letter repeated within one term.

    >>> parse_equation("B G H I D, B G H J D -> B G H I J")
    (['BGHID', 'BGHJD'], 'BGHIJ')
    """
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if any(len(set(term)) != len(term) or not term.isalpha() for term in terms + [output] if term):
        return None
    return terms, output


def _kind(ctx):
    """("scores", q, k, fq, fk, out head axis) or ("mix", weights, v, fw, fv, out axes), or None."""
    parsed = parse_equation(ctx.arg(0, "equation"))
    operands = _operands(ctx)
    if parsed is None or len(parsed[0]) != 2 or len(operands) != 2:
        return None
    (la, lb), lo = parsed
    a, b = operands
    fa, fb = tracked_fact(ctx, a), tracked_fact(ctx, b)
    sa, sb = ctx.shape(a), ctx.shape(b)
    if fa is None or fb is None or sa is None or sb is None or (len(sa), len(sb)) != (len(la), len(lb)):
        return None
    summed = (set(la) | set(lb)) - set(lo)
    if len(fa.axes) == 2 and len(fb.axes) == 2 and fa.radix == fb.radix:
        head, dim = la[fa.axes[0]], la[fa.axes[1]]
        if (lb[fb.axes[0]], lb[fb.axes[1]]) == (head, dim) and head in lo and dim in summed:
            return "scores", a, b, fa, fb, lo.index(head)
    if fa.simple and len(fb.axes) == 2 and fa.size == fb.radix[0]:
        head, dim = lb[fb.axes[0]], lb[fb.axes[1]]
        if la[fa.axis] == head and head in lo and dim in lo and dim not in la:
            return "mix", a, b, fa, fb, (lo.index(head), lo.index(dim)), summed
    return None


def _einsum_forward(ctx):
    """Exact: NOTE [Einsum]. The scores and mix forms follow the heads; other equations keep every
    channel of their operands."""
    kind = _kind(ctx)
    if kind is None:
        return opaque_forward(ctx)
    if kind[0] == "scores":
        _, q, k, fq, _, head_axis = kind
        return scores_forward(ctx, q, k, fq, head_axis)
    _, weights, v, _, fv, axes, summed = kind
    la = parse_equation(ctx.arg(0, "equation"))[0][0]
    sums_to_one = summed == {la[-1]} and softmax_weights(ctx, weights)
    return mix_forward(ctx, weights, v, fv, axes, sums_to_one)


def _einsum_backward(ctx):
    kind = _kind(ctx)
    if kind is None:
        opaque_backward(ctx)
    elif kind[0] == "scores":
        scores_backward(ctx, *kind[1:5])
    else:
        mix_backward(ctx, kind[1], kind[2], kind[4])


def _einsum_macs(_target, args, _kwargs, out) -> tuple:
    """``Rule.macs``: one product per output element and value of the summed letters."""
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    parsed = parse_equation(args[0])
    if parsed is None:
        return out.numel(), 0
    sizes = {letter: size for term, tensor in zip(parsed[0], operands) for letter, size in zip(term, tensor.shape)}
    summed = 1
    for letter in set(sizes) - set(parsed[1]):
        summed *= sizes[letter]
    return out.numel() * summed, 0


rule("einsum", doc=(
         'NOTE [Einsum]: two operands in the attention forms, scores (q and k split into heads on the '
         'same letters, the dim letter summed) and mix (weights per head, v split into heads).',
         'As `matmul` in attention: q/k dims that are `const(0)` in q or k; value dims and whole heads.',
         'Every channel of the operands for any other equation (ellipsis, repeated letters, one or three '
         'operands, heads on other letters).',
         ),
     functions=(torch.einsum, torch.ops.aten.einsum.default), backward=_einsum_backward, reads_input_presence=True,
     heads_aware=True, backward_untracked=True, macs=_einsum_macs)(_einsum_forward)
