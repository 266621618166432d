"""Vision Transformer with hand-written multi-head attention (timm's ``VisionTransformer`` layout).

``patch_embed.proj`` (Conv2d, kernel = stride = patch) -> flatten to tokens -> ``torch.cat`` of
``cls_token.expand(B, -1, -1)`` in front -> ``+ pos_embed`` -> pre-LN blocks
(``x = x + attn(norm1(x))``; ``x = x + mlp(norm2(x))``) -> ``norm`` -> class token -> ``head``.
Attention is written out: a fused ``qkv`` Linear, ``reshape(B, N, 3, heads, head_dim)``,
``permute(2, 0, 3, 1, 4)``, ``unbind(0)``, ``q * scale @ k.transpose(-2, -1)``, softmax,
``attn @ v``, ``transpose(1, 2).reshape(B, N, heads * head_dim)``, ``proj``.

Head count and head size appear as integer literals in the reshapes (timm takes the last reshape's
size from ``x.shape``; here it is ``heads * head_dim``, so the attention width is free to differ
from ``dim``). ViT-S/16 (``vit_small()``) has 22,050,664 parameters, as timm's
``vit_small_patch16_224``. Everything is out-of-place.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import init_trunc_normal


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, written out op by op.

    >>> Attention(16, heads=2)(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads}")
            head_dim = dim // heads
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = attn @ v
        x = x.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.proj(x)


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (LN eps 1e-6)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    """``proj`` Conv2d with kernel = stride = patch, then ``flatten(2).transpose(1, 2)`` to tokens."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT classifier on the class token.

    Init (timm-like): Linear and patch weights ``trunc_normal_(std=0.02)``, biases 0,
    ``pos_embed`` ``trunc_normal_(std=0.02)``, ``cls_token`` ``normal_(std=1e-6)``, LayerNorms 1/0.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 16, dim: int = 384, depth: int = 12,
                 heads: int = 6, mlp_dim: int = 1536, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        init_trunc_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit(image_size: int = 32, patch_size: int = 8, dim: int = 64, depth: int = 2, heads: int = 4,
        mlp_dim: int = 128, num_classes: int = 10, in_channels: int = 3) -> VisionTransformer:
    """A ViT; the defaults are a small one for 32x32 images (16 patches + class token).

    >>> vit()(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    return VisionTransformer(image_size, patch_size, dim, depth, heads, mlp_dim, num_classes, in_channels)


def vit_small(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """ViT-S/16: dim 384, depth 12, 6 heads, MLP 1536 (22,050,664 parameters at 224 and 1000 classes)."""
    return VisionTransformer(image_size, 16, 384, 12, 6, 1536, num_classes)
