"""Integer arithmetic on sizes read from tensors (NOTE [Size reads], NOTE [Computed sizes]): nanoGPT's
``q.view(B, T, n_head, C // n_head)``, window partitions with ``H // ws`` and ``H % ws``, and sizes
that feed views while channels leave."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from helpers import check_minimize


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, as written there (sizes from ``x.size()``), between an input layer and a head."""

    def __init__(self, width=8, heads=2, fused=True):
        super().__init__()
        self.inp, self.out = nn.Linear(5, width), nn.Linear(width, 2)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.n_head, self.n_embd, self.fused = heads, width, fused

    def attention(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            y = att.softmax(dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def forward(self, z):
        x = self.inp(z)
        return self.out(x + self.attention(x))


def _ones(model, name):
    return torch.ones_like(dict(model.named_parameters())[name], dtype=torch.bool)


def test_nanogpt_head_leaves_with_sizes_computed_from_x_size():
    for fused in (True, False):
        model = CausalSelfAttention(fused=fused).eval()
        proj = _ones(model, "c_proj.weight")
        proj[:, 4:] = False  # nothing reads head 1: its q, k and v rows leave
        # inp 8x5+8, c_attn 12 rows (q, k, v of head 0) x 8 + 12, c_proj 8 x 4 + 8, out 2x8+2
        check_minimize(model, {"c_proj.weight": proj}, (torch.randn(2, 3, 5),),
                       expected_params=48 + 12 * 8 + 12 + 8 * 4 + 8 + 18)


def test_nanogpt_stream_channel_leaves_while_c_is_read_from_x_size():
    model = CausalSelfAttention().eval()
    inp, proj = _ones(model, "inp.weight"), _ones(model, "c_proj.weight")
    inp[0], proj[0] = False, False  # stream channel 0 is constant on both sides of the residual add
    # the views' C and C // n_head now read 7: the plan writes the kept counts as literals
    # inp 7x5+7, c_attn 24x7+24, c_proj 7x8+7, out 2x7+2
    check_minimize(model, {"inp.weight": inp, "c_proj.weight": proj}, (torch.randn(2, 3, 5),),
                   expected_params=42 + 24 * 7 + 24 + 7 * 8 + 7 + 16)


class WindowPartition(nn.Module):
    """timm Swin / MaxViT window partition on a channels-last map: sizes from ``x.shape``, ``H // ws``,
    a ``H % ws`` guard, and ``C`` at the channel axis of both views."""

    def __init__(self, window=2):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6, bias=False), nn.Linear(6, 4)
        self.window = window

    def forward(self, x):
        x = self.fc1(x)
        B, H, W, C = x.shape
        torch._assert(H % self.window == 0, "height must be divisible by the window")
        ws = self.window
        x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        return self.fc2(x)


def test_window_partition_with_floordiv_and_mod_on_sizes():
    model = WindowPartition().eval()
    mask = _ones(model, "fc1.weight")
    mask[[1, 4]] = False  # const(0) channels: they leave fc1 and fc2's columns
    check_minimize(model, {"fc1.weight": mask}, (torch.randn(2, 4, 6, 3),), expected_params=4 * 3 + 4 * 4 + 4)


class ScaledBySize(nn.Module):
    """A size of the channel axis used both to scale and to shape a view of other channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 6), nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc1(x)
        C = h.size(-1)
        g = self.fc2(x).view(-1, C // 2, 2).reshape(-1, 6) * (C ** -0.5)
        return self.fc3(h * 0 + g)


def test_a_size_that_scales_keeps_its_original_value_while_views_get_literals():
    model = ScaledBySize().eval()
    mask = _ones(model, "fc3.weight")
    mask[:, :2] = False  # fc3 reads nothing from channels 0, 1: they leave h, g and fc2
    # fc1 4x3+4, fc2 4x3+4, fc3 2x4+2; C ** -0.5 still reads 6
    check_minimize(model, {"fc3.weight": mask}, (torch.randn(5, 3),), expected_params=16 + 16 + 10)


class FloorDivided(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.conv2(torch.div(self.conv1(x), 0.5, rounding_mode="floor"))


def test_division_with_a_rounding_mode_is_not_taken_for_true_division():
    model = FloorDivided().eval()
    mask = _ones(model, "conv1.weight")
    mask[[0, 3]] = False  # const(bias) channels: kept (the rule does not compute floor division constants)
    check_minimize(model, {"conv1.weight": mask}, (torch.randn(2, 3, 4, 4),), expected_params=24 + 14)


class SwinWindowAttention(nn.Module):
    """timm Swin's window attention: a per-head relative position bias gathered from a table by an index."""

    def __init__(self, width=8, heads=2, window=2):
        super().__init__()
        torch.manual_seed(3)
        self.inp, self.out = nn.Linear(5, width), nn.Linear(width, 2)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("index", torch.randint(0, (2 * window - 1) ** 2, (window ** 4,)))
        self.heads, self.tokens = heads, window * window

    def forward(self, z):
        x = self.inp(z)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * 0.5) @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(self.tokens, self.tokens, -1).permute(2, 0, 1).contiguous()
        attn = (attn + bias.unsqueeze(0)).softmax(-1)
        return self.out(self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1)))


def test_swin_relative_position_bias_loses_the_column_of_a_removed_head():
    model = SwinWindowAttention().eval()
    proj = _ones(model, "proj.weight")
    proj[:, 4:] = False  # nothing reads head 1: its q, k, v rows and its column of the bias table leave
    # inp 8x5+8, qkv 12x8+12, proj 8x4+8, table 9x1, out 2x8+2
    result = check_minimize(model, {"proj.weight": proj}, (torch.randn(2, 4, 5),),
                            expected_params=48 + 108 + 40 + 9 + 18)
    assert tuple(result.module.table.shape) == (9, 1)
