"""A small CNN with BatchNorm, a grouped conv, pooling and flatten, with dead channels planted.

    python -m examples.minimize_cnn

What happens to each planted channel (``python -m examples.minimize_cnn`` prints the table):

- ``conv1`` filters 3 and 5 are masked to zero, so those channels are constants after
  BatchNorm and ReLU: channel 3 is ``relu(0.5 + ...) > 0``, channel 5 is ``relu(negative) = 0``.
  ``conv2`` is zero-padded, so the *nonzero* constant channel 3 must stay (border pixels see
  fewer taps; folding it into a bias would be inexact). Channel 5 could go, but ``conv2`` has
  groups=4 and group 0 keeps all its 4 input channels, so group 1 keeps 4 too (uniform groups).
- ``conv2`` filters 8..11 (all of group 2) are masked to zero: their outputs are constants that
  fold into ``conv3``'s bias (a 1x1 conv, so folding is exact after BatchNorm, ReLU and max
  pooling); group 2 then has no output left, so it goes whole (groups 4 -> 3), and with it the
  ``conv1`` channels 8..11 that only group 2 read.
- The classifier never reads features 8..11 of the flattened ``conv3`` output (channel 2 after
  2x2 average pooling): channel 2 is unneeded, so ``conv3`` loses that filter.
"""
from __future__ import annotations

import torch
from torch import nn

import fxmin


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.gap(torch.relu(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def build(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():  # BatchNorm statistics as if trained
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        model.bn1.bias[3] = 0.5  # conv1 channel 3, once its filter is masked: a nonzero constant
        model.bn1.bias[5] = -1.0  # conv1 channel 5: relu(negative) = 0
    return model.eval()


def planted_masks(model: SmallCNN) -> dict:
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()
             if name.endswith("weight") and p.dim() > 1}
    masks["conv1.weight"][[3, 5]] = False  # two dead filters
    masks["conv2.weight"][8:12] = False  # four dead filters: all of group 2
    masks["fc.weight"][:, 8:12] = False  # conv3's output channel 2 (features 8..11 after flatten) is never read
    return masks


def main() -> fxmin.MinimizeResult:
    model = build()
    masks = planted_masks(model)
    result = fxmin.minimize(model, masks, example_inputs=(torch.randn(4, 3, 16, 16),))
    print(result.report.table())
    print()
    print(result.module.code.strip())
    return result


if __name__ == "__main__":
    main()
