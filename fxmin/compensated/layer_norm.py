""":class:`CompensatedLayerNorm`, the LayerNorm that shrinks (``fxmin.compensate`` puts it into a model).

A LayerNorm couples all ``D`` channels it normalizes: drop one and the mean and variance of every
other channel change. :class:`CompensatedLayerNorm` (CLN) keeps the statistics of the original
``D`` channels while only ``|K|`` of them still arrive, by adding the constants that the removed
channels held back in. ``docs/compensated-layernorm.md`` defines it and says how ``minimize`` uses it.

>>> import torch, fxmin
>>> norm = fxmin.CompensatedLayerNorm(4, kept=[0, 2], constants={1: 0.0, 3: 1.5})
>>> full = torch.tensor([[2.0, 0.0, -1.0, 1.5]])
>>> torch.allclose(norm(full[:, [0, 2]]), torch.nn.functional.layer_norm(full, (4,)))
True
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from . import forward_paths
from ..errors import InputError

__all__ = ["CompensatedLayerNorm"]

KINDS = ("layer", "rms", "group")
# NOTE [CLN forward paths]: the padded path while width <= PADDED_WIDTH x the kept channels
PADDED_WIDTH = 2


class CompensatedLayerNorm(nn.Module):
    """A LayerNorm over ``width`` channels of which only ``kept`` still arrive.

    Arguments:
        width: ``D``, the original normalized width. It never shrinks.
        kept: the original indices of the channels that arrive, in input order (default: all).
        constants: the value each removed channel held: a mapping ``{channel: value}`` that names
            every removed channel, or a sequence aligned with the removed channels in ascending
            order; ``None`` means all zero. Stored in float64 (buffer ``constants``).
        outputs: the original indices of the channels it emits, in output order (default: all).
            A removed channel may be emitted: its value is computed from its constant.
        eps: as in LayerNorm. For ``kind="rms"``, ``None`` means ``finfo(dtype).eps`` as in RMSNorm.
        weight, bias: ``True`` for ones/zeros, ``False`` for none, or a tensor with one entry per
            emitted channel. ``bias=None`` means ``True`` except for ``kind="rms"``.
        kind: ``"layer"`` (LayerNorm over the last axis), ``"rms"`` (RMSNorm over the last axis: no
            mean, only the sum of squared constants matters) or ``"group"`` (``GroupNorm(1, C)``:
            channels on axis 1, statistics over every non-batch axis, per-channel affine).

    Channels-first LayerNorms (ConvNeXt's ``LayerNorm2d``) permute around a ``kind="layer"`` CLN.
    The structure lives in buffers (``kept``, ``removed``, ``constants``, ``outputs``, ``source``:
    where each output comes from in ``cat([input, constants])``), so it moves with ``.to(device)``
    and exports; a dtype cast (``.half()``) casts ``constants`` like any floating buffer.

    >>> norm = CompensatedLayerNorm(8, kept=range(6), constants=[0.0, 2.0], outputs=[0, 7])
    >>> norm(torch.randn(3, 6)).shape
    torch.Size([3, 2])
    """

    def __init__(self, width: int, kept=None, constants=None, outputs=None, eps: float | None = 1e-5,
                 weight=True, bias=None, kind: str = "layer", *, device=None, dtype=None):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"CompensatedLayerNorm kind must be one of {KINDS}, got {kind!r}")
        width = int(width)
        if width < 1:
            raise InputError(f"CompensatedLayerNorm width must be positive, got {width}")
        everything = np.arange(width)
        kept = everything if kept is None else _indices("kept", kept, width)
        outputs = everything if outputs is None else _indices("outputs", outputs, width)
        removed = np.flatnonzero(~_members(kept, width))  # ascending
        values = _constants(constants, removed, width)
        self.width, self.kind = width, kind
        self.eps = eps if eps is not None or kind == "rms" else 1e-5
        position = np.empty(width, np.int64)  # each channel's place in cat([input, constants])
        position[kept] = np.arange(len(kept))
        position[removed] = len(kept) + np.arange(len(removed))
        source = position[outputs]

        def index_buffer(values):
            return torch.tensor(values, dtype=torch.long, device=device)  # a copy: never the caller's array

        self.register_buffer("kept", index_buffer(kept))
        self.register_buffer("removed", index_buffer(removed))
        self.register_buffer("constants", torch.tensor(values, dtype=torch.float64, device=device))
        self.register_buffer("outputs", index_buffer(outputs))
        self.register_buffer("source", index_buffer(source))
        self.weight = _affine("weight", weight, 1.0, len(outputs), device, dtype)
        self.bias = _affine("bias", kind != "rms" if bias is None else bias, 0.0, len(outputs), device, dtype)
        self._read_structure()
        self.register_load_state_dict_post_hook(_read_structure_after_load)  # module-level: pickles

    def _read_structure(self) -> None:
        """Python flags and the constants' statistics from the buffers, so that forward has no
        data-dependent branches and does not recompute what never changes."""
        kept, source, outputs = (buffer.cpu().numpy() for buffer in (self.kept, self.source, self.outputs))
        everything = np.arange(self.width)
        self._plain = np.array_equal(kept, everything) and np.array_equal(outputs, everything)
        if np.array_equal(source, everything[:len(kept)]):
            self._gather = "none"  # emits exactly what arrives, in order
        elif (source < len(kept)).all():
            self._gather = "inputs"
        else:
            self._gather = "constants"
        # NOTE [CLN forward paths]: see forward
        self._padded = not self._plain and self.width <= PADDED_WIDTH * max(len(kept), 1)
        self._select = ("none" if np.array_equal(source, everything) else
                        "prefix" if np.array_equal(source, np.arange(len(source))) else "index")
        constants = self.constants.detach().to("cpu", torch.float64)
        # NOTE [CLN call overhead]: Python ints and floats read here once, so that forward touches as
        # few buffers, tensor methods and no-op casts as it can (see forward)
        self._axis = 1 if self.kind == "group" else -1
        self._kept_count, self._removed_count, self._emitted = len(kept), len(constants), len(source)
        values = constants.tolist()
        self._fill = values[0] if values and all(value == values[0] for value in values) else None
        self._constant_sum = float(constants.sum())
        self._constant_squares = float(constants.square().sum())
        self._constant_mean = float(constants.mean()) if len(constants) else 0.0
        self._constant_spread = float((constants - self._constant_mean).square().sum())

    def __setstate__(self, state) -> None:
        """Unpickling (``torch.load`` of a saved model or checkpoint) reads the structure again: a CLN
        saved by an older fxmin lacks the flags and statistics that forward now uses."""
        super().__setstate__(state)
        if "_fill" not in self.__dict__:  # a deepcopy or a current pickle carries them (_fill is the newest)
            self._read_structure()

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The paths and their arithmetic are in :mod:`fxmin.compensated.forward_paths` (NOTE [CLN forward paths])."""
        axis = self._axis
        if x.dim() < (2 if axis == 1 else 1) or x.shape[axis] != self._kept_count:
            raise InputError(f"CompensatedLayerNorm({self.width}, kind={self.kind}) expects {self._kept_count} "
                             f"channels on axis {axis}, got input of shape {tuple(x.shape)}")
        if self._plain:
            return forward_paths.plain(self, x)
        if not self._emitted:  # nothing leaves: an empty channel axis, nothing to compute
            return x.narrow(axis, 0, 0)
        return forward_paths.padded(self, x) if self._padded else forward_paths.closed_form(self, x)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm) -> CompensatedLayerNorm:
        """The CLN equal to ``norm`` (bit for bit), nothing removed yet. ``normalized_shape`` must be 1-D.

        >>> CompensatedLayerNorm.from_layer_norm(nn.LayerNorm(16))
        CompensatedLayerNorm(16, kind=layer, kept=16, removed=0, outputs=16, eps=1e-05, weight=True, bias=True)
        """
        return cls._copy_of(norm, "layer", _width(norm, norm.normalized_shape), norm.eps, norm.weight, norm.bias)

    @classmethod
    def from_rms_norm(cls, norm: nn.RMSNorm) -> CompensatedLayerNorm:
        """The CLN equal to ``norm`` (an ``nn.RMSNorm`` with 1-D ``normalized_shape``), bit for bit."""
        return cls._copy_of(norm, "rms", _width(norm, norm.normalized_shape), norm.eps, norm.weight, None)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> CompensatedLayerNorm:
        """The CLN equal to ``norm``, a ``GroupNorm(1, C)``, bit for bit.

        GroupNorm(1, C) normalizes each sample over all of ``C x H x W``; the CLN does the same
        (``kind="group"``): a removed channel counts its constant once per position.

        >>> CompensatedLayerNorm.from_group_norm(nn.GroupNorm(1, 8)).kind
        'group'
        """
        if norm.num_groups != 1:
            raise InputError(f"only GroupNorm(1, C) is a LayerNorm; got GroupNorm({norm.num_groups}, "
                             f"{norm.num_channels})")
        return cls._copy_of(norm, "group", norm.num_channels, norm.eps, norm.weight, norm.bias)

    @classmethod
    def _copy_of(cls, norm, kind, width, eps, weight, bias):
        reference = weight if weight is not None else next(iter(norm.buffers()), None)
        device = reference.device if reference is not None else None
        result = cls(width, eps=eps, kind=kind, weight=False if weight is None else weight,
                     bias=False if bias is None else bias, device=device)
        result.train(norm.training)
        return result

    def shrink(self, kept, constants=None, outputs=None) -> CompensatedLayerNorm:
        """A new CLN after a further removal; ``self`` is unchanged. Removals compose.

        ``kept`` lists the original channels (indices into ``width``) that still arrive, a subset
        of ``self.kept``; ``constants`` gives the values of the newly removed ones (as in the
        constructor, relative to those); ``outputs`` is a subset of ``self.outputs`` (default: the
        same). ``width`` stays, earlier constants stay.

        >>> norm = CompensatedLayerNorm(6).shrink([0, 1, 2, 4], {3: 0.0, 5: 1.0}, outputs=[0, 5])
        >>> norm.shrink([1, 2], None, outputs=[5]).constants.tolist()
        [0.0, 0.0, 0.0, 1.0]
        """
        current = self.kept.cpu().numpy()
        kept = _indices("kept", kept, self.width)
        gone = kept[~_members(current, self.width)[kept]]
        if len(gone):
            raise InputError(f"shrink: channels {sorted(gone.tolist())} were already removed "
                             f"(kept now: {len(current)} of {self.width})")
        newly_removed = np.sort(current[~_members(kept, self.width)[current]])
        removed = np.concatenate([self.removed.cpu().numpy(), newly_removed])
        values = np.concatenate([self.constants.detach().cpu().double().numpy(),
                                 _constants(constants, newly_removed, self.width)])
        merged = values[np.argsort(removed, kind="stable")]  # aligned with the removed channels, ascending
        emitted = self.outputs.cpu().numpy()
        outputs = emitted if outputs is None else _indices("outputs", outputs, self.width)
        row_of = np.full(self.width, -1)  # each emitted channel's row of the affine parameters
        row_of[emitted] = np.arange(len(emitted))
        rows = row_of[outputs]
        if (rows < 0).any():
            raise InputError(f"shrink: channels {np.unique(outputs[rows < 0]).tolist()} are no longer emitted, "
                             "their affine parameters are gone")
        rows = torch.from_numpy(rows).to(self.kept.device)

        def sliced(parameter):
            return False if parameter is None else parameter.detach()[rows]

        result = type(self)(self.width, kept, merged, outputs, self.eps, sliced(self.weight), sliced(self.bias),
                            self.kind, device=self.kept.device)
        for name in ("weight", "bias"):
            if getattr(self, name) is not None:
                getattr(result, name).requires_grad_(getattr(self, name).requires_grad)
        result.train(self.training)
        return result

    def extra_repr(self) -> str:
        removed = self.removed.tolist()
        values = self.constants.tolist()
        if not removed:
            described = "removed=0"
        elif not any(values):
            described = f"removed={len(removed)} (constant 0)"
        elif len(removed) <= 4:
            described = "removed={" + ", ".join(f"{j}: {c:.6g}" for j, c in zip(removed, values)) + "}"
        else:
            nonzero = sum(1 for c in values if c)
            described = (f"removed={len(removed)} ({nonzero} nonzero constants in "
                         f"[{min(values):.6g}, {max(values):.6g}], sum {sum(values):.6g})")
        return (f"{self.width}, kind={self.kind}, kept={len(self.kept)}, {described}, outputs={len(self.outputs)}, "
                f"eps={self.eps}, weight={self.weight is not None}, bias={self.bias is not None}")


def _read_structure_after_load(module: CompensatedLayerNorm, incompatible_keys) -> None:
    module._read_structure()


def _indices(name: str, values, width: int) -> np.ndarray:
    """``values`` (channel indices: a sequence, range, numpy array or tensor) as an int64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    result = np.asarray(values)
    if result.ndim != 1:
        raise InputError(f"CompensatedLayerNorm {name}: a sequence of channels, got an array of shape {result.shape}")
    if result.dtype.kind not in "iu":
        result = np.array([int(value) for value in result.tolist()], np.int64)
    result = result.astype(np.int64)
    bad = result[(result < 0) | (result >= width)]
    if len(bad):
        raise InputError(f"CompensatedLayerNorm {name}: channels {bad.tolist()} are outside 0..{width - 1}")
    if _members(result, width).sum() != len(result):
        raise InputError(f"CompensatedLayerNorm {name}: repeated channels in {result.tolist()}")
    return result


def _members(channels: np.ndarray, width: int) -> np.ndarray:
    """bool ``(width,)``: which channels ``channels`` (int indices in range) names."""
    found = np.zeros(width, bool)
    found[channels] = True
    return found


def _constants(constants, removed: np.ndarray, width: int) -> np.ndarray:
    """The removed channels' constants, float64 aligned with ``removed`` (ascending)."""
    if constants is None:
        return np.zeros(len(removed))
    if isinstance(constants, Mapping):
        given = {int(channel): float(value) for channel, value in constants.items()}
        expected = set(removed.tolist())
        if set(given) != expected:
            raise InputError(f"CompensatedLayerNorm constants must name exactly the removed channels "
                             f"{removed.tolist()} (of {width}); missing {sorted(expected - set(given))}, "
                             f"unexpected {sorted(set(given) - expected)}")
        return np.array([given[channel] for channel in removed.tolist()], np.float64)
    if isinstance(constants, torch.Tensor):
        constants = constants.detach().cpu().double().reshape(-1).numpy()
    values = np.asarray(constants, np.float64)
    if values.ndim != 1:
        raise InputError(f"CompensatedLayerNorm constants: a mapping or a sequence of values, got shape {values.shape}")
    if len(values) != len(removed):
        raise InputError(f"CompensatedLayerNorm: {len(values)} constants for {len(removed)} removed channels")
    return values


def _affine(name: str, spec, fill: float, size: int, device, dtype) -> nn.Parameter | None:
    if spec is None or spec is False:
        return None
    if spec is True:
        return nn.Parameter(torch.full((size,), fill, device=device, dtype=dtype))
    tensor = torch.as_tensor(spec).detach()
    if tensor.shape != (size,):
        raise InputError(f"CompensatedLayerNorm {name} must have shape ({size},) (one entry per output), "
                         f"got {tuple(tensor.shape)}")
    # A Parameter keeps its requires_grad (a frozen norm stays frozen); a plain tensor trains.
    return nn.Parameter(tensor.clone(), requires_grad=spec.requires_grad if isinstance(spec, nn.Parameter) else True)


def _width(norm: nn.Module, shape) -> int:
    if len(shape) != 1:
        raise InputError(f"{type(norm).__name__}{tuple(shape)} normalizes over {len(shape)} axes; "
                         "CompensatedLayerNorm covers one (the channel axis)")
    return int(shape[0])
