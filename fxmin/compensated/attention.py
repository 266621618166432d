"""``SlicedMultiheadAttention``: what the ``nn.MultiheadAttention`` rule (:mod:`fxmin.rules.mha`,
NOTE [MultiheadAttention]) installs when channels go: separate q/k/v projections, SDPA with the
original scale, ``out_proj``. Pickles naming its 0.1.0 home ``fxmin.rules.mha`` still load
(:mod:`fxmin.legacy_modules`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SlicedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` in eval mode with fewer channels: separate q/k/v projections
    (``heads x qk_dim``, ``heads x v_dim`` outputs), SDPA with the original scale, ``out_proj``.
    Returns ``(output, None)`` like ``need_weights=False``; attention dropout in training mode."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, out_proj: nn.Linear, heads: int,
                 scale: float, batch_first: bool, dropout: float):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.heads, self.scale, self.batch_first, self.dropout = heads, scale, batch_first, dropout

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]

        def heads(x, length):
            return x.reshape(batch, length, self.heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(query), target), heads(self.k_proj(key), source), heads(self.v_proj(value), source)
        mask = _additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype)[:, None, None, :]
            mask = padding if mask is None else mask + padding
        causal = is_causal and mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, target, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)

