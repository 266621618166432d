"""Frozen fact types: what the analysis knows about each tensor, channel by channel.

NOTE [Tracked axis]
Every tensor value in the graph has at most one *tracked* channel axis: the axis
along which channels can be removed (features of a Linear input, channels of a
conv input, ...). Facts are per channel of that axis. A value with no tracked axis
(``axis is None``) is opaque: all of it is varying and all of it is kept. Keeping
everything is always exact, so "untracked" is the safe answer for anything a rule
cannot follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _frozen(array, dtype) -> np.ndarray:
    out = np.array(array, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class ValueFact:
    """Forward facts of one tensor along its tracked axis.

    ``const[c]`` is True when channel ``c`` holds the scalar ``value[c]`` at every
    position of every sample (zero is a constant too). ``value`` is float64 and 0
    where the channel varies.

    >>> fact = ValueFact.varying(axis=1, size=3)
    >>> bool(fact.const.any())
    False
    """

    axis: int | None
    size: int
    const: np.ndarray
    value: np.ndarray
    #: NOTE [Heads]: ((axis, size), ...) for a channel axis split over several tensor axes, as
    #: attention splits d_model into (heads, head_dim): channel ``c`` sits at the mixed-radix
    #: digits of ``c`` over (``axis``, *inner axes). Empty for an ordinary channel axis.
    inner: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "const", _frozen(self.const, bool))
        object.__setattr__(self, "value", _frozen(self.value, np.float64))
        if self.axis is None:
            if self.size != 0 or self.const.size or self.value.size:
                raise ValueError("an untracked ValueFact has no channels")
            return
        if self.axis < 0:
            raise ValueError(f"tracked axis must be non-negative, got {self.axis}")
        if self.const.shape != (self.size,) or self.value.shape != (self.size,):
            raise ValueError(
                f"fact arrays must have shape ({self.size},), got {self.const.shape} and {self.value.shape}"
            )
        if np.any(self.value[~self.const] != 0):
            raise ValueError("value must be 0 where a channel varies")
        if not np.all(np.isfinite(self.value)):
            raise ValueError("constant values must be finite")
        inner_size = int(np.prod([size for _, size in self.inner])) if self.inner else 1
        if self.inner and (self.size % inner_size or len({self.axis, *(a for a, _ in self.inner)}) != 1 + len(self.inner)):
            raise ValueError(f"inner axes {self.inner} do not split {self.size} channels on axis {self.axis}")

    @staticmethod
    def varying(axis: int, size: int) -> "ValueFact":
        return ValueFact(axis, size, np.zeros(size, bool), np.zeros(size))

    @staticmethod
    def untracked() -> "ValueFact":
        return ValueFact(None, 0, np.zeros(0, bool), np.zeros(0))

    @staticmethod
    def constants(axis: int, const, value) -> "ValueFact":
        """Build a fact from a const mask and values; non-finite constants become varying."""
        const = np.asarray(const, bool).copy()
        value = np.asarray(value, np.float64).copy()
        const &= np.isfinite(value)
        value[~const] = 0.0
        return ValueFact(axis, int(const.size), const, value)

    @property
    def tracked(self) -> bool:
        return self.axis is not None

    @property
    def varying_mask(self) -> np.ndarray:
        return ~self.const

    def repeat(self, times: int, axis: int) -> "ValueFact":
        """Each channel becomes ``times`` consecutive channels (flatten of trailing axes)."""
        return ValueFact(axis, self.size * times, np.repeat(self.const, times), np.repeat(self.value, times))

    def moved(self, axis: int) -> "ValueFact":
        if self.inner:
            raise ValueError("moved() on a split channel axis: use with_axes()")
        return ValueFact(axis, self.size, self.const, self.value)

    @property
    def simple(self) -> bool:
        """True for an ordinary channel axis (not split over several tensor axes)."""
        return not self.inner

    @property
    def axes(self) -> tuple:
        """All tensor axes the channels occupy: (axis, *inner axes)."""
        return (self.axis,) + tuple(a for a, _ in self.inner)

    @property
    def radix(self) -> tuple:
        """Sizes of the tensor axes in :attr:`axes` (their product is ``size``)."""
        inner = tuple(size for _, size in self.inner)
        return (self.size // int(np.prod(inner)) if inner else self.size,) + inner

    def with_axes(self, axes) -> "ValueFact":
        """The same channels on other tensor axes (after a permute or transpose)."""
        axes = tuple(axes)
        return ValueFact(axes[0], self.size, self.const, self.value,
                         tuple((a, size) for a, (_, size) in zip(axes[1:], self.inner)))

    def replaced(self, const, value) -> "ValueFact":
        """Same axes, new constants (non-finite constants become varying)."""
        const = np.asarray(const, bool).copy()
        value = np.asarray(value, np.float64).copy()
        const &= np.isfinite(value)
        value[~const] = 0.0
        return ValueFact(self.axis, self.size, const, value, self.inner)

    def __repr__(self) -> str:
        if self.axis is None:
            return "ValueFact(untracked)"
        inner = f", inner={self.inner}" if self.inner else ""
        return f"ValueFact(axis={self.axis}, size={self.size}, const={int(self.const.sum())}{inner})"


@dataclass(frozen=True, eq=False)
class TupleFact:
    """Facts of an op that returns several tensors (split, chunk, unbind): one ValueFact and one
    units array per piece; ``source`` is the tensor they were cut from."""

    parts: tuple
    units: tuple
    source: object
    #: a tuple is not itself a tracked tensor: rules that read it whole keep all of it
    tracked = False
    axis = None
    size = 0

    def __repr__(self) -> str:
        return f"TupleFact({len(self.parts)} parts)"
