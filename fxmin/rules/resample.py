"""Ops that move or copy positions within each channel: resizing (``F.interpolate``, ``nn.Upsample``:
EfficientFormerV2, HRNet), ``Tensor.repeat`` (XCiT's positional encoding), ``repeat_interleave`` (GCViT's global query) and im2col (``F.unfold``,
``nn.Unfold``: TNT's inner patches).

NOTE [Resampling]
- Resizing computes each output position of channel ``c`` from positions of channel ``c`` alone,
  with weights that sum to one in every mode (nearest, linear, bilinear, bicubic, trilinear, area,
  antialiased): channels pass through and a constant channel keeps its value. The value is
  checked by resizing the constants themselves in float64; a channel whose image is not that
  constant up to float64 rounding is made varying (kept, never folded wrongly).
- ``x.repeat(sizes)`` tiles the tensor: along the channel axis channel ``c`` appears once in each
  of the ``k`` copies (the same unit, so a channel stays or goes in every copy); along other axes
  channels pass through.
- im2col turns channel ``c`` into the ``K = prod(kernel_size)`` consecutive channels ``c·K ..
  c·K + K - 1``, each a shifted view of ``c``; zero padding keeps only ``const(0)`` constant.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..facts import ValueFact
from .api import rule
from .kit import opaque_forward, tracked_fact


# -- resizing ---------------------------------------------------------------------------------------------------

def _resize_settings(ctx) -> dict:
    if ctx.module is not None:
        module = ctx.module
        return {"size": module.size, "scale_factor": module.scale_factor, "mode": module.mode,
                "align_corners": module.align_corners, "recompute_scale_factor": module.recompute_scale_factor}
    if ctx.node.target in (F.interpolate, F.upsample):
        names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
        return {name: ctx.arg(i + 1, name) for i, name in enumerate(names) if ctx.arg(i + 1, name) is not None}
    return {}


def _resized_constants(ctx, fact, shape) -> tuple[np.ndarray, np.ndarray]:
    """Resize the constant channels themselves (float64) and keep those whose image is their value."""
    const = fact.const.copy()
    if not const.any():
        return const, fact.value
    out_shape = ctx.shape()
    probe = torch.tensor(fact.value[const], dtype=torch.float64).reshape(1, -1, *([1] * (len(shape) - 2)))
    probe = probe.expand(1, int(const.sum()), *shape[2:]).contiguous()
    settings = _resize_settings(ctx)
    if not settings:  # an ATen key: its mode is in its name, not read here, so no constant is claimed
        return np.zeros_like(const), np.zeros(fact.size)
    image = F.interpolate(probe, **settings)
    if tuple(image.shape[2:]) != tuple(out_shape[2:]):
        return np.zeros_like(const), np.zeros(fact.size)
    values = torch.tensor(fact.value[const], dtype=torch.float64).reshape(1, -1, *([1] * (len(shape) - 2)))
    same = torch.isclose(image, values.expand_as(image), rtol=1e-12, atol=0).flatten(2).all(dim=2)[0].numpy()
    const[np.nonzero(const)[0][~same]] = False
    return const, np.where(const, fact.value, 0.0)


def _resize_forward(ctx):
    """Exact: NOTE [Resampling]. Resizing works within each channel of axis 1; a constant channel
    keeps its value (checked in float64)."""
    x = ctx.arg(0, "input")
    fact, shape, out = tracked_fact(ctx, x), ctx.shape(x), ctx.shape()
    if fact is None or not fact.simple or shape is None or out is None or len(shape) < 3 or fact.axis != 1:
        return opaque_forward(ctx)
    const, value = _resized_constants(ctx, fact, shape)
    return fact.replaced(const, value), ctx.units(x)


_aten = torch.ops.aten
_ATEN_RESIZES = tuple(getattr(_aten, name) for name in (
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")
    if hasattr(_aten, name))

rule("resize", doc=(
         '`F.interpolate`/`nn.Upsample` in every mode (NOTE [Resampling]): each output position of a '
         'channel is a weighted mean of positions of that channel.',
         'Nothing itself: channels pass through; a constant channel keeps its value (checked by '
         'resizing it in float64).',
         'A channel whose resized constant differs beyond float64 rounding is made varying; under the '
         'ATen keys constants are made varying (the mode is not read); resizing the channel axis is opaque.',
         ),
     functions=(F.interpolate, F.upsample, *_ATEN_RESIZES), modules=(nn.Upsample,),
     passes_axis=True)(_resize_forward)


# -- repeat -------------------------------------------------------------------------------------------------------

def _repeat_sizes(ctx):
    rest = ctx.node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    if not rest and "repeats" in ctx.node.kwargs:
        rest = tuple(ctx.node.kwargs["repeats"])
    return tuple(rest) if rest and all(isinstance(s, int) for s in rest) else None


def _repeat_forward(ctx):
    """Exact: NOTE [Resampling]. ``x.repeat(sizes)`` tiles channel ``c`` into each copy along the
    channel axis (the same unit in every copy); along other axes channels pass through."""
    x = ctx.node.args[0]
    fact, shape, sizes = tracked_fact(ctx, x), ctx.shape(x), _repeat_sizes(ctx)
    if fact is None or not fact.simple or shape is None or sizes is None or len(sizes) < len(shape):
        return opaque_forward(ctx)
    offset = len(sizes) - len(shape)
    return _copied(fact, ctx.units(x), fact.axis + offset, sizes[fact.axis + offset], np.tile)


def _copied(fact, units, axis: int, count: int, spread):
    """The fact and units of ``count`` copies of each channel along ``axis``: ``np.tile`` (whole copies one
    after another, ``repeat``) or ``np.repeat`` (each channel's copies together, ``repeat_interleave``)."""
    return (ValueFact(axis, fact.size * count, spread(fact.const, count), spread(fact.value, count)),
            spread(units, count))


rule("repeat", doc=(
         '`x.repeat(sizes)` with literal sizes (NOTE [Resampling]): along the channel axis channel `c` '
         'appears once in each copy.',
         'Channel `c` from every copy at once (one unit); along other axes channels pass through.',
         'Sizes computed at run time, or channels split over several axes: opaque (all kept).',
         ),
     methods=("repeat",), functions=(_aten.repeat.default,))(_repeat_forward)


# -- repeat_interleave --------------------------------------------------------------------------------------------

def _repeat_interleave_forward(ctx):
    """Exact: NOTE [Resampling]. ``x.repeat_interleave(k, dim)`` along an axis that holds no channel
    copies whole slices (channels pass through, whatever ``k`` is: computed at run time, a tensor of counts); along the
    channel axis with a literal ``k`` channel ``c`` becomes ``k`` consecutive copies of one unit (a
    tensor of counts there repeats channels unevenly: opaque)."""
    x = ctx.node.args[0]
    fact, shape = tracked_fact(ctx, x), ctx.shape(x)
    repeats, dim = ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    if fact is None or shape is None or not isinstance(dim, int):
        return opaque_forward(ctx)  # dim=None flattens
    dim %= len(shape)
    if dim not in fact.axes:
        return fact, ctx.units(x)
    if not fact.simple or not isinstance(repeats, int):
        return opaque_forward(ctx)
    return _copied(fact, ctx.units(x), fact.axis, repeats, np.repeat)


rule("repeat_interleave", doc=(
         '`x.repeat_interleave(k, dim)` (NOTE [Resampling]): along an axis without channels it copies '
         'whole slices; along the channel axis (literal `k`) channel `c` becomes `k` copies of one unit.',
         'Channel `c` with all its copies at once (one unit); along other axes channels pass through.',
         'A tensor of counts, `dim=None` (flattening), or a count computed at run time along the channel axis: opaque.',
         ),
     methods=("repeat_interleave",), functions=(torch.repeat_interleave, _aten.repeat_interleave.self_int))(
    _repeat_interleave_forward)


# -- im2col -------------------------------------------------------------------------------------------------------

def _unfold_settings(ctx):
    if ctx.module is not None:
        return ctx.module.kernel_size, ctx.module.padding
    return ctx.arg(1, "kernel_size"), ctx.arg(3, "padding", 0)


def _pairs(value, count):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * count


def _unfold_forward(ctx):
    """Exact: NOTE [Resampling]. Channel ``c`` becomes channels ``c·K .. c·K + K - 1`` (``K`` the
    kernel's positions); with zero padding only ``const(0)`` stays constant."""
    x = ctx.arg(0, "input")
    fact, shape = tracked_fact(ctx, x), ctx.shape(x)
    if fact is None or not fact.simple or shape is None or len(shape) not in (3, 4) or fact.axis != len(shape) - 3:
        return opaque_forward(ctx)
    kernel, padding = _unfold_settings(ctx)
    positions = math.prod(_pairs(kernel, 2))
    const = fact.const & (fact.value == 0) if any(_pairs(padding, 2)) else fact.const
    grown = ValueFact(fact.axis, fact.size, const, np.where(const, fact.value, 0.0)).repeat(positions, fact.axis)
    return grown, np.repeat(ctx.units(x), positions)


rule("unfold", doc=(
         '`F.unfold`/`nn.Unfold` (im2col, NOTE [Resampling]): channel `c` becomes the kernel-size block '
         '`c·K .. c·K + K - 1`.',
         'Channel `c` with its whole block (one unit).',
         'With zero padding only `const(0)` stays constant.',
         ),
     functions=(F.unfold, _aten.im2col.default), modules=(nn.Unfold,))(_unfold_forward)
