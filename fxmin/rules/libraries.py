"""Ops of optional libraries (torchvision, timm) that ``torch.fx`` records as single calls, and timm's
weight-standardized convs, which fxmin records as single calls (NOTE [Weight standardization]).

torchvision marks some functions with ``torch.fx.wrap``, so a traced model calls them whole:
``torchvision.ops.stochastic_depth`` (ConvNeXt, EfficientNet, Swin, MaxViT). timm's ``DropPath`` is
traced through (its ``if not training`` leaves nothing in an eval-mode graph) unless it is kept as a
leaf module. fxmin imports neither library: the rules of each module are registered once that
module is imported (``REGISTRY.defer``), so importing fxmin before or after torchvision both work.

NOTE [Stochastic depth]
Stochastic depth drops a whole residual branch at random while training and is the identity in
eval mode (``training=False``) or with ``p == 0``. fxmin traces an eval-mode copy, so the call
reads ``training=False`` and the rule passes channels through like dropout. A call traced with
``training=True`` and ``p > 0`` computes a random function: there is no reference to be exact to,
so the rule refuses it and says to call ``model.eval()``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FxminError, describe_node
from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import dense_output, dense_view, new_parameter, no_cost, opaque_forward, pointwise_forward


def _refuse_training(ctx, probability) -> None:
    raise FxminError(
        f"{describe_node(ctx.node, ctx.root)} applies stochastic depth in training mode (p={probability}): it "
        "drops residual branches at random, so there is no fixed function to minimize. Call model.eval() "
        "before minimizing (stochastic depth is the identity in eval mode), or trace with training=False.")


def _random_depth_forward(ctx):
    """Exact in eval mode (``training=False``) or with ``p == 0``, where stochastic depth is the
    identity; in training with ``p > 0`` it is random and refused (NOTE [Stochastic depth])."""
    if ctx.module is not None:  # torchvision's StochasticDepth or timm's DropPath kept as a leaf
        probability = getattr(ctx.module, "p", getattr(ctx.module, "drop_prob", None))
        training = ctx.module.training
    else:
        probability, training = ctx.arg(1, "p"), ctx.arg(3, "training", True)
    if training is not False and probability != 0:
        _refuse_training(ctx, probability)
    return pointwise_forward(ctx)


_DROP_DOC = (
    'In eval mode (`training=False`) or with `p == 0`, where stochastic depth is the identity '
    '(NOTE [Stochastic depth]).',
    'Nothing itself: channels pass through.',
    '— (in training with `p > 0` it is random: refused, with "call model.eval()").',
    )


def _register_stochastic_depth(module) -> None:
    rule("stochastic_depth", doc=_DROP_DOC, functions=(module.stochastic_depth,), modules=(module.StochasticDepth,),
         heads_aware=True, passes_axis=True, identity_in_eval=lambda node, root: True,
         macs=no_cost)(_random_depth_forward)


def _register_drop_path(module) -> None:
    rule("stochastic_depth", doc=_DROP_DOC, modules=(module.DropPath,), heads_aware=True, passes_axis=True,
         identity_in_eval=lambda node, root: True, macs=no_cost)(_random_depth_forward)


# -- torchvision's Swin Transformer ---------------------------------------------------------------------------------
#
# NOTE [torchvision Swin]
# torchvision wraps the whole window attention (``shifted_window_attention``: qkv, scores, relative
# position bias, shift mask, softmax, proj) as one call that derives its head size from the input
# width (``C // num_heads``), so fewer heads cannot be handed to it: the call keeps every channel
# around it (exact; its MLP and the layers outside still shrink). ``_get_relative_position_bias``
# only reads model constants. ``_patch_merging_pad`` pads odd sizes and joins the four 2x2 phases
# along the channel axis: channel ``c`` appears in each of the four blocks.


def _patch_merging_pad_forward(ctx):
    """Exact: output channel ``k·C + c`` (``k`` < 4) is input channel ``c`` at one of the four 2x2
    phases; padding an odd height or width adds zeros, so only ``const(0)`` stays constant then."""
    x = ctx.arg(0, "input")
    fact, shape, out = ctx.fact(x), ctx.shape(x), ctx.shape()
    if fact is None or not fact.tracked or not fact.simple or shape is None or out is None \
            or fact.axis != len(shape) - 1 or len(shape) < 3:
        return opaque_forward(ctx)
    padded = shape[-3] % 2 or shape[-2] % 2
    const = fact.const & (fact.value == 0) if padded else fact.const
    value = np.where(const, fact.value, 0.0)
    return ValueFact(fact.axis, 4 * fact.size, np.tile(const, 4), np.tile(value, 4)), np.tile(ctx.units(x), 4)


def _no_channels_forward(ctx):
    """Exact: keeps every channel around it (NOTE [torchvision Swin])."""
    return opaque_forward(ctx)


def _register_swin(module) -> None:
    rule("patch merging pad", doc=(
             "torchvision Swin's `_patch_merging_pad`: output channel `k·C + c` is input channel `c` at one"
             ' of the four 2x2 phases.',
             'Channel `c` from each of the four blocks (coupled).',
             'Only `const(0)` stays constant when an odd height or width is padded.',
             ),
         functions=(module._patch_merging_pad,))(_patch_merging_pad_forward)
    rule("torchvision window attention", doc=(
             "Always: torchvision Swin's wrapped `shifted_window_attention` and `_get_relative_position_bias` "
             'are kept whole (NOTE [torchvision Swin]).',
             '—',
             'Every channel around them (its head size is derived from the input width).',
             ),
         functions=(module.shifted_window_attention, module._get_relative_position_bias))(_no_channels_forward)


REGISTRY.defer("torchvision.ops.stochastic_depth", _register_stochastic_depth)
REGISTRY.defer("timm.layers.drop", _register_drop_path)
REGISTRY.defer("torchvision.models.swin_transformer", _register_swin)


# -- timm's weight-standardized convolutions --------------------------------------------------------------------------
#
# NOTE [Weight standardization]
# timm's StdConv2d and ScaledStdConv2d (NF-ResNet, NF-RegNet, BiT ResNetV2) convolve with a weight computed
# at every call: each output row standardized over its inputs and taps, ``(w[o] - mean w[o]) /
# sqrt(var w[o] + eps)`` (times ``gain[o] * scale`` for ScaledStdConv2d). The rule reads the module
# whole (a leaf, Rule.leaf) through that computed weight, from the masked one:
# - a row of zeros standardizes to zeros, so a dead output row is ``const(bias)``, and the other rows
#   do not depend on it: output channels leave with their weight row, bias and gain, exactly;
# - a masked zero of a live row is ``-mean / std`` in the computed weight, and the statistics of
#   every row run over all of its inputs: removing an input column would change every row. The
#   layer keeps every input channel (a constant input is not folded into its bias either).
# Grouped layers keep every channel (the groups of the rows and the inputs must stay uniform). The
# *Same variants (DeepMind's NFNets) pad at run time from the input size, which torch.fx cannot
# trace: they are not leaves, so those models go through torch.export.


def _standardized_weight(ctx) -> torch.Tensor:
    """The weight the layer computes with (float64, from its masked weight)."""
    def compute():
        module, weight, gain = ctx.module, ctx.param("weight"), ctx.param("gain")
        affine = (gain * module.scale).reshape(-1) if gain is not None else None
        return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, weight=affine, training=True,
                            momentum=0.0, eps=module.eps).reshape_as(weight)
    return ctx.memo("standardized weight", compute)


def _std_conv_view(ctx):
    module = ctx.module
    padding = module.padding
    padded = isinstance(padding, str) or any(p != 0 for p in padding) or module.padding_mode != "zeros"
    return dense_view(_standardized_weight(ctx), ctx.param("bias"), module.groups, padded, channel_axis=1)


def _std_conv_forward(ctx):
    """Exact: NOTE [Weight standardization]; the output's constants come from the standardized
    weight (a dead row: ``const(bias)``)."""
    return dense_output(ctx, _std_conv_view(ctx))


def _std_conv_backward(ctx):
    ctx.require_all(ctx.arg(0, "input"), "weight standardization runs over every input column")
    if ctx.module.groups > 1:
        ctx.require_all(ctx.node, "a grouped weight-standardized conv keeps its groups")
    elif not ctx.present().any():
        keep_first = np.zeros(len(ctx.present()), bool)
        keep_first[0] = True  # torch has no zero-channel convolution
        ctx.choose(ctx.node, keep_first, "torch convolutions cannot have zero channels: channel 0 stays")


def _std_conv_plan(ctx):
    kept = ctx.kept()
    module = ctx.module
    if kept is None or len(kept) == module.out_channels:
        return
    rows = torch.as_tensor(kept)
    replacement = copy.deepcopy(module).to(torch.float64)
    params = {}
    for name in ("weight", "bias", "gain"):
        value = ctx.param(name)
        if value is None:
            continue
        setattr(replacement, name, new_parameter(value[rows], getattr(module, name)))
        params[name] = (tuple(value.shape), (), (kept,))
    replacement.out_channels = len(kept)
    ctx.replace_module(replacement, params)


def _register_std_conv(module) -> None:
    rule("weight-standardized conv", doc=(
             "timm's `StdConv2d`/`ScaledStdConv2d`, read whole through the weight it standardizes per output "
             'row (NOTE [Weight standardization]).',
             'Output channels (a dead row standardizes to zeros: `const(bias)`) with their weight row, bias '
             'and gain.',
             "Every input channel (a row's statistics run over all of its inputs); every channel of a grouped one.",
             ),
         modules=(module.StdConv2d, module.ScaledStdConv2d), backward=_std_conv_backward, plan=_std_conv_plan,
         edits_module=True, leaf=True, input_axis=lambda node, root: 1, backward_untracked=True)(_std_conv_forward)


REGISTRY.defer("timm.layers.std_conv", _register_std_conv)
