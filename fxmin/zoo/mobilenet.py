"""MobileNetV2 with torchvision's exact layout, parameter names and initialization.

``features.0`` is a ``Conv2dNormActivation`` (conv, BN, ReLU6), ``features.1..17`` are
``InvertedResidual`` blocks (``conv`` = optional 1x1 expansion, depthwise 3x3, 1x1 projection
conv + BN, residual add when stride 1 and widths match), ``features.18`` is the 1x1 conv to 1280,
``classifier`` is ``Dropout(0.2), Linear``. 3,504,872 parameters at the defaults.

Differences from torchvision: ReLU6 is out-of-place; the residual add is ``x + self.conv(x)``
exactly as torchvision's (already out-of-place).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2dNormActivation, init_conv_and_norm, make_divisible

#: torchvision's setting: expansion t, output channels c, repeats n, first stride s.
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """Expand 1x1 (if ``expand_ratio != 1``), depthwise 3x3, project 1x1 + BN; add when shapes allow.

    >>> InvertedResidual(16, 16, stride=1, expand_ratio=6)(torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 16, 8, 8])
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2``. Init: convs kaiming-normal fan-out with zero bias, BN 1/0,
    Linear ``normal_(0, 0.01)`` with zero bias.

    ``first_stride`` is 2 in torchvision; 1 keeps more resolution on small images.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Sequence[Sequence[int]] = MOBILENET_V2_SETTING,
                 round_nearest: int = 8, dropout: float = 0.2, in_channels: int = 3,
                 first_stride: int = 2, last_channel: int = 1280) -> None:
        super().__init__()
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [
            Conv2dNormActivation(in_channels, input_channel, stride=first_stride, activation_layer=nn.ReLU6)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if not init_conv_and_norm(m) and isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, **options) -> MobileNetV2:
    """MobileNetV2 (torchvision layout; 3,504,872 parameters at the defaults).

    ``options`` go to ``MobileNetV2`` (``inverted_residual_setting``, ``dropout``, ``in_channels``,
    ``first_stride``, ``last_channel``, ``round_nearest``).

    >>> mobilenet_v2(num_classes=10, width_mult=0.25).eval()(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, **options)
