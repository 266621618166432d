"""Vector norms and scans within each channel, and torch.stack (fxmin/rules/per_channel.py, stacking.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import check_minimize

NORMS = {
    "x.norm(p=2, dim=(2, 3))": lambda x: x.norm(p=2, dim=(2, 3), keepdim=True),
    "torch.norm(x, 3, (2, 3))": lambda x: torch.norm(x, 3, (2, 3), True),
    "vector_norm(x, inf, 3)": lambda x: torch.linalg.vector_norm(x, float("inf"), 3, True),
    "x.norm(dim=2) unsqueezed": lambda x: x.norm(dim=2).unsqueeze(2),
}


class NormScaled(nn.Module):
    """y = conv2(x * ||x||), x = conv1(input): GRN's per-channel norm over the spatial axes."""

    def __init__(self, norm, bias=True):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1, bias=bias), nn.Conv2d(6, 4, 1)
        self.norm = norm

    def forward(self, x):
        h = self.conv1(x)
        return self.conv2(h * self.norm(h))


def _dead_rows(shape, rows):
    mask = torch.ones(shape, dtype=torch.bool)
    mask[rows] = False
    return mask


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", NORMS)
def test_norm_over_spatial_axes_folds_constant_channels(name, frontend):
    model = NormScaled(NORMS[name]).eval()
    masks = {"conv1.weight": _dead_rows((6, 3, 1, 1), [0, 3])}  # const(bias) channels: their norm is a constant
    # conv1 keeps 4 rows of 3 + bias, conv2 4 columns + bias
    check_minimize(model, masks, (torch.randn(2, 3, 5, 4),), expected_params=4 * 4 + 4 * 4 + 4, frontend=frontend)


def test_norm_over_the_channel_axis_keeps_every_channel():
    model = NormScaled(lambda x: x.norm(p=2, dim=1, keepdim=True)).eval()
    masks = {"conv1.weight": _dead_rows((6, 3, 1, 1), [0, 3])}
    check_minimize(model, masks, (torch.randn(2, 3, 5, 4),), expected_params=6 * 4 + 6 * 4 + 4)


class Normalized(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)
        self.dim = dim

    def forward(self, x):
        return self.conv2(F.normalize(self.conv1(x), dim=self.dim))


@pytest.mark.parametrize("dim, kept", [(3, 4), (-2, 4), (1, 6)], ids=["width", "height", "channels: all kept"])
def test_normalize(dim, kept):
    masks = {"conv1.weight": _dead_rows((6, 3, 1, 1), [0, 3])}
    check_minimize(Normalized(dim).eval(), masks, (torch.randn(2, 3, 5, 4),),
                   expected_params=kept * 4 + kept * 4 + 4)


class CumulativeSum(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1, bias=bias), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x).cumsum(2))


def test_cumsum_along_a_spatial_axis_removes_zero_channels():
    masks = {"conv1.weight": _dead_rows((6, 3, 1, 1), [1, 5])}
    check_minimize(CumulativeSum(bias=False).eval(), masks, (torch.randn(2, 3, 5, 4),),
                   expected_params=4 * 3 + 4 * 4 + 4)


def test_cumsum_of_a_nonzero_constant_varies_and_stays():
    masks = {"conv1.weight": _dead_rows((6, 3, 1, 1), [1, 5])}  # const(bias): 1b, 2b, 3b... along H
    check_minimize(CumulativeSum(bias=True).eval(), masks, (torch.randn(2, 3, 5, 4),),
                   expected_params=6 * 4 + 6 * 4 + 4)


class Stacked(nn.Module):
    """conv2(stack([a(x), b(x)], -1).flatten(-2)): the two branches' channels couple."""

    def __init__(self, dim=-1):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 1, bias=False), nn.Conv2d(3, 5, 1, bias=False)
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.dim = dim

    def forward(self, x):
        stacked = torch.stack([self.a(x), self.b(x)], self.dim)
        return self.conv2(stacked.flatten(-2) if self.dim == -1 else stacked.sum(0))


@pytest.mark.parametrize("dim", [-1, 0])
def test_stack_couples_its_inputs(dim):
    masks = {"a.weight": _dead_rows((5, 3, 1, 1), [0, 1]), "b.weight": _dead_rows((5, 3, 1, 1), [1, 2])}
    # only channel 1 is zero in both branches: it leaves a, b and conv2's columns
    result = check_minimize(Stacked(dim).eval(), masks, (torch.randn(2, 3, 4, 4),),
                            expected_params=2 * 4 * 3 + 4 * 4 + 4)
    assert result.module.a.out_channels == 4



class ChannelsLast(nn.Module):
    """Linear(3, 6) on (B, H, W, 3) -> op within each channel -> Linear(6, 4)."""

    def __init__(self, op, bias):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6, bias=bias), nn.Linear(6, 4)
        self.op = op

    def forward(self, x):
        return self.fc2(self.op(self.fc1(x)))


class ChannelsFirst(nn.Module):
    """A padding module (a leaf of the trace) applied to (B, C, H, W)."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return self.pad(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


SPATIAL = {
    "nn.ZeroPad2d (const(0))": (ChannelsFirst(nn.ZeroPad2d((1, 0, 0, 1))), False, 4),
    "nn.ConstantPad2d 0.5 (const(b) varies)": (ChannelsFirst(nn.ConstantPad2d(1, 0.5)), True, 6),
    "nn.ReflectionPad2d (const(b))": (ChannelsFirst(nn.ReflectionPad2d(1)), True, 4),
    "nn.ReplicationPad2d (const(b))": (ChannelsFirst(nn.ReplicationPad2d((1, 2, 0, 1))), True, 4),
    "nn.CircularPad2d (const(b))": (ChannelsFirst(nn.CircularPad2d(1)), True, 4),
    "F.pad of H, W (const(0))": (lambda x: F.pad(x, (0, 0, 0, 1, 0, 1)), False, 4),
    "F.pad of H, W (const(b) varies)": (lambda x: F.pad(x, (0, 0, 0, 1, 0, 1)), True, 6),
    "F.pad of nothing (const(b))": (lambda x: F.pad(x, (0, 0, 0, 0)), True, 4),
    "F.pad replicate (const(b))": (lambda x: F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate")
                                   .permute(0, 2, 3, 1), True, 4),
    "torch.roll of H, W": (lambda x: torch.roll(x, shifts=(-1, 1), dims=(1, 2)), True, 4),
    "x.flip(1)": (lambda x: x.flip(1), True, 4),
    "nn.Softmax over W": (nn.Softmax(dim=2), True, 4),
}


@pytest.mark.parametrize("name", SPATIAL)
def test_ops_within_each_channel(name):
    op, bias, kept = SPATIAL[name]
    model = ChannelsLast(op, bias).eval()
    masks = {"fc1.weight": _dead_rows((6, 3), [1, 4])}
    check_minimize(model, masks, (torch.randn(2, 3, 4, 3),), expected_params=kept * (3 + bias) + 4 * kept + 4)


class GlobalResponseNorm(nn.Module):
    """timm's GRN (ConvNeXt-V2), channels last: a norm over H, W per channel, divided by its mean over channels."""

    def __init__(self, dim):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.eps = 1e-6

    def forward(self, x):
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * x_n)


class GRNBlock(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.fc1, self.grn, self.fc2 = nn.Linear(3, 6, bias=bias), GlobalResponseNorm(6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(self.grn(torch.nn.functional.gelu(self.fc1(x))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("bias, kept", [(False, 4), (True, 6)], ids=["const(0): leaves", "const(c): varies, stays"])
def test_grn_mean_over_channels_keeps_its_divisor(bias, kept, frontend):
    """A zero channel leaves fc1, GRN's weight and bias, and fc2's columns (its output is const(bias_j),
    folded); the mean over channels still divides by 6. A nonzero constant c gives c + b + w·c·x_n,
    which varies with x_n: it stays."""
    masks = {"fc1.weight": _dead_rows((6, 3), [1, 4])}
    result = check_minimize(GRNBlock(bias).eval(), masks, (torch.randn(2, 3, 4, 3),),
                            expected_params=kept * (3 + bias) + 2 * kept + 4 * kept + 4, frontend=frontend)
    if not bias and frontend == "fx":
        assert "sum_with_removed" in result.module.code


class MeanOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        h = self.conv1(x)
        return self.conv2(h) * h.mean(dim=(1, 3), keepdim=True)


def test_mean_over_channels_and_width_adds_the_removed_constants():
    masks = {"conv1.weight": _dead_rows((6, 3, 1, 1), [0, 5])}  # const(bias) channels leave (folded into conv2)
    result = check_minimize(MeanOverChannels().eval(), masks, (torch.randn(2, 3, 4, 5),),
                            expected_params=4 * 4 + 4 * 4 + 4)
    assert "sum_with_removed" in result.module.code


class LeViTNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over tokens: ``bn(x.flatten(0, 1)).reshape_as(x)``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(self.bn(x.flatten(0, 1)).reshape_as(x))


def test_reshape_as_follows_coupled_channels():
    model = LeViTNorm().eval()
    model.bn.running_mean.uniform_(-1, 1)
    masks = {"fc1.weight": _dead_rows((6, 3), [2, 3])}  # constants through BN fold into fc2
    check_minimize(model, masks, (torch.randn(2, 5, 3),), expected_params=4 * 4 + 4 * 2 + 2 * 4 + 2)


class EfficientChannelGate(nn.Module):
    """a -> x * gate(x).expand_as(x) -> b, the gate a per-channel sigmoid of the spatial mean (ECA and
    SE shapes: (B, C, 1, 1) expanded to x's shape)."""

    def __init__(self, bias):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1, bias=bias), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.a(x)
        gate = torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))
        return self.b(x * gate.expand_as(x))


@pytest.mark.parametrize("bias, kept", [(False, 4), (True, 4)], ids=["const(0)", "const(b): folded"])
def test_expand_as_couples_with_the_tensor_it_reads_its_size_from(bias, kept):
    """Rows 1 and 4 of a are dead: x there is const (0 or b), the gate const(sigmoid(.)), the product
    const, folded into b's bias: the channels leave a and b."""
    masks = {"a.weight": _dead_rows((6, 3, 1, 1), [1, 4])}
    check_minimize(EfficientChannelGate(bias).eval(), masks, (torch.randn(2, 3, 4, 4),),
                   expected_params=kept * (3 + bias) + 4 * kept + 4)
