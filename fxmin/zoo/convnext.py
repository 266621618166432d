"""ConvNeXt with torchvision's exact layout, parameter names and initialization.

``features.0`` = stem ``Conv2dNormActivation(in, 96, k=4, s=4, bias, LayerNorm2d)``;
``features.1, 3, 5, 7`` = stages of ``CNBlock``; ``features.2, 4, 6`` = downsampling
``Sequential(LayerNorm2d, Conv2d(k=2, s=2))``; ``avgpool``; ``classifier = Sequential(LayerNorm2d,
Flatten(1), Linear)``. A ``CNBlock`` is ``block = Sequential(depthwise Conv2d 7x7, Permute(0,2,3,1),
LayerNorm(eps=1e-6), Linear(d, 4d), GELU, Linear(4d, d), Permute(0,3,1,2))``, then
``layer_scale * block(x)`` (``layer_scale`` of shape ``(d, 1, 1)``, init 1e-6), stochastic depth,
residual add. ConvNeXt-Tiny has 28,589,128 parameters.

Differences from torchvision: the residual add is ``result = result + input`` (torchvision:
``result += input``) and stochastic depth is the traceable ``layers.StochasticDepth`` (identity in
eval, as torchvision's). Additions: ``in_channels``, ``stem="small"`` for 28x28 inputs, ``width``
and ``widths``/``depths`` for reduced models.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from .layers import Conv2dNormActivation, LayerNorm2d, Permute, StochasticDepth, init_trunc_normal


class CNBlock(nn.Module):
    """torchvision's ``CNBlock`` (see the module docstring).

    >>> CNBlock(8)(torch.randn(1, 8, 5, 5)).shape
    torch.Size([1, 8, 5, 5])
    """

    def __init__(self, dim: int, layer_scale: float = 1e-6, stochastic_depth_prob: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result = result + x
        return result


class ConvNeXt(nn.Module):
    """torchvision's ``ConvNeXt`` over stages ``widths`` x ``depths``.

    ``stem``: ``"imagenet"`` is torchvision's patchify ``Conv2d(k=4, s=4)`` + LayerNorm2d;
    ``"small"`` is ``Conv2d(k=2, s=2)`` + LayerNorm2d, for 28x28 (Fashion-)MNIST: the stages
    then run at 14x14, 7x7, 3x3 and 1x1 (the imagenet stem would give 7, 3, 1 and then 0, which
    fails). A stride-1 stem was rejected: it keeps 28x28 in stage 1 at 4x the compute of the
    k=2 stem, and CPU time is the constraint in the Fashion-MNIST experiment.
    Init as torchvision: Conv2d and Linear weights ``trunc_normal_(std=0.02)``, biases 0,
    LayerNorms 1/0.
    """

    def __init__(self, widths: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (3, 3, 9, 3),
                 num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet",
                 stochastic_depth_prob: float = 0.1, layer_scale: float = 1e-6) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {tuple(widths)} and depths {tuple(depths)} differ in length")
        stem_kernel = {"imagenet": 4, "small": 2}.get(stem)
        if stem_kernel is None:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        norm_layer = partial(LayerNorm2d, eps=1e-6)
        layers: list[nn.Module] = [Conv2dNormActivation(in_channels, widths[0], kernel_size=stem_kernel,
                                                        stride=stem_kernel, padding=0, norm_layer=norm_layer,
                                                        activation_layer=None, bias=True)]
        total_blocks = sum(depths)
        block_id = 0
        for stage_index, (dim, depth) in enumerate(zip(widths, depths)):
            stage = []
            for _ in range(depth):
                sd_prob = stochastic_depth_prob * block_id / max(total_blocks - 1.0, 1.0)
                stage.append(CNBlock(dim, layer_scale, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*stage))
            if stage_index + 1 < len(widths):
                layers.append(nn.Sequential(norm_layer(dim), nn.Conv2d(dim, widths[stage_index + 1],
                                                                       kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm_layer(widths[-1]), nn.Flatten(1), nn.Linear(widths[-1], num_classes))

        init_trunc_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(x)


def convnext_tiny(num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet",
                  widths: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (3, 3, 9, 3),
                  width: float = 1.0, stochastic_depth_prob: float = 0.1, layer_scale: float = 1e-6) -> ConvNeXt:
    """ConvNeXt-Tiny (torchvision layout; 28,589,128 parameters at the defaults).

    ``width`` multiplies every stage width (rounded, at least 1) for reduced-width CPU runs.
    For Fashion-MNIST: ``convnext_tiny(num_classes=10, in_channels=1, stem="small", width=0.25)``.

    >>> model = convnext_tiny(10, in_channels=1, stem="small", width=0.25, depths=(1, 1, 1, 1))
    >>> model(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    scaled = tuple(max(1, int(round(w * width))) for w in widths)
    return ConvNeXt(scaled, depths, num_classes=num_classes, in_channels=in_channels, stem=stem,
                    stochastic_depth_prob=stochastic_depth_prob, layer_scale=layer_scale)
