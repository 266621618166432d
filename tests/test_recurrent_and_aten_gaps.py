"""Recurrent layers (kept whole), `repeat_interleave`, and ATen forms of ops the torch.fx front end knows (`rsub`),
through both front ends: float64 equivalence and parameter counts by hand."""
import pytest
import torch
from torch import nn

import fxmin
from tests.helpers import assert_equivalent, masked_copy


class RecurrentMixer(nn.Module):
    """Sequencer2D's pattern: a channel MLP around a bidirectional LSTM."""

    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(10, 8), nn.Linear(8, 3)
        self.rnn = cell(8, 5, batch_first=True, bidirectional=True)

    def forward(self, x):
        y, _ = self.rnn(self.a(x))
        return self.c(torch.relu(self.b(y)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_a_recurrent_layer_stays_whole_and_the_layers_after_it_shrink(frontend, cell):
    torch.manual_seed(0)
    model = RecurrentMixer(cell).double().eval()
    masks = {"a.weight": torch.ones(8, 6, dtype=torch.bool), "c.weight": torch.ones(3, 8, dtype=torch.bool)}
    masks["a.weight"][:3] = False  # constant features into the recurrent layer: it reads them all, a keeps 8
    masks["c.weight"][:, :2] = False  # c reads 6 of b's units: b keeps 6
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    result = fxmin.minimize(model, masks, (x,), frontend=frontend)
    before = fxmin.count_parameters(model)
    assert fxmin.count_parameters(result.module) == before - 2 * (10 + 1) - 3 * 2
    assert assert_equivalent(masked_copy(model, masks), result.module, (x,)) <= 1e-12


class OneMinus(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(1.0 - torch.sigmoid(self.a(x)))  # torch.export: aten.rsub.Scalar


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_one_minus_x_folds_dead_units_through_both_front_ends(frontend):
    torch.manual_seed(0)
    model = OneMinus().double().eval()
    masks = {"a.weight": torch.ones(6, 4, dtype=torch.bool)}
    masks["a.weight"][:2] = False  # two constant units fold into b's bias
    x = torch.randn(3, 4, dtype=torch.float64)
    result = fxmin.minimize(model, masks, (x,), frontend=frontend)
    assert fxmin.count_parameters(result.module) == (4 * 4 + 4) + (2 * 4 + 2)
    assert assert_equivalent(masked_copy(model, masks), result.module, (x,)) <= 1e-12


class GlobalQuery(nn.Module):
    """GCViT's pattern: a query computed once per image batch, repeated for every window with
    ``repeat_interleave(B // q.shape[0], dim=0)``; and channels repeated in place (``dim=1``)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(24, 3)

    def forward(self, windows, image):
        q = self.q(image).repeat_interleave(windows.shape[0] // image.shape[0], dim=0)
        both = torch.cat([q * self.k(windows), self.v(windows)], dim=-1)
        return self.out(both.repeat_interleave(2, dim=-1))  # channel c -> 2c, 2c + 1


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_repeat_interleave_along_windows_passes_channels_through(frontend):
    torch.manual_seed(0)
    model = GlobalQuery().double().eval()
    masks = {"out.weight": torch.ones(3, 24, dtype=torch.bool)}
    masks["out.weight"][:, :4] = False  # both copies of q * k's first two units: q and k lose them
    windows, image = torch.randn(6, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    result = fxmin.minimize(model, masks, (windows, image), frontend=frontend)
    assert fxmin.count_parameters(result.module) == fxmin.count_parameters(model) - 2 * (2 * 5) - 3 * 4
    assert assert_equivalent(masked_copy(model, masks), result.module, (windows, image)) <= 1e-12
