"""A GPT-2-style decoder (nanoGPT's layout and initialization), with causal SDPA and tied embeddings.

``transformer.wte`` (token) + ``transformer.wpe`` (position, ``torch.arange`` of the sequence
length) -> pre-LN blocks ``h.N`` (``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``) -> ``ln_f`` ->
``lm_head`` whose weight IS ``transformer.wte.weight`` (one Parameter, listed once by
``parameters()``). Attention: fused ``c_attn`` Linear split into q, k, v with
``split(heads * head_dim, dim=2)``, ``view(B, T, heads, head_dim).transpose(1, 2)``,
``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, ``transpose(1, 2).reshape(B, T,
heads * head_dim)``, ``c_proj``. MLP: ``c_fc -> GELU -> c_proj``.

Head count and head size are integer literals in the graph (nanoGPT takes ``C`` from
``x.size()``). No dropout (nanoGPT's default for fine-tuning is 0 too), no length assert (an
``assert`` on a traced size would not trace). ``gpt2_small()`` has 124,439,808 parameters, as
Hugging Face's ``gpt2``. Everything is out-of-place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with a fused ``c_attn`` projection and SDPA.

    >>> CausalSelfAttention(16, heads=2)(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, n_embd: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        if n_embd % heads:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {heads}")
        self.heads = heads
        self.head_dim = n_embd // heads
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        width = self.heads * self.head_dim
        q, k, v = self.c_attn(x).split(width, dim=2)
        q = q.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, tokens, width)
        return self.c_proj(y)


class MLP(nn.Module):
    """``c_fc (4x) -> GELU -> c_proj``."""

    def __init__(self, n_embd: int, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN decoder block."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Decoder-only language model: ``(B, T)`` token ids -> ``(B, T, vocab_size)`` logits.

    Init as nanoGPT: Linear and Embedding weights ``normal_(0, 0.02)``, biases 0, and every
    ``c_proj.weight`` ``normal_(0, 0.02 / sqrt(2 * n_layer))``.
    """

    def __init__(self, vocab_size: int = 50257, block_size: int = 1024, n_layer: int = 12, n_head: int = 12,
                 n_embd: int = 768, bias: bool = True) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)


def gpt(vocab_size: int = 128, block_size: int = 32, n_layer: int = 2, n_head: int = 4, n_embd: int = 64,
        bias: bool = True) -> GPT:
    """A GPT-style decoder; the defaults are a small one for tests.

    >>> gpt()(torch.randint(0, 128, (2, 16))).shape
    torch.Size([2, 16, 128])
    """
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, bias)


def gpt2_small() -> GPT:
    """GPT-2 small: 12 layers, 12 heads, 768 wide, vocab 50257, context 1024 (124,439,808 parameters)."""
    return GPT(50257, 1024, 12, 12, 768)
