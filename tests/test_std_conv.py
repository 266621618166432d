"""timm's weight-standardized convs (NOTE [Weight standardization] in fxmin/rules/libraries.py), on
pure-torch replicas of timm.layers.std_conv registered as fxmin registers the real module: a dead
output row standardizes to zeros and leaves; every input column stays."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmin.rules import libraries
from helpers import check_minimize


class StdConv2d(nn.Conv2d):
    """timm.layers.std_conv.StdConv2d, its forward as written there."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, bias=False, eps=1e-6):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.std_conv.ScaledStdConv2d, its forward as written there."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, bias=True, gamma=1.0, eps=1e-6):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps
        self.gain = nn.Parameter(torch.rand(out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


libraries._register_std_conv(types.SimpleNamespace(StdConv2d=StdConv2d, ScaledStdConv2d=ScaledStdConv2d))


class Head(nn.Module):
    """A standardized conv read by another one (``body``), then by a pooled classifier (``head``)."""

    def __init__(self, conv):
        super().__init__()
        self.body = conv(3, 8, 3, padding=1)
        self.head_conv = conv(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.head_conv(torch.relu(self.body(x)))
        return self.fc(torch.relu(y).mean(dim=(2, 3)))


def _masks(model, body_rows=(), head_rows=(), head_columns=()):
    masks = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.7
             for i, (name, p) in enumerate(model.named_parameters()) if name in ("body.weight", "head_conv.weight")}
    masks["body.weight"][list(body_rows)] = False
    masks["head_conv.weight"][list(head_rows)] = False
    masks["head_conv.weight"][:, list(head_columns)] = False
    return masks


def _parameters(conv, in_channels, out_channels, taps):
    bias_and_gain = 2 if conv is ScaledStdConv2d else 0
    return out_channels * (in_channels * taps + bias_and_gain)


@pytest.mark.parametrize("conv", [ScaledStdConv2d, StdConv2d])
def test_a_dead_row_read_by_the_classifier_leaves(conv):
    """Rows 1 and 4 of head_conv are dead: const(bias) (zero without a bias) through relu and the
    mean, folded into fc's bias. They leave head_conv (2 rows of 8 weights, bias, gain) and fc (2
    columns of 4)."""
    torch.manual_seed(0)
    model = Head(conv).eval()
    before = _parameters(conv, 3, 8, 9) + _parameters(conv, 8, 6, 1) + 6 * 4 + 4
    expected = before - _parameters(conv, 8, 2, 1) - 2 * 4
    check_minimize(model, _masks(model, head_rows=(1, 4)), (torch.randn(2, 3, 6, 6),), expected_params=expected)


@pytest.mark.parametrize("conv", [ScaledStdConv2d, StdConv2d])
def test_every_input_column_stays(conv):
    """Dead rows of body are read by head_conv, and dead columns of head_conv are in its row
    statistics: removing either would change what head_conv computes, so nothing leaves."""
    torch.manual_seed(0)
    model = Head(conv).eval()
    before = sum(p.numel() for p in model.parameters())
    check_minimize(model, _masks(model, body_rows=(0, 5), head_columns=(2,)), (torch.randn(2, 3, 6, 6),),
                   expected_params=before)
