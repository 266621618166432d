"""Building blocks shared by the zoo, written as torchvision writes them but out-of-place.

Every module here traces with ``torch.fx.symbolic_trace``: forwards have no data-dependent
Python control flow, and no op works in place (``nn.ReLU()`` rather than ``nn.ReLU(inplace=True)``,
``x = x + y`` rather than ``x += y``), so an FX graph of a zoo model is a pure dataflow graph.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` that is at least 90 % of it.

    The rule of torchvision's ``_make_divisible`` (MobileNet, EfficientNet channel counts).

    >>> make_divisible(32 * 0.75)
    24
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class Conv2dNormActivation(nn.Sequential):
    """``Sequential(Conv2d, norm, activation)`` as torchvision's ``ops.Conv2dNormActivation``.

    Parameter names are ``0.weight`` (conv), ``1.weight``/``1.bias`` (norm), as in torchvision.
    The convolution has a bias only when there is no norm layer (unless ``bias`` says otherwise).
    The activation is built with no arguments, i.e. out-of-place (torchvision uses ``inplace=True``).

    >>> block = Conv2dNormActivation(3, 16, kernel_size=3, stride=2)
    >>> block(torch.zeros(1, 3, 8, 8)).shape
    torch.Size([1, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
                 activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
                 dilation: int = 1, bias: bool | None = None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                             dilation=dilation, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer())
        super().__init__(*layers)
        self.out_channels = out_channels


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (torchvision's ``ops.misc.Permute``).

    >>> Permute([0, 2, 3, 1])(torch.zeros(1, 3, 4, 5)).shape
    torch.Size([1, 4, 5, 3])
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, exactly torchvision's ``convnext.LayerNorm2d``.

    A subclass of ``nn.LayerNorm`` (same parameters, same ``normalized_shape``) whose forward
    permutes to channels-last, calls ``F.layer_norm`` and permutes back. Under FX it is not a
    leaf: the graph shows ``permute -> layer_norm -> permute``.

    >>> LayerNorm2d(8, eps=1e-6)(torch.randn(2, 8, 3, 3)).shape
    torch.Size([2, 8, 3, 3])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class StochasticDepth(nn.Module):
    """Row-mode stochastic depth (torchvision's ``ops.StochasticDepth(p, "row")``), traceable.

    In eval mode, or with ``p == 0``, it is the identity. In training mode each sample's residual
    branch is dropped with probability ``p`` and survivors are scaled by ``1 / (1 - p)``.

    NOTE [Stochastic depth under FX]: as in torchvision, the train/eval branch is a Python ``if``
    on ``self.training``, so ``symbolic_trace`` bakes in the mode the module was in when traced:
    a model traced in eval mode has no stochastic-depth node at all (which is what minimization
    wants); one traced in training mode keeps the random drop even after ``.eval()``. The random
    mask is built from a slice of the input (``rand_like(x[:, :1, :1, :1])``, ``ndim`` says how
    many axes the input has) rather than from ``x.shape`` arithmetic, so tracing in training mode
    works as well.
    """

    def __init__(self, p: float, ndim: int = 4) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
        self.p = float(p)
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        # One value per sample: x[:, :1, :1, :1] (for ndim 4) keeps the batch axis, size 1 elsewhere.
        sample = x[(slice(None),) + (slice(0, 1),) * (self.ndim - 1)]
        keep = (torch.rand_like(sample) < survival).to(x.dtype)
        if survival > 0.0:
            keep = keep / survival
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row, ndim={self.ndim}"


def init_conv_and_norm(module: nn.Module) -> bool:
    """torchvision's init of a CNN's convs (Kaiming normal, fan out; bias 0) and norms (weight 1, bias 0);
    False for any other module (the caller initializes its Linear layers its own way)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    else:
        return False
    return True


def init_trunc_normal(model: nn.Module) -> None:
    """Every Conv2d and Linear of ``model``: weights truncated normal (std 0.02), biases 0 (ConvNeXt, ViT)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
