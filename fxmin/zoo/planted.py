"""Zoo models with dead structure planted in them, and the parameter count fxmin must reach, made by hand.

``PLANTED[family]()`` returns ``(model, masks, example_inputs, expected)``: masks (and a few hand-set
BatchNorm shifts) plant dead heads, dead hidden units, dead residual-stream / concatenation channels
(every writer zero) and constant channels with a nonzero bias; ``expected.count()`` is the count
made by hand: :class:`Expected` starts from the model's own shapes and each planted unit says which
axis of which parameter loses how many entries (or how many new parameters a fold must create).
Nothing is asked of fxmin to build that count. Where fxmin must keep more than was planted, the
comment at that spot says why exactness forces it. ``tests/test_families.py`` checks them and
``python -m benchmarks.families_report`` publishes them.

One-dimensional parameters (biases, norm affines) and BatchNorm running statistics are set to
random nonzero values first (:func:`perturbed`), so no channel is constant by accident and every
constant that gets folded is a nonzero number.

>>> model, masks, inputs, expected = PLANTED["resnet18"]()
>>> expected.count() < sum(p.numel() for p in model.parameters())
True
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .catalog import MODELS, images
from .convnext import convnext_tiny
from .densenet import densenet
from .efficientnet import efficientnet, efficientnet_block
from .mobilenet import mobilenet_v2
from .resnet import resnet18, resnet50


# -- shared pieces ----------------------------------------------------------------------------------------------

def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every 1-D parameter, BN statistic and layer scale random and nonzero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("layer_scale"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def keep_all(model: nn.Module) -> dict:
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


class Expected:
    """A hand count: the model's parameter shapes, with the planted rows/columns taken off."""

    def __init__(self, model: nn.Module):
        self.shapes = {name: list(p.shape) for name, p in model.named_parameters()}
        self.created = 0

    def drop(self, name: str, axis: int = 0, count: int = 1) -> "Expected":
        self.shapes[name][axis] -= count
        return self

    def out(self, prefix: str, count: int = 1) -> "Expected":
        """Output channels of a conv/linear/norm ``prefix``: weight rows and bias entries."""
        for suffix in ("weight", "bias"):
            if f"{prefix}.{suffix}" in self.shapes:
                self.drop(f"{prefix}.{suffix}", 0, count)
        return self

    def into(self, prefix: str, count: int = 1) -> "Expected":
        """Input channels of a conv/linear ``prefix``: weight columns."""
        return self.drop(f"{prefix}.weight", 1, count)

    def create(self, count: int) -> "Expected":
        """Parameters a fold has to create (a bias for a conv that had none)."""
        self.created += count
        return self

    def count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values()) + self.created


def kill_rows(masks: dict, prefix: str, index) -> None:
    """Zero output channel(s) ``index`` of ``prefix`` (weight rows, and the bias if it has one)."""
    for suffix in ("weight", "bias"):
        if f"{prefix}.{suffix}" in masks:
            masks[f"{prefix}.{suffix}"][index] = False


def shift_bn(model: nn.Module, path: str, channel: int, value: float) -> None:
    """BatchNorm ``path`` maps a zero input on ``channel`` to ``value`` (mean 0, bias ``value``)."""
    bn = model.get_submodule(path)
    with torch.no_grad():
        bn.running_mean[channel] = 0.0
        bn.bias[channel] = value


# -- ResNet-18 --------------------------------------------------------------------------------------------------

def planted_resnet18():
    torch.manual_seed(0)
    model = perturbed(resnet18(num_classes=10, width=8))
    masks, want = keep_all(model), Expected(model)
    # Dead stream channel 3 of stage 1 (width 8): every writer is zero — the stem (conv row, BN
    # affine) and each block's last BN. Readers lose a column: both blocks' conv1 and the next
    # stage's conv1 and downsample conv.
    for bn in ("bn1", "layer1.0.bn2", "layer1.1.bn2"):
        kill_rows(masks, bn, 3)
        kill_rows(masks, bn.replace("bn", "conv"), 3)
        want.out(bn).out(bn.replace("bn", "conv"))
    for reader in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        want.into(reader)
    # Dead stream channel 5 of stage 3 (width 32): writers include the downsample shortcut.
    for conv, bn in (("layer3.0.conv2", "layer3.0.bn2"), ("layer3.0.downsample.0", "layer3.0.downsample.1"),
                     ("layer3.1.conv2", "layer3.1.bn2")):
        kill_rows(masks, conv, 5), kill_rows(masks, bn, 5)
        want.out(conv).out(bn)
    for reader in ("layer3.1.conv1", "layer4.0.conv1", "layer4.0.downsample.0"):
        want.into(reader)
    # Dead units: a zero conv row whose BN maps 0 to -1, so ReLU gives const(0).
    for block, unit in (("layer2.1", 2), ("layer4.0", 7)):
        masks[f"{block}.conv1.weight"][unit] = False
        shift_bn(model, f"{block}.bn1", unit, -1.0)
        want.out(f"{block}.conv1").out(f"{block}.bn1").into(f"{block}.conv2")
    # Dead unit by its outgoing column: conv2 never reads unit 4 of layer3.1.
    masks["layer3.1.conv2.weight"][:, 4] = False
    want.out("layer3.1.conv1").out("layer3.1.bn1").into("layer3.1.conv2")
    # A constant channel with a nonzero value (zero conv row, BN maps 0 to +1, ReLU keeps 1) feeds
    # conv2, a 3x3 conv with zero padding: border outputs see fewer taps of the constant, so it
    # cannot fold into a bias. fxmin must KEEP it (design: nonzero constant behind zero padding).
    masks["layer1.1.conv1.weight"][6] = False
    shift_bn(model, "layer1.1.bn1", 6, 1.0)
    return model, masks, images(), want


# -- ResNet-50 --------------------------------------------------------------------------------------------------

def planted_resnet50():
    torch.manual_seed(0)
    model = perturbed(resnet50(num_classes=10, width=8))  # stage widths 32, 64, 128, 256
    masks, want = keep_all(model), Expected(model)
    # Dead stream channel 10 of stage 2 (width 64, four bottlenecks, downsample shortcut).
    writers = [("layer2.0.downsample.0", "layer2.0.downsample.1")] + [(f"layer2.{b}.conv3", f"layer2.{b}.bn3")
                                                                       for b in range(4)]
    for conv, bn in writers:
        kill_rows(masks, conv, 10), kill_rows(masks, bn, 10)
        want.out(conv).out(bn)
    for reader in ("layer2.1.conv1", "layer2.2.conv1", "layer2.3.conv1", "layer3.0.conv1", "layer3.0.downsample.0"):
        want.into(reader)
    # Dead unit after the 1x1 reduce: zero row, BN -> -1, ReLU -> 0 (the 3x3 reads const(0): goes).
    masks["layer1.0.conv1.weight"][1] = False
    shift_bn(model, "layer1.0.bn1", 1, -1.0)
    want.out("layer1.0.conv1").out("layer1.0.bn1").into("layer1.0.conv2")
    # Constant channel 1.5 after the 3x3 (zero row, BN -> 1.5, ReLU keeps it) read by the 1x1
    # conv3 (no padding): it folds through conv3 (bias=False) into bn3's running mean, so no
    # parameter is created (NOTE [BatchNorm absorbs] in fxmin/rules/linear.py).
    masks["layer3.2.conv2.weight"][3] = False
    shift_bn(model, "layer3.2.bn2", 3, 1.5)
    want.out("layer3.2.conv2").out("layer3.2.bn2").into("layer3.2.conv3")
    # Dead unit by its outgoing column in the last stage.
    masks["layer4.1.conv3.weight"][:, 5] = False
    want.out("layer4.1.conv2").out("layer4.1.bn2").into("layer4.1.conv3")
    # Constant 1.0 after the 1x1 reduce feeds the zero-padded 3x3: kept (as in ResNet-18).
    masks["layer2.1.conv1.weight"][0] = False
    shift_bn(model, "layer2.1.bn1", 0, 1.0)
    return model, masks, images(), want


# -- DenseNet (concatenation) ------------------------------------------------------------------------------------

def planted_densenet():
    torch.manual_seed(0)
    model = perturbed(densenet())  # growth 12, blocks (2, 2, 2), 16 stem channels, bottleneck 48
    masks, want = keep_all(model), Expected(model)
    block1 = "features.denseblock1"
    # New feature 5 of block 1, layer 1 is zero (conv2 row). It sits at index 16 + 5 of every later
    # concatenation in the block; its readers are BNs, whose affine is zero there too (else the BN
    # turns the zero into a nonzero constant that stays, see below), so the concat channel goes.
    masks[f"{block1}.denselayer1.conv2.weight"][5] = False
    want.out(f"{block1}.denselayer1.conv2")
    for bn, conv in ((f"{block1}.denselayer2.norm1", f"{block1}.denselayer2.conv1"),
                     ("features.transition1.norm", "features.transition1.conv")):
        kill_rows(masks, bn, 16 + 5)
        want.out(bn).into(conv)
    # Dead bottleneck unit 9 in block 2: zero conv1 row, norm2 maps 0 to -1, ReLU -> 0.
    layer = "features.denseblock2.denselayer1"
    masks[f"{layer}.conv1.weight"][9] = False
    shift_bn(model, f"{layer}.norm2", 9, -1.0)
    want.out(f"{layer}.conv1").out(f"{layer}.norm2").into(f"{layer}.conv2")
    return model, masks, images(), want


# -- MobileNetV2 (depthwise, inverted residual) -----------------------------------------------------------------

SMALL_MOBILENET = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2))


def small_mobilenet() -> nn.Module:
    """Stem 32; features.1: 32->8; .2: 8->16 (hidden 32, /2); .3: 16->16 residual (hidden 64);
    .4: 16->24 (hidden 64, /2); .5: 24->24 residual (hidden 96); .6: 1x1 to 64; classifier."""
    return mobilenet_v2(num_classes=10, inverted_residual_setting=SMALL_MOBILENET, last_channel=64)


def planted_mobilenet_v2():
    torch.manual_seed(0)
    model = perturbed(small_mobilenet())
    masks, want = keep_all(model), Expected(model)
    # Dead stream channel 4 of the 16-wide stage: both projection BNs (and conv rows) are zero.
    for block in ("features.2", "features.3"):
        kill_rows(masks, f"{block}.conv.2", 4), kill_rows(masks, f"{block}.conv.3", 4)
        want.out(f"{block}.conv.2").out(f"{block}.conv.3")
    want.into("features.3.conv.0.0").into("features.4.conv.0.0")
    # Dead hidden channel 5 of features.3: expansion row and both BN affines zero; the depthwise
    # filter, both BNs and the projection column go with it (depthwise couples in and out).
    block = "features.3"
    masks[f"{block}.conv.0.0.weight"][5] = False
    kill_rows(masks, f"{block}.conv.0.1", 5), kill_rows(masks, f"{block}.conv.1.1", 5)
    want.out(f"{block}.conv.0.0").out(f"{block}.conv.0.1").out(f"{block}.conv.1.0").out(f"{block}.conv.1.1")
    want.into(f"{block}.conv.2")
    # Constant hidden channel 7 of features.5: zero depthwise filter, BN maps 0 to 1, ReLU6 keeps
    # 1; the bias-less 1x1 projection folds it into its BatchNorm's running mean (NOTE [BatchNorm
    # absorbs]): nothing is created. The expansion row is then unread and goes too.
    block = "features.5"
    masks[f"{block}.conv.1.0.weight"][7] = False
    shift_bn(model, f"{block}.conv.1.1", 7, 1.0)
    want.out(f"{block}.conv.0.0").out(f"{block}.conv.0.1").out(f"{block}.conv.1.0").out(f"{block}.conv.1.1")
    want.into(f"{block}.conv.2")
    return model, masks, images(), want


# -- EfficientNet (squeeze-excitation mul, SiLU) ----------------------------------------------------------------

def planted_efficientnet_block():
    torch.manual_seed(0)
    model = perturbed(efficientnet_block(16, 16))  # expand 64, depthwise 3x3, SE 64->4->64, project 16
    masks, want = keep_all(model), Expected(model)
    # Dead hidden channel 3: expansion row and both BN affines zero -> SiLU(0) = 0 everywhere. The
    # SE gate's channel 3 multiplies const(0), so fc2's row 3 goes too; fc1 loses column 3.
    masks["block.0.0.weight"][3] = False
    kill_rows(masks, "block.0.1", 3), kill_rows(masks, "block.1.1", 3)
    want.out("block.0.0").out("block.0.1").out("block.1.0").out("block.1.1")
    want.into("block.2.fc1").out("block.2.fc2").into("block.3.0")
    # SE unit 1 with a zero fc1 row but a nonzero bias: const(SiLU(b)), folded into fc2's bias.
    masks["block.2.fc1.weight"][1] = False
    want.out("block.2.fc1").into("block.2.fc2")
    # The block's output and input are the model's: every stream channel is needed here; the
    # stream is planted in the full model below.
    return model, masks, images(16, 8), want


def planted_efficientnet():
    torch.manual_seed(0)
    model = perturbed(efficientnet())  # stages 16->8, 8->16 (x2, hidden 32/64), 16->24 (x2)
    masks, want = keep_all(model), Expected(model)
    # Dead stream channel 6 of the 16-wide stage: both blocks' projection (conv row, BN affine).
    for block in ("features.2.0", "features.2.1"):
        kill_rows(masks, f"{block}.block.3.0", 6), kill_rows(masks, f"{block}.block.3.1", 6)
        want.out(f"{block}.block.3.0").out(f"{block}.block.3.1")
    want.into("features.2.1.block.0.0").into("features.3.0.block.0.0")
    return model, masks, images(), want


# -- ConvNeXt (torchvision layout: LayerNorm2d, depthwise 7x7, layer scale, LN + conv downsampling) -------------

def small_convnext() -> nn.Module:
    return convnext_tiny(num_classes=10, stem="small", widths=(16, 32, 48, 64), depths=(1, 1, 2, 1))


def planted_convnext():
    torch.manual_seed(0)
    model = perturbed(small_convnext())
    masks, want = keep_all(model), Expected(model)
    # Dead stream channel 3 of stage 1. Writers: the stem conv (row and bias) and the stem
    # LayerNorm2d (weight and bias: its output there is const(0)), and the block's fc2 row and
    # bias. The block's depthwise conv on that channel goes (its output const(bias) joins the
    # CompensatedLayerNorm constants), and so does the layer scale entry. The LayerNorms that
    # READ the stream (the block's, the downsampling one) keep all 16 outputs: output 3 is
    # weight_3 * (0 - mean) / std + bias_3, which varies, so fc1 and the 2x2 downsampling conv
    # keep their column 3 (exactness forces it; only the norm's input channel leaves).
    kill_rows(masks, "features.0.0", 3), kill_rows(masks, "features.0.1", 3)
    kill_rows(masks, "features.1.0.block.5", 3)
    want.out("features.0.0").out("features.0.1").out("features.1.0.block.0").out("features.1.0.block.5")
    want.drop("features.1.0.layer_scale")
    # Dead stream channel 10 of stage 4: writers are the downsampling conv and the block's fc2.
    kill_rows(masks, "features.6.1", 10), kill_rows(masks, "features.7.0.block.5", 10)
    want.out("features.6.1").out("features.7.0.block.0").out("features.7.0.block.5")
    want.drop("features.7.0.layer_scale")
    # Dead MLP unit 7 (fc1 row and bias zero) in stage 2; constant MLP unit 11 (fc1 row zero,
    # bias nonzero: const(GELU(b)) folds into fc2's bias) in stage 3.
    kill_rows(masks, "features.3.0.block.3", 7)
    want.out("features.3.0.block.3").into("features.3.0.block.5")
    masks["features.5.1.block.3.weight"][11] = False
    want.out("features.5.1.block.3").into("features.5.1.block.5")
    return model, masks, images(), want


def planted_convnext_tiny_full_size():
    """Full ConvNeXt-Tiny (28.6 M parameters) on a 32x32 image: a dead stream channel in stage 3."""
    torch.manual_seed(0)
    model = perturbed(convnext_tiny(num_classes=10))
    masks, want = keep_all(model), Expected(model)
    kill_rows(masks, "features.4.1", 100)
    want.out("features.4.1")
    for b in range(9):
        kill_rows(masks, f"features.5.{b}.block.5", 100)
        want.out(f"features.5.{b}.block.0").out(f"features.5.{b}.block.5").drop(f"features.5.{b}.layer_scale")
        kill_rows(masks, f"features.5.{b}.block.3", slice(0, 64))  # 64 dead MLP units per block (of 1536)
        want.out(f"features.5.{b}.block.3", 64).into(f"features.5.{b}.block.5", 64)
    return model, masks, images(), want


# -- ViT --------------------------------------------------------------------------------------------------------

def planted_vit():
    torch.manual_seed(0)
    factory, example = MODELS["vit"]  # dim 64, 2 blocks, 4 heads of 16, MLP 128, 16 patches + class token
    model = perturbed(factory())
    masks, want = keep_all(model), Expected(model)
    heads, hd, dim = 4, 16, 64
    with torch.no_grad():
        model.cls_token[..., 9] = 0
        model.pos_embed[..., 9] = 0
    for i in range(2):
        attn, mlp = f"blocks.{i}.attn", f"blocks.{i}.mlp"
        # Head 1: output-projection columns zero -> its value dims go, so the head goes whole:
        # 16 q, 16 k and 16 v rows of the fused qkv, and 16 proj columns.
        masks[f"{attn}.proj.weight"][:, hd:2 * hd] = False
        want.out(f"{attn}.qkv", 3 * hd).into(f"{attn}.proj", hd)
        # k dim 2 of every head is const(0) (row and bias zero). It adds nothing to any score, but
        # it is NOT removed: the fused qkv is reshaped to (3, heads, head_dim), so q, k and v keep
        # the same head size, and v's dim 2 is live (fxmin keeps it: exactness of the reshape).
        for h in range(heads):
            kill_rows(masks, f"{attn}.qkv", dim + h * hd + 2)
        # Seven dead MLP units with nonzero biases: const(GELU(b)) folds into fc2's bias.
        masks[f"{mlp}.fc1.weight"][:7] = False
        want.out(f"{mlp}.fc1", 7).into(f"{mlp}.fc2", 7)
        # Stream channel 9: every writer zero (attention and MLP output rows and biases).
        kill_rows(masks, f"{attn}.proj", 9), kill_rows(masks, f"{mlp}.fc2", 9)
        want.out(f"{attn}.proj").out(f"{mlp}.fc2")
    # ... and the patch embedding, class token and position embedding (set to 0 above). The
    # pre-LNs and the final LN read the stream through CompensatedLayerNorm: their output 9 is
    # weight_9 * (0 - mean) / std + bias_9, which varies, so qkv, fc1 and head keep column 9.
    kill_rows(masks, "patch_embed.proj", 9)
    want.out("patch_embed.proj").drop("cls_token", 2).drop("pos_embed", 2)
    return model, masks, example(), want


# -- GPT (causal SDPA, tied embeddings) -------------------------------------------------------------------------

def planted_gpt():
    torch.manual_seed(0)
    factory, example = MODELS["gpt"]  # vocab 128, 2 layers, 4 heads of 16, width 64, MLP 256
    model = perturbed(factory())
    masks, want = keep_all(model), Expected(model)
    heads, hd, dim = 4, 16, 64
    for i in range(2):
        attn, mlp = f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"
        # Head 1 dead (output-projection columns zero): 16 q + 16 k + 16 v rows, 16 proj columns.
        masks[f"{attn}.c_proj.weight"][:, hd:2 * hd] = False
        want.out(f"{attn}.c_attn", 3 * hd).into(f"{attn}.c_proj", hd)
        # q dim 3 of every head const(0): q and k dim 3 go in the 3 surviving heads (q and k are
        # viewed separately after the split, so their head size may differ from v's).
        for h in range(heads):
            kill_rows(masks, f"{attn}.c_attn", h * hd + 3)
        want.out(f"{attn}.c_attn", 2 * (heads - 1))
        # v dim 5 of every head const(0) (row and bias): goes in the 3 surviving heads, with the
        # matching c_proj columns (v dims must stay uniform across heads for the view).
        for h in range(heads):
            kill_rows(masks, f"{attn}.c_attn", 2 * dim + h * hd + 5)
        want.out(f"{attn}.c_attn", heads - 1).into(f"{attn}.c_proj", heads - 1)
        # Ten MLP units with a zero c_fc row but a nonzero bias: fold into c_proj's bias.
        masks[f"{mlp}.c_fc.weight"][:10] = False
        want.out(f"{mlp}.c_fc", 10).into(f"{mlp}.c_proj", 10)
        # Stream channel 5: every writer zero.
        kill_rows(masks, f"{attn}.c_proj", 5), kill_rows(masks, f"{mlp}.c_proj", 5)
        want.out(f"{attn}.c_proj").out(f"{mlp}.c_proj")
    masks["transformer.wte.weight"][:, 5] = False
    masks["transformer.wpe.weight"][:, 5] = False
    want.into("transformer.wte").into("transformer.wpe")
    # The tied lm_head (the same Parameter as wte) loses column 5 with the embedding, so ln_f's
    # output 5 is unread: ln_f's weight and bias lose entry 5. The blocks' pre-LNs still emit
    # output 5 (weight_5 * (0 - mean) / std + bias_5 varies), so c_attn and c_fc keep column 5.
    want.out("transformer.ln_f")
    return model, masks, example(), want


# -- all families -----------------------------------------------------------------------------------------------

#: family -> builder of (model, masks, example inputs, hand count), the full-size ConvNeXt-Tiny aside
PLANTED = {
    "resnet18": planted_resnet18, "resnet50": planted_resnet50, "densenet": planted_densenet,
    "mobilenet_v2": planted_mobilenet_v2, "efficientnet_block": planted_efficientnet_block,
    "efficientnet": planted_efficientnet, "convnext": planted_convnext, "vit": planted_vit,
    "gpt": planted_gpt,
}
