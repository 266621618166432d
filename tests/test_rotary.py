"""Rotary position embeddings: q/k dims leave in pairs, every head alike (NOTE [Rotary pairs])."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmin
from helpers import check_minimize


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    def __init__(self, width=32, heads=4, tokens=16):
        super().__init__()
        self.heads, self.head_dim, self.width = heads, width // heads, width
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        inverse = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(tokens).float(), inverse)
        table = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", table.cos())
        self.register_buffer("sin", table.sin())

    def forward(self, x):
        batch, tokens = x.shape[0], x.shape[1]

        def heads(t):
            return t.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(batch, tokens, self.width))


def _zero_q_rows(model, masks, dims):
    with torch.no_grad():
        for head in range(model.heads):
            for dim in dims:
                masks["q.weight"][head * model.head_dim + dim] = False
                model.q.bias[head * model.head_dim + dim] = 0.0


def test_a_dead_rotary_pair_leaves_every_head():
    torch.manual_seed(0)
    model = RotaryAttention()
    masks = {"q.weight": torch.ones(32, 32, dtype=torch.bool)}
    _zero_q_rows(model, masks, (1, 5))  # the pair (1, 1 + head_dim / 2) in every head
    # q and k each lose 2 dims in each of 4 heads: 8 rows of 33 parameters each; the tables are buffers
    expected = 4 * (32 * 32 + 32) - 2 * 8 * 33
    result = check_minimize(model, masks, (torch.randn(2, 16, 32),), expected_params=expected)
    assert tuple(result.module.cos.shape) == (16, 6)
    assert "scale = 0.3535533905932737" in result.module.code  # 1/sqrt(original head_dim)


@pytest.mark.parametrize("dims", [(1,), (5,)])
def test_half_a_rotary_pair_keeps_both(dims):
    """q_1 rotates into q_5: a zero q_1 alone still leaves a varying rotated dim 1."""
    torch.manual_seed(1)
    model = RotaryAttention()
    masks = {"q.weight": torch.ones(32, 32, dtype=torch.bool)}
    _zero_q_rows(model, masks, dims)
    result = check_minimize(model, masks, (torch.randn(2, 16, 32),))
    assert result.report.params_after == result.report.params_before


def test_rotary_attention_random_masks_exact():
    torch.manual_seed(2)
    model = RotaryAttention()
    masks = {name: torch.rand_like(p) > 0.7 for name, p in model.named_parameters() if p.dim() == 2}
    check_minimize(model, masks, (torch.randn(2, 16, 32),))
    assert fxmin.count_parameters(model) == 4 * (32 * 32 + 32)  # the model itself is untouched


class SlicedPositions(nn.Module):
    """A position table longer than the sequence, sliced before it is added (``pos[:, :T]``)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 32, 8))
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x) + self.pos[:, :16])


def test_a_sliced_position_table_loses_the_removed_channels():
    torch.manual_seed(3)
    model = SlicedPositions()
    masks = {"fc1.weight": torch.ones(8, 8, dtype=torch.bool), "fc2.weight": torch.ones(3, 8, dtype=torch.bool)}
    masks["fc2.weight"][:, 5] = False  # channel 5 is read by nobody: fc1's row, and the table's column, go
    result = check_minimize(model, masks, (torch.randn(2, 16, 8),), expected_params=32 * 7 + 7 * 8 + 7 + 3 * 7 + 3)
    assert tuple(result.module.pos.shape) == (1, 32, 7)


def test_a_dead_head_leaves_a_rotary_model():
    """The cos/sin tables serve every head, but a head that nobody reads still leaves: the tables
    keep the dims the kept heads keep (NOTE [Rotary pairs])."""
    torch.manual_seed(4)
    model = RotaryAttention()
    masks = {"o.weight": torch.ones(32, 32, dtype=torch.bool)}
    masks["o.weight"][:, 8:16] = False  # head 1: its output-projection columns are zero
    # q, k and v lose head 1's 8 rows of 33 parameters each, o loses 8 columns
    expected = 4 * (32 * 32 + 32) - 3 * 8 * 33 - 32 * 8
    result = check_minimize(model, masks, (torch.randn(2, 16, 32),), expected_params=expected)
    assert tuple(result.module.cos.shape) == (16, 8)
