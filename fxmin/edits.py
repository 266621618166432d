"""The edits a plan records (a base module: plain data, no engine).

Rules record them through :class:`fxmin.rules.api.PlanContext`; :mod:`fxmin.plan` collects them
and :mod:`fxmin.rewrite` installs them; the report lists the :class:`ParamEdit` of each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
    module: torch.nn.Module  # float64 replacement
    dtype: torch.dtype
    device: torch.device
    params: tuple


@dataclass(frozen=True)
class AttrEdit:
    target: str
    value: torch.Tensor  # float64
    dtype: torch.dtype
    requires_grad: bool
    is_parameter: bool
    edit: ParamEdit


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

