"""Ops of optional libraries (torchvision, timm) that ``torch.fx`` records as single calls.

torchvision marks some functions with ``torch.fx.wrap``, so a traced model calls them whole:
``torchvision.ops.stochastic_depth`` (ConvNeXt, EfficientNet, Swin, MaxViT). timm's ``DropPath`` is
traced through (its ``if not training`` leaves nothing in an eval-mode graph) unless it is kept as a
leaf module. fxmin imports neither library: :func:`register_loaded` registers the rules of the
modules already imported (the engine calls it before each analysis), so importing fxmin first
and torchvision afterwards works, and a model from a library fxmin has rules for finds them.

NOTE [Stochastic depth]
Stochastic depth drops a whole residual branch at random while training and is the identity in
eval mode (``training=False``) or with ``p == 0``. fxmin traces an eval-mode copy, so the call
reads ``training=False`` and the rule passes channels through like dropout. A call traced with
``training=True`` and ``p > 0`` computes a random function: there is no reference to be exact to,
so the rule refuses it and says to call ``model.eval()``.
"""
from __future__ import annotations

import sys

import numpy as np

from ..errors import FxminError, describe_node
from ..facts import ValueFact
from .pointwise import _opaque, _pointwise_backward, opaque_backward, pointwise_forward
from .registry import rule


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


def _register_stochastic_depth(module) -> None:
    rule("stochastic_depth", functions=(module.stochastic_depth,), modules=(module.StochasticDepth,),
         backward=_pointwise_backward, heads_aware=True, passes_axis=True)(_random_depth_forward)


def _register_drop_path(module) -> None:
    rule("stochastic_depth", modules=(module.DropPath,), backward=_pointwise_backward, heads_aware=True,
         passes_axis=True)(_random_depth_forward)


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
        return _opaque(ctx)
    padded = shape[-3] % 2 or shape[-2] % 2
    const = fact.const & (fact.value == 0) if padded else fact.const
    value = np.where(const, fact.value, 0.0)
    return ValueFact(fact.axis, 4 * fact.size, np.tile(const, 4), np.tile(value, 4)), np.tile(ctx.units(x), 4)


def _no_channels_forward(ctx):
    """Exact: keeps every channel around it (NOTE [torchvision Swin])."""
    return _opaque(ctx)


def _register_swin(module) -> None:
    rule("patch merging pad", functions=(module._patch_merging_pad,), backward=_pointwise_backward)(
        _patch_merging_pad_forward)
    rule("torchvision window attention", functions=(module.shifted_window_attention, module._get_relative_position_bias),
         backward=opaque_backward)(_no_channels_forward)


#: module name -> what registers its rules once it is imported
OPTIONAL = {
    "torchvision.ops.stochastic_depth": _register_stochastic_depth,
    "timm.layers.drop": _register_drop_path,
    "torchvision.models.swin_transformer": _register_swin,
}
_registered: set = set()


def register_loaded() -> list[str]:
    """Register the rules of the optional modules already imported; never imports one. Returns
    the names registered by this call (each module is registered once).

    >>> register_loaded()  # doctest: +SKIP
    ['torchvision.ops.stochastic_depth']
    """
    done = []
    for name, register in OPTIONAL.items():
        module = sys.modules.get(name)
        if module is not None and name not in _registered:
            _registered.add(name)
            register(module)
            done.append(name)
    return done
