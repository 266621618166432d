"""``torch.einsum`` in attention (NOTE [Einsum]): MaxViT's relative attention writes ``q @ k^T`` and
``weights @ v`` as einsums; heads and q/k dims leave through them exactly as through ``matmul``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmin.rules.einsum import parse_equation
from helpers import check_minimize

DIM, HEADS, HD, P = 32, 4, 8, 5


class EinsumAttention(nn.Module):
    """MaxViT's RelativePositionalMultiHeadAttention, with a per-head bias table of (heads, P, P)."""

    def __init__(self, qkv_bias=True, scores="B G H I D, B G H J D -> B G H I J",
                 mix="B G H I J, B G H J D -> B G H I D"):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=qkv_bias)
        self.proj = nn.Linear(DIM, DIM)
        self.bias = nn.Parameter(torch.randn(HEADS, P, P))
        self.scores, self.mix = scores, mix

    def forward(self, x):
        B, G, T, D = x.shape
        q, k, v = torch.chunk(self.qkv(x), 3, dim=-1)
        q = q.reshape(B, G, T, HEADS, HD).permute(0, 1, 3, 2, 4)
        k = k.reshape(B, G, T, HEADS, HD).permute(0, 1, 3, 2, 4)
        v = v.reshape(B, G, T, HEADS, HD).permute(0, 1, 3, 2, 4)
        weights = F.softmax(torch.einsum(self.scores, q, k) * HD ** -0.5 + self.bias, dim=-1)
        out = torch.einsum(self.mix, weights, v)
        return self.proj(out.permute(0, 1, 3, 2, 4).reshape(B, G, T, D))


def _inputs():
    return (torch.randn(2, 3, P, DIM, generator=torch.Generator().manual_seed(1)),)


def _model(**options):
    torch.manual_seed(0)
    return EinsumAttention(**options).eval()


def _all_kept(model):
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.dim() == 2}


BEFORE = 3 * DIM * DIM + 3 * DIM + DIM * DIM + DIM + HEADS * P * P


@pytest.mark.parametrize("frontend", ["fx", "export"])  # torch.einsum, aten.einsum
def test_a_head_nobody_reads_leaves_through_both_einsums(frontend):
    """proj reads nothing of head 1: its q, k and v rows of qkv (3 x 8 rows of 32 + 8 biases), its
    8 columns of proj and its 5x5 slice of the bias table leave."""
    model = _model()
    masks = _all_kept(model)
    masks["proj.weight"][:, HD:2 * HD] = False
    expected = BEFORE - 3 * HD * (DIM + 1) - DIM * HD - P * P
    result = check_minimize(model, masks, _inputs(), expected_params=expected, frontend=frontend)
    assert tuple(result.module.qkv.weight.shape) == (3 * DIM - 3 * HD, DIM)


def test_a_zero_query_dim_leaves_q_and_k():
    """Without a qkv bias a dead row is const(0). Dim 3 of every q head (heads keep equal dims, NOTE
    [Heads]) leaves q and k: 2 x 4 rows of 32. Dim 5 of every v head leaves v (4 rows) and proj (4
    columns of 32), so that the chunk of qkv keeps its three pieces equal."""
    model = _model(qkv_bias=False)
    masks = _all_kept(model)
    for head in range(HEADS):
        masks["qkv.weight"][head * HD + 3] = False
        masks["qkv.weight"][2 * DIM + head * HD + 5] = False
    expected = BEFORE - 3 * DIM - 3 * HEADS * DIM - HEADS * DIM
    check_minimize(model, masks, _inputs(), expected_params=expected)


def test_letters_in_another_order_are_followed():
    """The same products with the axes named differently and the output axes reordered."""
    model = _model(scores="bghid,bghjd->bghij", mix="zyhij,zyhjd->zyhid")
    masks = _all_kept(model)
    masks["proj.weight"][:, :HD] = False
    expected = BEFORE - 3 * HD * (DIM + 1) - DIM * HD - P * P
    check_minimize(model, masks, _inputs(), expected_params=expected)


class ThreeOperands(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        return torch.einsum("bi,bi,bj->bj", self.a(x), x, self.b(x))


def test_other_equations_keep_every_channel_exactly():
    """Three operands: not followed, so the dead rows of a and b stay (still exact)."""
    torch.manual_seed(0)
    model = ThreeOperands().eval()
    masks = {"a.weight": torch.ones(DIM, DIM, dtype=torch.bool), "b.weight": torch.ones(DIM, DIM, dtype=torch.bool)}
    masks["a.weight"][:4] = False
    masks["b.weight"][:4] = False
    check_minimize(model, masks, (torch.randn(3, DIM),), expected_params=2 * (DIM * DIM + DIM))


@pytest.mark.parametrize("equation, parsed", [
    ("B G H I D, B G H J D -> B G H I J", (["BGHID", "BGHJD"], "BGHIJ")),
    ("ij,jk", None),                # implicit output
    ("...ij,...jk->...ik", None),   # ellipsis
    ("ii->i", None),                # a diagonal
])
def test_parse_equation(equation, parsed):
    assert parse_equation(equation) == parsed
