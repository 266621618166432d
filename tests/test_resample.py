"""Resizing, ``Tensor.repeat`` and im2col (NOTE [Resampling]): channels pass through them, constant
channels fold across them, and dead channels leave the layers on both sides."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import check_minimize


def _dead_rows(conv_or_linear, rows):
    mask = torch.ones_like(conv_or_linear.weight, dtype=torch.bool)
    mask[list(rows)] = False
    return mask


class Resize(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.how = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), how
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        y = self.a(x)
        if self.how == "module":
            y = self.up(y)
        else:
            y = F.interpolate(y, size=(11, 7), mode=self.how, **({} if self.how == "nearest" else {"align_corners": True}))
        return self.b(torch.relu(y))


@pytest.mark.parametrize("how", ["module", "nearest", "bilinear", "bicubic"])
def test_dead_channels_leave_and_constants_fold_across_a_resize(how):
    """Rows 0-2 of a have dead weights: they are const(bias) (folded into b's bias) and leave
    a (3 x 27 weights + 3 biases) and b (3 x 4 input weights)."""
    torch.manual_seed(0)
    model = Resize(how).eval()
    masks = {"a.weight": _dead_rows(model.a, range(3))}
    before = 8 * 27 + 8 + 4 * 8 + 4
    check_minimize(model, masks, (torch.randn(2, 3, 6, 5),), expected_params=before - 3 * 27 - 3 - 3 * 4)


class Repeat(nn.Module):
    def __init__(self, along_channels):
        super().__init__()
        self.a, self.b, self.along_channels = nn.Linear(6, 8), nn.Linear(16 if along_channels else 8, 5), along_channels

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y.repeat(1, 2, 2) if self.along_channels else y.repeat(2, 3, 1))


@pytest.mark.parametrize("along_channels", [False, True])
def test_repeat_passes_channels_and_tiles_them_along_the_channel_axis(along_channels):
    """Rows 1 and 4 of a are dead (relu(bias) folds): they leave a (2 x 7) and b (2 input columns,
    twice that when the channels are tiled into 2 copies)."""
    torch.manual_seed(0)
    model = Repeat(along_channels).eval()
    masks = {"a.weight": _dead_rows(model.a, (1, 4))}
    width = 16 if along_channels else 8
    before = 8 * 7 + 5 * (width + 1)
    columns = 4 if along_channels else 2
    check_minimize(model, masks, (torch.randn(2, 3, 6),), expected_params=before - 2 * 7 - 5 * columns)


class Im2col(nn.Module):
    def __init__(self, padding, module):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Linear(4 * 9, 6)
        self.padding, self.module = padding, module
        self.unfold = nn.Unfold(3, padding=padding)

    def forward(self, x):
        y = self.a(x)
        cols = self.unfold(y) if self.module else F.unfold(y, 3, padding=self.padding)
        return self.b(cols.transpose(1, 2))


@pytest.mark.parametrize("module", [False, True])
@pytest.mark.parametrize("padding", [0, 1])
def test_unfold_turns_a_channel_into_its_kernel_block(padding, module):
    """Channel 2 of a is dead: without padding it is const(bias) and folds; its 9 columns of b and
    its row of a (3 + 1) leave. With zero padding the border reads zeros, so the constant does not
    fold and the channel stays."""
    torch.manual_seed(0)
    model = Im2col(padding, module).eval()
    masks = {"a.weight": _dead_rows(model.a, (2,))}
    before = 4 * 4 + 36 * 6 + 6
    expected = before - 4 - 9 * 6 if padding == 0 else before
    check_minimize(model, masks, (torch.randn(2, 3, 5, 5),), expected_params=expected)


def test_a_zero_channel_leaves_through_padded_unfold():
    """A dead channel without bias is const(0): zero padding keeps it zero, so it leaves."""
    torch.manual_seed(0)
    model = Im2col(1, True).eval()
    model.a.bias.data[2] = 0.0
    masks = {"a.weight": _dead_rows(model.a, (2,))}
    before = 4 * 4 + 36 * 6 + 6
    check_minimize(model, masks, (torch.randn(2, 3, 5, 5),), expected_params=before - 4 - 9 * 6)
