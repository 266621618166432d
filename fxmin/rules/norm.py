"""Normalization rules. BatchNorm here; LayerNorm and friends see ``compensated-layernorm.md``."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..facts import ValueFact
from .pointwise import opaque_backward
from .registry import rule

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batch_norm_forward(ctx):
    """Exact in eval mode: a per-channel affine map of the input. With running statistics,
    ``const(c) -> const(g (c - m) / sqrt(v + eps) + b)``; without them (batch statistics even in
    eval) a constant channel normalizes to ``const(b)``; ``g == 0`` gives ``const(b)`` always."""
    module = ctx.module
    x = ctx.arg(0, "input")
    fact = ctx.fact(x)
    if fact is None or not fact.tracked or fact.axis != 1 or fact.size != module.num_features:
        shape = ctx.shape()
        return ValueFact.untracked(), None
    size = module.num_features
    gamma = ctx.param("weight").numpy() if module.affine else np.ones(size)
    beta = ctx.param("bias").numpy() if module.affine else np.zeros(size)
    if module.track_running_stats and module.running_mean is not None:
        mean, var = ctx.param("running_mean").numpy(), ctx.param("running_var").numpy()
        value = gamma * (fact.value - mean) / np.sqrt(var + module.eps) + beta
    else:
        value = beta.copy()
    const = fact.const | (gamma == 0)
    value = np.where(gamma == 0, beta, value)
    return ValueFact.constants(1, const, np.where(const, value, 0.0)), ctx.units(x)


def _batch_norm_backward(ctx):
    if not ctx.fact(ctx.node).tracked:
        opaque_backward(ctx)


def _batch_norm_plan(ctx):
    kept = ctx.kept()
    module = ctx.module
    if kept is None or len(kept) == module.num_features:
        return
    replacement = copy.deepcopy(module).to(torch.float64)
    index = torch.from_numpy(kept)
    params = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        new = ctx.param(name)[index].clone()
        if isinstance(tensor, nn.Parameter):
            setattr(replacement, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            setattr(replacement, name, new)
        params[name] = (tuple(tensor.shape), ())
    replacement.num_features = len(kept)
    ctx.replace_module(replacement, params)


rule("batch_norm", modules=_BATCH_NORMS, backward=_batch_norm_backward, plan=_batch_norm_plan,
     edits_module=True)(_batch_norm_forward)
