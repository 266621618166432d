"""Minimizing a minimized module again (what each Squeeze-Release cycle does)."""
import copy

import torch
from torch import nn

import fxmin
from helpers import assert_equivalent, masked_copy


def test_second_minimization_composes_with_the_first():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    first = torch.rand(8, 10) > 0.3
    first[:, 2] = False  # input feature 2 unused: the first result selects its inputs
    once = fxmin.minimize(net, {"0.weight": first})
    weights = dict(once.module.named_parameters())
    second = torch.ones_like(weights["0.weight"], dtype=torch.bool)
    second[:, 0] = False  # another input column (original feature 0) ...
    second[1] = False     # ... and a whole hidden unit
    twice = fxmin.minimize(once.module, {"0.weight": second}, (torch.randn(4, 10),))
    # The reference: the first result with the second mask applied, computed without fxmin.
    assert_equivalent(masked_copy(once.module, {"0.weight": second}), twice.module, (torch.randn(4, 10),))
    assert twice.module(torch.randn(5, 10)).shape == (5, 3)
    hidden = twice.module.get_submodule("0")
    assert (hidden.out_features, hidden.in_features) == (7, 8)
    assert fxmin.count_parameters(twice.module) == 7 * 8 + 7 + 3 * 7 + 3
    selections = [n for n in twice.module.graph.nodes if n.target is torch.index_select]
    assert len(selections) == 1  # the second input selection composes with the first


def test_minimizing_a_result_with_nothing_new_changes_nothing():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 2)).eval()
    mask = torch.ones(6, 3, 3, 3, dtype=torch.bool)
    mask[1] = False
    once = fxmin.minimize(net, {"0.weight": mask}, (torch.randn(2, 3, 6, 6),))
    again = fxmin.minimize(copy.deepcopy(once.module), None, (torch.randn(2, 3, 6, 6),))
    assert again.report.params_after == once.report.params_after
    assert_equivalent(once.module, again.module, (torch.randn(2, 3, 6, 6),))


class Pick(nn.Module):
    def __init__(self, computed: bool):
        super().__init__()
        self.fc1, self.fc2, self.computed = nn.Linear(6, 8), nn.Linear(4, 2), computed

    def forward(self, x):
        # a constant index (FX folds torch.arange(4) into a tensor) or one computed in the graph
        index = torch.arange(x.shape[1] - 2) if self.computed else torch.arange(4)
        return self.fc2(self.fc1(x).index_select(1, index))


def test_index_select_with_a_constant_index_drops_the_channels_it_never_picks():
    torch.manual_seed(3)
    model = Pick(computed=False)
    result = fxmin.minimize(model, None, (torch.randn(3, 6),))
    assert result.module.get_submodule("fc1").out_features == 4  # units 4..7 are never picked
    assert_equivalent(model, result.module, (torch.randn(3, 6),))


def test_index_select_with_a_computed_index_keeps_its_channels():
    torch.manual_seed(3)
    model = Pick(computed=True)
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[6] = False  # a dead unit: with an index computed at run time fxmin cannot drop it
    result = fxmin.minimize(model, {"fc1.weight": mask}, (torch.randn(3, 6),))
    assert result.report.params_after == result.report.params_before
    assert_equivalent(masked_copy(model, {"fc1.weight": mask}), result.module, (torch.randn(3, 6),))
