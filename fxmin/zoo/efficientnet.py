"""EfficientNet (B0 family) with torchvision's layout, parameter names and initialization.

``MBConv`` = optional 1x1 expansion (conv, BN, SiLU), depthwise kxk (conv, BN, SiLU),
squeeze-excitation (``avgpool -> fc1 (1x1 conv) -> SiLU -> fc2 (1x1 conv) -> Sigmoid``, then
``scale * input``), 1x1 projection (conv, BN), stochastic depth and a residual add when the
stride is 1 and widths match. Names as torchvision: ``features.1.0.block.1.0`` (depthwise conv),
``features.1.0.block.2.fc1``, ``classifier.1``. EfficientNet-B0 has 5,288,548 parameters.

Differences from torchvision: activations are out-of-place, the residual add is
``result = result + input`` (torchvision: ``result += input``), the classifier dropout is
out-of-place, and stochastic depth is the traceable ``layers.StochasticDepth``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from .layers import Conv2dNormActivation, StochasticDepth, init_conv_and_norm, make_divisible


class SqueezeExcitation(nn.Module):
    """torchvision's ``ops.SqueezeExcitation``: ``scale = sigmoid(fc2(act(fc1(avgpool(x)))))``; ``scale * x``.

    >>> SqueezeExcitation(16, 4)(torch.randn(1, 16, 5, 5)).shape
    torch.Size([1, 16, 5, 5])
    """

    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.SiLU,
                 scale_activation=nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)
        scale = self.activation(self.fc1(scale))
        scale = self.scale_activation(self.fc2(scale))
        return scale * x


@dataclass(frozen=True)
class MBConvConfig:
    """One stage: expansion ratio, kernel, first stride, input/output channels, repeats."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int

    def scaled(self, width_mult: float, depth_mult: float) -> "MBConvConfig":
        return replace(self, input_channels=make_divisible(self.input_channels * width_mult, 8),
                       out_channels=make_divisible(self.out_channels * width_mult, 8),
                       num_layers=int(math.ceil(self.num_layers * depth_mult)))


#: torchvision's EfficientNet-B0 stages (before width/depth scaling).
EFFICIENTNET_B0_SETTING = (
    MBConvConfig(1, 3, 1, 32, 16, 1), MBConvConfig(6, 3, 2, 16, 24, 2), MBConvConfig(6, 5, 2, 24, 40, 2),
    MBConvConfig(6, 3, 2, 40, 80, 3), MBConvConfig(6, 5, 1, 80, 112, 3), MBConvConfig(6, 5, 2, 112, 192, 4),
    MBConvConfig(6, 3, 1, 192, 320, 1),
)

#: A three-stage setting for tests and CPU runs on 32x32 inputs.
EFFICIENTNET_SMALL_SETTING = (
    MBConvConfig(1, 3, 1, 16, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 2), MBConvConfig(4, 5, 2, 16, 24, 2),
)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (torchvision's ``MBConv``).

    >>> block = MBConv(MBConvConfig(4, 3, 1, 16, 16, 1))
    >>> block(torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 16, 8, 8])
    """

    def __init__(self, cnf: MBConvConfig, stochastic_depth_prob: float = 0.0) -> None:
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError(f"illegal stride value {cnf.stride}")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        expanded = make_divisible(cnf.input_channels * cnf.expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, expanded, kernel_size=1, activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=cnf.kernel, stride=cnf.stride,
                                           groups=expanded, activation_layer=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cnf.input_channels // 4), activation=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.out_channels = cnf.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result = result + x
        return result


class EfficientNet(nn.Module):
    """torchvision's ``EfficientNet`` with MBConv stages.

    Stem 3x3/``first_stride`` conv-BN-SiLU, stages, 1x1 conv-BN-SiLU to ``4 * last`` channels
    (or ``last_channel``), global average pool, ``classifier = Sequential(Dropout, Linear)``.
    Init: convs kaiming-normal fan-out with zero bias, BN 1/0, Linear uniform(+-1/sqrt(out)).
    """

    def __init__(self, setting: Sequence[MBConvConfig] = EFFICIENTNET_B0_SETTING, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2, num_classes: int = 1000, in_channels: int = 3,
                 last_channel: int | None = None, first_stride: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, setting[0].input_channels, kernel_size=3,
                                                        stride=first_stride, activation_layer=nn.SiLU)]
        total_blocks = sum(cnf.num_layers for cnf in setting)
        block_id = 0
        for cnf in setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = cnf if not stage else replace(cnf, input_channels=cnf.out_channels, stride=1)
                stage.append(MBConv(block_cnf, stochastic_depth_prob * float(block_id) / total_blocks))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_input = setting[-1].out_channels
        last_output = last_channel if last_channel is not None else 4 * last_input
        layers.append(Conv2dNormActivation(last_input, last_output, kernel_size=1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_output, num_classes))

        for m in self.modules():
            if not init_conv_and_norm(m) and isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def efficientnet_block(in_channels: int = 16, out_channels: int = 16, expand_ratio: float = 4, kernel: int = 3,
                       stride: int = 1) -> MBConv:
    """One MBConv block with squeeze-excitation (residual add when stride 1 and widths match).

    >>> efficientnet_block(16, 16)(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 16, 8, 8])
    """
    block = MBConv(MBConvConfig(expand_ratio, kernel, stride, in_channels, out_channels, 1))
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    return block


def efficientnet(setting: Sequence[MBConvConfig] = EFFICIENTNET_SMALL_SETTING, num_classes: int = 10,
                 in_channels: int = 3, width_mult: float = 1.0, depth_mult: float = 1.0,
                 dropout: float = 0.2, stochastic_depth_prob: float = 0.2, first_stride: int = 1) -> EfficientNet:
    """A small EfficientNet (defaults: three MBConv stages, stride-1 stem, 10 classes, for 32x32).

    >>> efficientnet()(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    scaled = [cnf.scaled(width_mult, depth_mult) for cnf in setting]
    return EfficientNet(scaled, dropout=dropout, stochastic_depth_prob=stochastic_depth_prob,
                        num_classes=num_classes, in_channels=in_channels, first_stride=first_stride)


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0 (torchvision layout; 5,288,548 parameters)."""
    return EfficientNet(EFFICIENTNET_B0_SETTING, dropout=0.2, stochastic_depth_prob=0.2, num_classes=num_classes)
