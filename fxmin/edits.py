"""The edits a plan records (a base module: plain data, no engine).

Rules record them through :class:`fxmin.rules.api.PlanContext`; :mod:`fxmin.plan` collects them
and :mod:`fxmin.rewrite` installs them; the report lists the :class:`ParamEdit` of each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ParamEdit:
    """One parameter or buffer: its shape before and after, and whether constants were folded into it."""

    name: str
    shape_before: tuple
    shape_after: tuple
    folded_from: tuple = ()  # channels (as 'node[index]') whose constants were folded in
    kept: tuple = ()  # per axis: indices kept (None: the whole axis), when the rule records them


@dataclass(frozen=True)
class ModuleEdit:
    target: str
    module_type: str
    module: torch.nn.Module  # the replacement, its tensors in ``dtype`` (rounded once, NOTE [Fold precision])
    dtype: torch.dtype
    device: torch.device
    params: tuple
    exact: dict = field(default_factory=dict)  # name in ``module`` -> float64 value where the rounding changed it


@dataclass(frozen=True)
class AttrEdit:
    target: str
    value: torch.Tensor  # in ``dtype`` (rounded once)
    dtype: torch.dtype
    requires_grad: bool
    is_parameter: bool
    edit: ParamEdit
    exact: torch.Tensor | None = None  # the float64 value where the rounding changed it


def rounded(value: torch.Tensor, dtype: torch.dtype) -> tuple:
    """``(value in dtype, the float64 value or None)``: NOTE [Fold precision]'s one rounding, keeping the
    exact float64 value only where the rounding changed something (a folded constant; a sliced weight
    is exact in its own dtype)."""
    value = value.detach()
    if value.dtype == dtype:
        return value, None
    stored = value.to(dtype)
    exact = value.dtype == torch.float64 and dtype.is_floating_point and not torch.equal(stored.to(torch.float64), value)
    return stored, value if exact else None


def store_rounded(module: nn.Module, dtype: torch.dtype) -> dict:
    """Cast ``module``'s floating parameters and buffers to ``dtype`` in place (tied ones stay tied);
    return ``{name: float64 value}`` for those the rounding changed."""
    exact, done = {}, {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table in (owner._parameters, owner._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or not tensor.is_floating_point():
                    continue
                qualified = f"{prefix}.{name}" if prefix else name
                if id(tensor) not in done:
                    stored, value = rounded(tensor, dtype)
                    if isinstance(tensor, nn.Parameter):
                        stored = nn.Parameter(stored, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = (stored, value)
                stored, value = done[id(tensor)]
                table[name] = stored
                if value is not None:
                    exact[qualified] = value
    return exact


@dataclass(frozen=True)
class ArgEdit:
    node: str
    args: tuple
    kwargs: dict
    op: str | None = None  # a new call kind and target, e.g. chunk -> torch.split with sizes
    target: object = None


@dataclass(frozen=True)
class ConstantOperand:
    """NOTE [Constant operands]: argument ``index`` of node ``node`` becomes a model constant ``value``
    (float64, shaped to broadcast), an ``nn.Parameter`` when ``trainable``; ``source`` is the node it
    replaces, which nothing else may need any more."""

    node: str
    index: int
    value: torch.Tensor
    dtype: torch.dtype
    trainable: bool
    source: str
    target: str  # the new attribute's name

