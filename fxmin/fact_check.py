"""The analysis's constants, checked against a run of the reference (quick verification; an engine module)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .facts import ValueFact

# NOTE [Constants checked in a run]
# Every channel fxmin removes is removed for one of two reasons: nothing that reaches an output
# reads it (a backward fact), or it holds one value at every position of every sample (a forward
# fact, ``ValueFact.const``), which the plan folds into its readers. Quick verification
# (``verify="quick"``) compares the result with the reference end to end in the model's dtype only,
# where a wrongly folded channel of small weight could hide under the dtype's tolerance; so it also
# checks, at every node of the reference run, that each channel the analysis took for a constant
# holds that constant. A constant is checked where it arises, not through the layers after it, and
# zeros (most constants) come out of a run in any dtype exactly. The error, computed in the model's
# dtype (the constant rounded to it once), is held to that dtype's tolerance relative to the node's
# own scale (max(1, max |finite value|)), as the end-to-end comparison is (NOTE [Tolerances] in
# fxmin/verify.py). A value whose shape does not carry the fact's channels fails the check: the
# analysis described another tensor than the run computed.


@dataclass
class ConstantCheck:
    """What :func:`observer` saw, over every run it watched: the constant channels checked at each node
    (``checked``: node name -> how many), the largest error relative to a node's scale, and where a
    constant did not hold (``failures``: ``(node, message)``)."""

    tolerance: float
    checked: dict = field(default_factory=dict)
    max_relative_error: float = 0.0
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def nodes(self) -> int:
        return len(self.checked)

    @property
    def channels(self) -> int:
        return sum(self.checked.values())


def observer(facts: dict, check: ConstantCheck):
    """``observe(node, value)`` for :class:`fxmin.streamed.StreamedRun`: checks ``value`` against
    ``facts[node]`` (a :class:`ValueFact`) and records the outcome in ``check``."""
    def observe(node, value):
        fact = facts.get(node)
        if fact is None or fact.axis is None or not fact.const.any():
            return
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        check.checked[node.name] = int(fact.const.sum())
        problem = _constant_error(value, fact, check)
        if problem is not None:
            check.failures.append((node, problem))
    return observe


def _constant_error(value: torch.Tensor, fact: ValueFact, check: ConstantCheck) -> str | None:
    """What is wrong with ``value``'s constant channels (None: each holds its constant), the largest
    error relative to ``value``'s scale recorded in ``check``."""
    channels, axis = _channel_view(value, fact)
    if channels is None:
        return f"the analysis followed {fact.size} channels on axis {fact.axis}, the run computed shape {tuple(value.shape)}"
    index = np.nonzero(fact.const)[0]
    actual = channels.index_select(axis, torch.as_tensor(index, device=value.device))
    if not actual.numel():
        return None
    shape = [1] * actual.dim()
    shape[axis] = len(index)
    difference = actual - torch.as_tensor(fact.value[index], device=value.device).to(actual.dtype).view(shape)
    low, high = torch.aminmax(difference)
    worst, scale = float(torch.maximum(-low, high)), _scale(value.detach())
    if worst == worst:  # not nan
        check.max_relative_error = max(check.max_relative_error, worst / scale)
    if worst <= check.tolerance * scale:
        return None
    per_channel = difference.abs().nan_to_num(float("inf")).movedim(axis, -1).reshape(-1, len(index)).amax(0)
    channel = int(index[int(per_channel.argmax())])
    return (f"channel {channel} was taken for the constant {fact.value[channel]:.6g}, the run gives values up to "
            f"{worst:.3g} away from it (tolerance {check.tolerance:.1g} x scale {scale:.3g})")


def _channel_view(value: torch.Tensor, fact: ValueFact) -> tuple:
    """(``value`` with the fact's channels on one axis, that axis): ``fact.axis``, or, for a channel axis
    split over several (NOTE [Heads] in fxmin/facts.py), the last, the split axes moved there and
    flattened; (None, None) when the shape does not hold ``fact.size`` channels there."""
    axes = (fact.axis, *(axis for axis, _ in fact.inner))
    if max(axes) >= value.dim():
        return None, None
    if fact.inner:
        value = value.movedim(axes, tuple(range(-len(axes), 0))).flatten(-len(axes))
        return (value, value.dim() - 1) if value.shape[-1] == fact.size else (None, None)
    return (value, fact.axis) if value.shape[fact.axis] == fact.size else (None, None)


def _scale(value: torch.Tensor) -> float:
    """max(1, max |finite value|), in one pass over ``value`` where it is all finite."""
    low, high = (float(v) for v in torch.aminmax(value))
    if np.isfinite(low) and np.isfinite(high):
        return max(1.0, -low, high)
    return max(1.0, float(value.abs().nan_to_num(0.0, 0.0, 0.0).max()))
