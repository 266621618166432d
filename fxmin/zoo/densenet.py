"""DenseNet with torchvision's layout, parameter names and initialization.

Each dense layer reads ``torch.cat`` of all earlier feature maps along channels and runs
BN-ReLU-Conv1x1 (to ``bn_size * growth_rate``)-BN-ReLU-Conv3x3 (to ``growth_rate``); a dense
block returns the ``cat`` of its input and every layer's output; transitions are
BN-ReLU-Conv1x1-AvgPool(2). Names as torchvision: ``features.conv0``, ``features.denseblock1.
denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``, ``classifier``.

Differences from torchvision: ReLUs are out-of-place, the memory-efficient (checkpointing)
path is left out, and ``stem="small"`` offers a 3x3 stride-1 stem without max pool for
small images. DenseNet-121 has 7,978,856 parameters.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 on the ``cat`` of its inputs (torchvision's ``_DenseLayer``).

    Takes a tensor or a list of tensors (concatenated along channels) and returns the
    ``growth_rate`` new channels.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs) -> torch.Tensor:
        prev_features = [inputs] if isinstance(inputs, (torch.Tensor, torch.fx.Proxy)) else list(inputs)
        concatenated = torch.cat(prev_features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers (``denselayer1``...); returns ``cat([input, new1, new2, ...], 1)``.

    >>> block = DenseBlock(num_layers=2, num_input_features=8, bn_size=2, growth_rate=4)
    >>> block(torch.randn(1, 8, 5, 5)).shape
    torch.Size([1, 16, 5, 5])
    """

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                               bn_size=bn_size, drop_rate=drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)
        self.out_channels = num_input_features + num_layers * growth_rate

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool(2, 2) between dense blocks (torchvision's ``_Transition``)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's ``DenseNet``. Init: convs kaiming-normal (fan-in), BN 1/0, Linear bias 0.

    ``stem="imagenet"`` is torchvision's 7x7/2 conv + BN + ReLU + 3x3/2 max pool;
    ``stem="small"`` is a 3x3/1 conv + BN + ReLU (no pool) for 32x32-sized inputs.
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet") -> None:
        super().__init__()
        if stem == "imagenet":
            stem_layers = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2,
                                               padding=3, bias=False)),
                           ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU()),
                           ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        elif stem == "small":
            stem_layers = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, stride=1,
                                               padding=1, bias=False)),
                           ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU())]
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        self.features = nn.Sequential(OrderedDict(stem_layers))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = block.out_channels
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_features, num_features // 2))
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet_block(num_input_features: int = 16, num_layers: int = 3, growth_rate: int = 8,
                   bn_size: int = 4) -> DenseBlock:
    """One dense block: input ``num_input_features`` channels, output ``+ num_layers * growth_rate``.

    >>> densenet_block(16, 3, 8)(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 40, 8, 8])
    """
    block = DenseBlock(num_layers, num_input_features, bn_size, growth_rate)
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    return block


def densenet(growth_rate: int = 12, block_config: Sequence[int] = (2, 2, 2), num_init_features: int = 16,
             bn_size: int = 4, num_classes: int = 10, in_channels: int = 3, stem: str = "small") -> DenseNet:
    """A small DenseNet (defaults: growth 12, three blocks of two layers, small stem, 10 classes).

    >>> densenet()(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    """
    return DenseNet(growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features,
                    bn_size=bn_size, num_classes=num_classes, in_channels=in_channels, stem=stem)


def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121 (torchvision layout; 7,978,856 parameters)."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)
