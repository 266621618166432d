"""A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU and grouped-query attention.

``embed_tokens`` -> pre-norm blocks ``layers.N`` (``x + self_attn(input_layernorm(x))``,
``x + mlp(post_attention_layernorm(x))``) -> ``norm`` -> ``lm_head``, with Hugging Face Llama's
parameter names. Attention: ``q_proj`` makes ``heads`` query heads, ``k_proj`` and ``v_proj``
``kv_heads`` key/value heads (``kv_heads == heads``: multi-head, ``kv_heads == 1``: multi-query),
each query head ``h`` reads key/value head ``h // (heads // kv_heads)``. ``qk_norm=True`` adds
Qwen3 / Gemma 3's ``q_norm`` / ``k_norm`` (RMSNorm over the head dim, per head, before rotary).

Rotary embeddings rotate dim ``e`` with ``e + head_dim / 2`` (``rotate_half`` as ``chunk`` and
``cat``); the cos/sin tables are buffers of each attention module (``(block_size, head_dim)``,
narrowed to the sequence length), so each layer's tables can lose the q/k dims that layer loses.
The grouping is written two ways (``gqa=``): ``"repeat"`` repeats the key/value heads as HF's
``repeat_kv`` does (``k[:, :, None].expand(B, kv, rep, T, hd).reshape(B, kv * rep, T, hd)``) and
calls SDPA on equal head counts; ``"sdpa"`` passes the fewer key/value heads to
``F.scaled_dot_product_attention(..., enable_gqa=True)``. Head counts and head size are integer
literals in the graph. No dropout; everything is out-of-place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the last axis (dim ``e`` pairs with ``e + d/2``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(head_dim: int, block_size: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(block_size, head_dim)``, as Hugging Face Llama builds them."""
    inverse = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inverse)
    table = torch.cat([angles, angles], dim=-1)
    return table.cos().float(), table.sin().float()


class GroupedQueryAttention(nn.Module):
    """Causal attention with ``heads`` query heads sharing ``kv_heads`` key/value heads.

    >>> GroupedQueryAttention(32, heads=4, kv_heads=2)(torch.randn(2, 5, 32)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int | None = None, block_size: int = 64,
                 qk_norm: bool = False, gqa: str = "repeat", bias: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
        if gqa not in ("repeat", "sdpa"):
            raise ValueError(f"gqa must be 'repeat' or 'sdpa', got {gqa!r}")
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = head_dim or dim // heads
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        self.gqa = gqa
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        cos, sin = rotary_tables(self.head_dim, block_size)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _repeat_kv(self, x: torch.Tensor, batch, tokens) -> torch.Tensor:
        """Hugging Face's ``repeat_kv``: each key/value head once per query head of its group."""
        rep = self.heads // self.kv_heads
        if rep == 1:
            return x
        x = x[:, :, None, :, :].expand(batch, self.kv_heads, rep, tokens, self.head_dim)
        return x.reshape(batch, self.heads, tokens, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(batch, tokens, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, tokens, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, tokens, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.cos.narrow(0, 0, tokens), self.sin.narrow(0, 0, tokens)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.gqa == "repeat":
            k, v = self._repeat_kv(k, batch, tokens), self._repeat_kv(v, batch, tokens)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        y = y.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, block_size: int = 64, **options) -> None:
        super().__init__()
        eps = options.get("eps", 1e-6)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.self_attn = GroupedQueryAttention(dim, heads, kv_heads, block_size=block_size, **options)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, hidden, bias=options.get("bias", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Decoder-only language model: ``(B, T)`` token ids -> ``(B, T, vocab_size)`` logits."""

    def __init__(self, vocab_size: int = 128, dim: int = 64, n_layer: int = 2, heads: int = 4, kv_heads: int = 2,
                 hidden: int = 176, block_size: int = 64, **options) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, kv_heads, hidden, block_size, **options)
                                     for _ in range(n_layer)])
        self.norm = nn.RMSNorm(dim, eps=options.get("eps", 1e-6))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def llama(vocab_size: int = 128, dim: int = 64, n_layer: int = 2, heads: int = 4, kv_heads: int = 2,
          hidden: int = 176, block_size: int = 64, **options) -> Llama:
    """A Llama-style decoder; the defaults are a small one for tests. ``options``: ``head_dim``,
    ``qk_norm``, ``gqa`` (``"repeat"`` or ``"sdpa"``), ``bias``, ``eps``.

    >>> llama()(torch.randint(0, 128, (2, 16))).shape
    torch.Size([2, 16, 128])
    """
    return Llama(vocab_size, dim, n_layer, heads, kv_heads, hidden, block_size, **options)
