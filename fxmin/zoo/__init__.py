"""fxmin's model zoo: pure-torch definitions of the families fxmin is tested and benchmarked on.

torchvision and timm do not install beside the CPU torch used here, so these are faithful
rewrites (torchvision layouts and parameter names for ResNet, MobileNetV2, DenseNet,
EfficientNet and ConvNeXt; timm's for the ViT; nanoGPT's for the GPT; Hugging Face Llama's for the
Llama). Every model traces with ``torch.fx.symbolic_trace`` and uses no in-place op (``nn.ReLU()``
not ``nn.ReLU(inplace=True)``, ``x = x + y`` not ``x += y``). Factories draw their initial weights
from the global RNG.

>>> import torch, fxmin.zoo as zoo
>>> model = zoo.resnet18(num_classes=10)
>>> torch.fx.symbolic_trace(model.eval())(torch.randn(1, 3, 32, 32)).shape
torch.Size([1, 10])
"""
from .catalog import MODELS, images, tokens
from .convnext import CNBlock, ConvNeXt, convnext_tiny
from .densenet import DenseBlock, DenseLayer, DenseNet, Transition, densenet, densenet121, densenet_block
from .efficientnet import (EfficientNet, MBConv, MBConvConfig, SqueezeExcitation, efficientnet, efficientnet_b0,
                           efficientnet_block)
from .gpt import GPT, CausalSelfAttention, gpt, gpt2_small
from .llama import DecoderLayer, GroupedQueryAttention, Llama, SwiGLU, llama
from .masks import random_masks
from .layers import Conv2dNormActivation, LayerNorm2d, Permute, StochasticDepth, make_divisible
from .mobilenet import InvertedResidual, MobileNetV2, mobilenet_v2
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from .vit import Attention, VisionTransformer, vit, vit_small

__all__ = [
    "MODELS", "images", "random_masks", "tokens",
    "CNBlock", "ConvNeXt", "convnext_tiny",
    "DenseBlock", "DenseLayer", "DenseNet", "Transition", "densenet", "densenet121", "densenet_block",
    "EfficientNet", "MBConv", "MBConvConfig", "SqueezeExcitation", "efficientnet", "efficientnet_b0",
    "efficientnet_block",
    "GPT", "CausalSelfAttention", "gpt", "gpt2_small",
    "DecoderLayer", "GroupedQueryAttention", "Llama", "SwiGLU", "llama",
    "Conv2dNormActivation", "LayerNorm2d", "Permute", "StochasticDepth", "make_divisible",
    "InvertedResidual", "MobileNetV2", "mobilenet_v2",
    "BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50",
    "Attention", "VisionTransformer", "vit", "vit_small",
]
