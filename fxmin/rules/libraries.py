"""Ops of optional libraries (torchvision, timm) that ``torch.fx`` records as single calls.

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

import numpy as np

from ..errors import FxminError, describe_node
from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import no_cost, opaque_forward, pointwise_forward


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
