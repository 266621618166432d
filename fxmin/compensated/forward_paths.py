"""How a :class:`fxmin.CompensatedLayerNorm` computes: its forward paths and their arithmetic.

The module (``fxmin/compensated/layer_norm.py``) holds the structure (which channels arrive, the removed ones' constants,
what is emitted) and picks a path; these functions compute it.

NOTE [CLN forward paths]: unless the removed channels outnumber the kept ones by more than
``fxmin.compensated.layer_norm.PADDED_WIDTH`` - 1 to 1, the removed channels' constants are appended to the input and the
native kernel (F.layer_norm / rms_norm / group_norm) normalizes all D channels: the very
computation of the original model on the same values (in another channel order), three
or four passes over the data. Otherwise (most channels gone) padding would multiply the
data, and the closed form below works on the kept channels alone. Both are exact up to
rounding; the padded path makes a minimized ConvNeXt's CLNs 1.7-2.2x faster at batch 1 on a
CPU, where a dozen small ops per call dominated; on large inputs the two are within 0.67-1.23x
of each other (benchmarks/cln_paths.py, docs/compensated-layernorm.md). The switch is
structural, never on the input's size: torch.export with a dynamic batch sees one graph.

NOTE [CLN call overhead]: at batch 1 a CLN's cost is its calls, not its arithmetic (a few
microseconds each: an op, a no-op cast, a buffer read). So equal constants (zeros, most
often) are written by one constant pad, not cast, shaped and concatenated; a cast is called only
when the dtype differs; the counts are Python ints (``CompensatedLayerNorm._read_structure``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def closed_form(norm, x: torch.Tensor) -> torch.Tensor:
    """NOTE [CLN forward paths]: the statistics of the kept channels plus the constants' sums."""
    axis = norm._axis
    # NOTE [CLN arithmetic]
    # Half and bfloat16 compute in float32, as the LayerNorm kernels accumulate. Sums over the
    # constants are taken in the buffer's float64 and rounded once. The variance is the
    # centred form: the removed channels add sum_j (c_j - mean)^2, computed in closed form as
    # n * (mean - c_mean)^2 + sum_j (c_j - c_mean)^2 (Chan's parallel-variance combination).
    # Both terms are non-negative, so nothing cancels: unlike S2 - 2 mean S1 + n mean^2, which
    # loses everything when the constants are large and close to the mean. It costs O(1)
    # per position, not O(n). The constants' term is one addcmul (NOTE [CLN call overhead]: fewer calls;
    # torch.var_mean would be one call fewer still, but is 3-5x slower on many short rows on a CPU).
    values, compute = _compute(x)
    axes = tuple(range(1, x.dim())) if axis == 1 else (-1,)
    positions = math.prod(x.shape[2:]) if axis == 1 else 1
    count = norm.width * positions
    removed_count = norm._removed_count
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    if norm.kind == "rms":
        squares = values.square().sum(axes, keepdim=True)
        if removed_count:
            squares = squares + norm._constant_squares * positions
        scale = torch.rsqrt(squares / count + eps)
        centred, mean = values, None
    else:
        total = values.sum(axes, keepdim=True)
        if removed_count:
            total = total + norm._constant_sum * positions
        mean = total / count
        centred = values - mean
        variance = centred.square().sum(axes, keepdim=True).div_(count)
        if removed_count:  # positions cancel: n / D (mean - c_mean)^2 + spread_c / D, D = width
            offset = mean - norm._constant_mean
            variance = torch.addcmul(variance.add_(norm._constant_spread / norm.width + eps), offset, offset,
                                     value=removed_count / norm.width)
        else:
            variance = variance.add_(eps)
        scale = torch.rsqrt(variance)
    if norm._gather == "constants":  # some emitted channels no longer arrive: v_j = c_j
        centred = append_constants(norm, centred, axis % x.dim(), mean)
    if norm._gather != "none":
        centred = torch.index_select(centred, axis % x.dim(), norm.source)
    return _cast(affine(norm, centred * scale, compute, x.dim()), x.dtype)


def padded(norm, x: torch.Tensor) -> torch.Tensor:
    """NOTE [CLN forward paths]: the native normalization over ``cat([input, constants])`` (the frame
    ``source`` indexes), then the emitted channels and their affine parameters. NOTE [CLN call
    overhead]: torch.layer_norm / rms_norm / constant_pad_nd are what F.layer_norm / F.rms_norm /
    F.pad call, without their Python wrappers (a third of this path's time at batch 1)."""
    kind = norm.kind
    channel_axis = 1 if kind == "group" else x.dim() - 1
    values, compute = _compute(x)
    if norm._removed_count:
        values = append_constants(norm, values, channel_axis)
    if kind == "layer":
        normalized = torch.layer_norm(values, (norm.width,), None, None, norm.eps, torch.backends.cudnn.enabled)
    elif kind == "group":
        normalized = F.group_norm(values, 1, None, None, norm.eps)
    else:
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        normalized = torch.rms_norm(values, (norm.width,), None, eps)
    if norm._select == "prefix":
        normalized = normalized.narrow(channel_axis, 0, norm._emitted)
    elif norm._select == "index":
        normalized = torch.index_select(normalized, channel_axis, norm.source)
    return _cast(affine(norm, normalized, compute, x.dim()), x.dtype)


def append_constants(norm, values: torch.Tensor, channel_axis: int, shift=None) -> torch.Tensor:
    """``cat([values, constants - shift])`` along the channel axis: the frame ``source`` indexes."""
    if norm._fill is not None and shift is None:  # NOTE [CLN call overhead]: one op, no cast
        return torch.constant_pad_nd(values, (0, 0) * (values.dim() - 1 - channel_axis) + (0, norm._removed_count),
                                     norm._fill)
    shape = list(values.shape)
    shape[channel_axis] = norm._removed_count
    if norm._fill is not None:
        return torch.cat([values, (norm._fill - shift).expand(shape)], dim=channel_axis)
    constants = along_channels(norm, _cast(norm.constants, values.dtype), values.dim())
    if shift is not None:
        constants = constants - shift
    return torch.cat([values, constants.expand(shape)], dim=channel_axis)


def affine(norm, normalized: torch.Tensor, compute: torch.dtype, dim: int) -> torch.Tensor:
    weight, bias = norm.weight, norm.bias
    if weight is not None:
        weight = along_channels(norm, _cast(weight, compute), dim)
    if bias is not None:
        bias = along_channels(norm, _cast(bias, compute), dim)
        return bias + normalized if weight is None else torch.addcmul(bias, normalized, weight)
    return normalized if weight is None else normalized * weight


def plain(norm, x: torch.Tensor) -> torch.Tensor:
    """Nothing removed, everything emitted in order: the very call the original module makes."""
    if norm.kind == "layer":
        return F.layer_norm(x, (norm.width,), norm.weight, norm.bias, norm.eps)
    if norm.kind == "group":
        return F.group_norm(x, 1, norm.weight, norm.bias, norm.eps)
    result = F.rms_norm(x, (norm.width,), norm.weight, norm.eps)
    return result if norm.bias is None else result + norm.bias


def along_channels(norm, vector: torch.Tensor, dim: int) -> torch.Tensor:
    """Shape a per-channel vector to broadcast along the channel axis of a ``dim``-D input."""
    return vector.view(-1, *([1] * (dim - 2))) if norm._axis == 1 else vector


def _compute(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``x`` in the dtype CLN computes in (float32 for half and bfloat16, NOTE [CLN arithmetic]), and
    that dtype; no cast is called when there is nothing to cast (NOTE [CLN call overhead])."""
    if x.dtype in (torch.float32, torch.float64):
        return x, x.dtype
    return x.to(torch.float32), torch.float32


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
