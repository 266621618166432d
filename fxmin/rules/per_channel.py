"""Per-channel reductions and scans over other axes: vector norms (GRN's ``x.norm(p=2, dim=(1, 2))``),
``F.normalize`` (EdgeNeXt's cross-covariance attention normalizes over tokens), ``F.pad`` of other
axes (Swin pads its windows) and cumulative
sums/products (EdgeNeXt's positional encoding).

Over axes other than the channel axis these ops work within each channel, so channels pass through
(same units). A constant channel stays constant under a norm (``||c·1_n||_p``, computed by running
the norm on ``n`` copies of ``c`` in float64); under a scan only the fixed points stay constant
(``cumsum`` keeps ``const(0)``, ``cumprod`` keeps ``const(0)`` and ``const(1)``). Over the channel
axis they mix channels: the result is opaque and every channel is kept.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import no_cost, opaque_forward


def _norm_arguments(ctx):
    """(order, dims, keepdim) of a vector norm call, or None when it is not a vector norm over named axes."""
    node = ctx.node
    if node.target in (torch.linalg.vector_norm, torch.ops.aten.linalg_vector_norm.default):
        order, dims, keepdim = ctx.arg(1, "ord", 2), ctx.arg(2, "dim"), ctx.arg(3, "keepdim", False)
    else:  # torch.norm(x, p, dim, keepdim) and x.norm(p, dim, keepdim)
        order, dims, keepdim = ctx.arg(1, "p", "fro"), ctx.arg(2, "dim"), ctx.arg(3, "keepdim", False)
        order = 2 if order == "fro" else order
    if ctx.node.kwargs.get("dtype") is not None or ctx.node.kwargs.get("out") is not None:
        return None
    if not isinstance(order, (int, float)) or dims is None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
        return None
    return float(order), dims, keepdim


def _reduced_axis(fact, dims, keepdim):
    return fact.axis if keepdim else fact.axis - sum(1 for d in dims if d < fact.axis)


def _vector_norm_forward(ctx):
    """Exact over axes other than the channel axis (a norm within each channel):
    ``const(c) -> const(||c·1_n||_p)`` over the ``n`` reduced elements."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    arguments = _norm_arguments(ctx)
    if fact is None or not fact.tracked or not fact.simple or shape is None or arguments is None:
        return opaque_forward(ctx)
    order, dims, keepdim = arguments
    dims = {d % len(shape) for d in dims}
    if fact.axis in dims:
        return opaque_forward(ctx)
    count = math.prod(shape[d] for d in dims)
    value = np.zeros(fact.size)
    if fact.const.any():
        copies = torch.from_numpy(fact.value[fact.const]).reshape(-1, 1).expand(-1, count)
        value[fact.const] = torch.linalg.vector_norm(copies, ord=order, dim=1).numpy()
    return ValueFact.constants(_reduced_axis(fact, dims, keepdim), fact.const, value), ctx.units(x)


rule("vector norm", doc=(
         'Norms over axes other than the channel axis (`x.norm(p=2, dim=(1, 2))`, `torch.norm`, '
         '`linalg.vector_norm`): `const(c) -> const(||c·1_n||_p)`.',
         'Nothing itself: channels pass through.',
         'Every channel for a norm over the channel axis (or over all axes).',
         ),
     functions=(torch.norm, torch.linalg.vector_norm), methods=("norm",))(_vector_norm_forward)


def _normalize_forward(ctx):
    """Exact along an axis other than the channel axis (each channel divided by its own norm):
    ``const(c) -> const(c / max(||c·1_n||_p, eps))``."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    order, dim, eps = ctx.arg(1, "p", 2.0), ctx.arg(2, "dim", 1), ctx.arg(3, "eps", 1e-12)
    if fact is None or not fact.tracked or shape is None or ctx.node.kwargs.get("out") is not None \
            or not all(isinstance(v, (int, float)) for v in (order, dim, eps)) or dim % len(shape) in fact.axes:
        return opaque_forward(ctx)
    value = np.zeros(fact.size)
    if fact.const.any():
        copies = torch.from_numpy(fact.value[fact.const]).reshape(-1, 1).expand(-1, shape[dim % len(shape)])
        value[fact.const] = F.normalize(copies, p=order, dim=1, eps=eps)[:, 0].numpy()
    return fact.replaced(fact.const, value), ctx.units(x)


rule("normalize", doc=(
         '`F.normalize` along an axis other than the channel axis: `const(c) -> const(c / max(||c·1_n||, eps))`.',
         'Nothing itself: channels pass through.',
         'Every channel when it normalizes along the channel axis.',
         ),
     functions=(F.normalize,), heads_aware=True)(_normalize_forward)


def _pad_forward(ctx):
    """Exact when the channel axis is not padded (a spatial pad works within each channel): with
    ``mode="constant"`` a constant channel stays constant when nothing is padded or it equals the
    fill value; the other modes repeat values of the channel, so a constant stays constant."""
    x = ctx.arg(0, "input")
    fact, shape, out = ctx.fact(x), ctx.shape(x), ctx.shape()
    if ctx.module is not None:  # nn.ConstantPad2d, nn.ZeroPad2d, nn.ReflectionPad2d, ...
        constant = isinstance(ctx.module, _CONSTANT_PADS)
        pad, mode, fill = ctx.module.padding, "constant" if constant else "copies", getattr(ctx.module, "value", 0.0)
    else:
        pad, mode, fill = ctx.arg(1, "pad"), ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None)
    fill = 0.0 if fill is None else fill
    if fact is None or not fact.tracked or shape is None or out is None or not isinstance(pad, (tuple, list)) \
            or not isinstance(fill, (int, float)):
        return opaque_forward(ctx)
    for axis in fact.axes:
        pair = pad[2 * (len(shape) - 1 - axis): 2 * (len(shape) - axis)]
        if any(amount != 0 for amount in pair):  # a number computed at run time counts as padding
            return opaque_forward(ctx)
    const = fact.const
    if mode == "constant" and out != shape:
        const = const & (fact.value == fill)
    return fact.replaced(const, np.where(const, fact.value, 0.0)), ctx.units(x)


_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)  # the ZeroPadNd are ConstantPadNd
_PAD_MODULES = (*_CONSTANT_PADS, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
                nn.CircularPad2d, nn.CircularPad3d)

rule("pad", doc=(
         '`F.pad` and the padding modules (`nn.ConstantPad2d`, `nn.ZeroPad2d`, `nn.ReflectionPad2d`...) of '
         'axes other than the channel axis: with constant padding a constant stays constant when nothing '
         'is padded or it equals the fill; other modes repeat the channel\'s values.',
         'Nothing itself: channels pass through.',
         'Every channel when the channel axis is padded (or by amounts computed at run time).',
         ),
     functions=(F.pad,), modules=_PAD_MODULES, heads_aware=True, macs=no_cost)(_pad_forward)


def _rearrange_forward(ctx):
    """Exact when the moved axes exclude the channel axes (``torch.roll`` of Swin's shifted windows,
    ``torch.flip``): positions move within each channel, so a constant stays constant."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    dims = ctx.arg(2, "dims") if ctx.node.target in (torch.roll, "roll") else ctx.arg(1, "dims")
    dims = (dims,) if isinstance(dims, int) else dims
    if fact is None or not fact.tracked or shape is None or not isinstance(dims, (tuple, list)) \
            or not all(isinstance(d, int) for d in dims) or any(d % len(shape) in fact.axes for d in dims):
        return opaque_forward(ctx)
    return fact, ctx.units(x)


rule("roll/flip", doc=(
         '`torch.roll` (Swin\'s shifted windows) and `torch.flip` of axes other than the channel axis: '
         'positions move within each channel.',
         'Nothing itself: channels pass through.',
         'Every channel when the channel axis moves (or for a roll of the flattened tensor).',
         ),
     functions=(torch.roll, torch.flip), methods=("roll", "flip"), heads_aware=True, macs=no_cost)(_rearrange_forward)


# -- scans -------------------------------------------------------------------------------------------------------

_FIXED_POINTS = {"cumsum": (0.0,), "cumprod": (0.0, 1.0)}


def _scan_forward(ctx):
    """Exact along an axis other than the channel axis (a scan within each channel): ``cumsum``
    keeps ``const(0)``, ``cumprod`` keeps ``const(0)`` and ``const(1)``; other constants vary."""
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    dim = ctx.arg(1, "dim")
    if fact is None or not fact.tracked or shape is None or not isinstance(dim, int) or dim % len(shape) in fact.axes:
        return opaque_forward(ctx)
    name = ctx.node.target if isinstance(ctx.node.target, str) else ctx.node.target.__name__
    const = fact.const & np.isin(fact.value, _FIXED_POINTS[name])
    return fact.replaced(const, np.where(const, fact.value, 0.0)), ctx.units(x)


rule("scan", doc=(
         '`cumsum`/`cumprod` along an axis other than the channel axis (a scan within each channel).',
         'Nothing itself: channels pass through; `cumsum` keeps `const(0)`, `cumprod` `const(0)` and `const(1)`.',
         'Every channel for a scan along the channel axis; other constants vary along the scan.',
         ),
     functions=(torch.cumsum, torch.cumprod), methods=("cumsum", "cumprod"), heads_aware=True)(_scan_forward)
REGISTRY.alias(F.pad, torch.ops.aten.pad.default)  # the export front end keeps F.pad whole (same arguments)
REGISTRY.alias(torch.linalg.vector_norm, torch.ops.aten.linalg_vector_norm.default)  # x.norm(...) under torch.export
