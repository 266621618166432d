"""nn.MultiheadAttention: dead heads, q/k dims and residual-stream channels go exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmin
from fxmin.compensated.attention import SlicedMultiheadAttention
from helpers import check_minimize

E, H, HD = 32, 4, 8


class Block(nn.Module):
    """Pre-LN (``embed=False``) or Linear-embedded (``embed=True``) attention + MLP block."""

    def __init__(self, batch_first: bool, embed: bool = False):
        super().__init__()
        self.first = nn.Linear(12, E) if embed else nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.fc, self.act, self.proj, self.head = nn.Linear(E, 64), nn.GELU(), nn.Linear(64, E), nn.Linear(E, 5)
        self.embed = embed

    def forward(self, x):
        if self.embed:  # x is (N, features, T): features on axis 1, where fxmin tracks model inputs
            x = x.transpose(1, 2) if self.attn.batch_first else x.permute(2, 0, 1)
        h = self.first(x)
        x = (h if self.embed else x) + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.proj(self.act(self.fc(x)))
        return self.head(x)


def _planted(model, stream: bool):
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()  # nonzero biases everywhere
        masks["attn.out_proj.weight"][:, HD:2 * HD] = False  # head 1: its output columns are zero
        for h in range(H):  # q dim 3 of every head is const(0)
            masks["attn.in_proj_weight"][h * HD + 3] = False
            model.attn.in_proj_bias[h * HD + 3] = 0
        if stream:  # residual channel 5: every writer writes const(0)
            for name, module in (("first", model.first), ("attn.out_proj", model.attn.out_proj), ("proj", model.proj)):
                masks[f"{name}.weight"][5] = False
                module.bias[5] = 0
    return masks


def _inputs(batch_first: bool):
    torch.manual_seed(3)
    return (torch.randn((2, 6, E) if batch_first else (6, 2, E)),)


@pytest.mark.parametrize("batch_first", [True, False])
def test_dead_head_and_qk_dims_go(batch_first):
    torch.manual_seed(0)
    model = Block(batch_first).eval()
    # before: LN 64, in_proj 96x32+96, out_proj 32x32+32, fc 32x64+64, proj 64x32+32, head 32x5+5
    assert fxmin.count_parameters(model) == 64 + 3168 + 1056 + 2112 + 2080 + 165
    # after: 3 heads x (7 q + 7 k + 8 v) = 66 projection rows; out_proj reads 24 value dims
    expected = 64 + (66 * 32 + 66) + (32 * 24 + 32) + 2112 + 2080 + 165
    result = check_minimize(model, _planted(model, stream=False), _inputs(batch_first), expected_params=expected)
    attention = result.module.attn
    assert isinstance(attention, SlicedMultiheadAttention) and attention.heads == 3
    assert attention.q_proj.out_features == attention.k_proj.out_features == 21
    assert attention.v_proj.out_features == 24
    assert attention.scale == pytest.approx(HD ** -0.5)  # the original head size's scale


@pytest.mark.parametrize("batch_first", [True, False])
def test_residual_stream_channel_goes_through_attention(batch_first):
    torch.manual_seed(1)
    model = Block(batch_first, embed=True).eval()
    # every width-32 stream matrix loses channel 5: embed 31x12, in_proj 66x31, out_proj 31x24,
    # fc 64x31, proj 31x64, head 5x31
    expected = (31 * 12 + 31) + (66 * 31 + 66) + (31 * 24 + 31) + (64 * 31 + 64) + (31 * 64 + 31) + (5 * 31 + 5)
    torch.manual_seed(3)
    result = check_minimize(model, _planted(model, stream=True), (torch.randn(2, 12, 6),), expected_params=expected)
    assert result.module.attn.q_proj.in_features == 31 and result.module.attn.out_proj.out_features == 31


@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("batch_first", [True, False])
def test_random_masks_exact(batch_first, density):
    torch.manual_seed(2)
    model = Block(batch_first).eval()
    generator = torch.Generator().manual_seed(4)
    masks = {n: torch.rand(p.shape, generator=generator) < density for n, p in model.named_parameters() if p.dim() > 1}
    result = check_minimize(model, masks, _inputs(batch_first))
    assert result.report.params_after <= result.report.params_before


class CrossAttention(nn.Module):
    """Query from one input, keys and values from another, with a causal and a padding mask."""

    def __init__(self, read_weights: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, 3)
        self.register_buffer("causal", torch.ones(5, 7, dtype=torch.bool).triu(1))
        self.register_buffer("padding", torch.tensor([[False] * 7, [False] * 5 + [True] * 2]))
        self.read_weights = read_weights

    def forward(self, x, memory):
        out, weights = self.attn(x, memory, memory, key_padding_mask=self.padding, attn_mask=self.causal,
                                 need_weights=self.read_weights)
        y = self.head(out)
        return y + weights.sum() if self.read_weights else y


@pytest.mark.parametrize("read_weights", [False, True])
def test_cross_attention_with_masks_exact(read_weights):
    torch.manual_seed(5)
    model = CrossAttention(read_weights).eval()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if p.dim() > 1}
    masks["attn.out_proj.weight"][:, :HD] = False  # head 0 dead
    inputs = (torch.randn(2, 5, E), torch.randn(2, 7, E))
    result = check_minimize(model, masks, inputs)
    if read_weights:  # the averaged attention weights depend on every head: the module stays whole
        assert isinstance(result.module.attn, nn.MultiheadAttention)
        assert result.report.params_after == result.report.params_before
    else:
        assert result.module.attn.heads == 3
        assert result.report.params_before - result.report.params_after == 3 * (HD * E + HD) + E * HD
