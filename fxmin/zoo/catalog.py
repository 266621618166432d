"""``MODELS``: small instances of every zoo family, each with an example input, for tests.

``MODELS[name] = (factory, example_inputs)``: ``factory()`` builds a fresh model (initialized
from the global RNG; seed with ``torch.manual_seed`` first for reproducible weights) and
``example_inputs()`` returns a tuple of inputs, built from a fixed-seed generator so every call
gives the same tensors. Image models take ``(2, 3, 32, 32)``, the Fashion-MNIST ConvNeXt
``(2, 1, 28, 28)``, the GPT and the Llama ``(2, 16)`` token ids (int64).

>>> factory, example_inputs = MODELS["resnet18"]
>>> factory().eval()(*example_inputs()).shape
torch.Size([2, 10])
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from .convnext import convnext_tiny
from .densenet import densenet, densenet_block
from .efficientnet import efficientnet, efficientnet_block
from .gpt import gpt
from .llama import llama
from .mobilenet import mobilenet_v2
from .resnet import resnet18, resnet50
from .vit import vit


def images(channels: int = 3, size: int = 32, batch: int = 2) -> tuple[torch.Tensor]:
    """A fixed ``(batch, channels, size, size)`` normal batch (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, channels, size, size, generator=generator),)


def tokens(vocab_size: int = 128, length: int = 16, batch: int = 2) -> tuple[torch.Tensor]:
    """A fixed ``(batch, length)`` int64 batch of token ids (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab_size, (batch, length), generator=generator),)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "resnet18": (partial(resnet18, num_classes=10, width=8), images),
    "resnet50": (partial(resnet50, num_classes=10, width=8), images),
    "mobilenet_v2": (partial(mobilenet_v2, num_classes=10, width_mult=0.25, last_channel=64), images),
    "densenet_block": (partial(densenet_block, 16, 3, 8), partial(images, 16, 8)),
    "densenet": (densenet, images),
    "efficientnet_block": (partial(efficientnet_block, 16, 16), partial(images, 16, 8)),
    "efficientnet": (efficientnet, images),
    "convnext": (partial(convnext_tiny, num_classes=10, stem="small", widths=(16, 32, 48, 64),
                         depths=(1, 1, 2, 1)), images),
    "convnext_fashion": (partial(convnext_tiny, num_classes=10, in_channels=1, stem="small", width=0.125,
                                 depths=(1, 1, 1, 1)), partial(images, 1, 28)),
    "vit": (vit, images),
    "gpt": (gpt, tokens),
    "llama": (llama, tokens),
}
