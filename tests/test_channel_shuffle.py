"""ShuffleNet's channel shuffle (NOTE [Channel shuffle]): exact removal of a product of groups and
positions, exact keep-all otherwise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import check_minimize


class Shuffle(nn.Module):
    """conv1 -> channel shuffle (2 groups of 3) -> conv2, with the sizes as torchvision writes them
    (read from ``x.size()``) or as literals."""

    def __init__(self, computed: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 1)
        self.computed = computed

    def forward(self, x):
        x = self.conv1(x)
        if self.computed:
            batch, channels, height, width = x.size()
            x = x.view(batch, 2, channels // 2, height, width)
            x = torch.transpose(x, 1, 2).contiguous()
            x = x.view(batch, channels, height, width)
        else:
            x = x.view(x.size(0), 2, 3, 5, 5).transpose(1, 2).contiguous().view(-1, 6, 5, 5)
        return self.conv2(x)


def _masks(dead):
    mask = torch.ones(6, 4, 1, 1, dtype=torch.bool)
    mask[dead] = False
    return {"conv1.weight": mask}


# dead conv1 rows -> channels kept by conv1 (a product of groups x positions) -> parameters
CASES = {
    "position 2 of both groups": ([2, 5], 4),
    "group 1 whole": ([3, 4, 5], 3),
    "position 2 of group 0 only": ([2], 6),      # not a product: everything stays
    "positions 0, 2 of group 0 and 2 of group 1": ([0, 2, 5], 4),  # the closure keeps position 0 of both
}


@pytest.mark.parametrize("computed", [False, True], ids=["literal sizes", "sizes from x.size()"])
@pytest.mark.parametrize("case", CASES)
def test_shuffle(case, computed):
    dead, kept = CASES[case]
    model = Shuffle(computed=computed).eval()
    check_minimize(model, _masks(dead), (torch.randn(2, 4, 5, 5),), expected_params=kept * 5 + kept * 4 + 4)
