"""Normalization rules. BatchNorm here; LayerNorm and friends see ``compensated-layernorm.md``."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import opaque_backward

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batch_norm_forward(ctx):
    """Exact in eval mode: a per-channel affine map of the input. With running statistics,
    ``const(c) -> const(g (c - m) / sqrt(v + eps) + b)``; without them (batch statistics even in
    eval) a constant channel normalizes to ``const(b)``; ``g == 0`` gives ``const(b)`` always."""
    module = ctx.module
    x = ctx.arg(0, "input")
    fact = ctx.fact(x)
    if fact is None or not fact.tracked or fact.axis != 1 or fact.size != module.num_features:
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


def _absorbs_shift(node, root) -> bool:
    """NOTE [BatchNorm absorbs]: an eval BatchNorm with running statistics, called once, can subtract
    a constant from its running mean."""
    module = root.get_submodule(node.target)
    calls = sum(1 for n in node.graph.nodes if n.op == "call_module" and n.target == node.target)
    return module.track_running_stats and module.running_mean is not None and calls == 1


def _batch_norm_backward(ctx):
    present = ctx.present()
    if present.size and not present.any():
        # torch has no zero-feature BatchNorm (NOTE [No empty convs] in linear.py): keep channel 0
        first = np.zeros(present.size, bool)
        first[0] = True
        ctx.require(ctx.node, first, "torch BatchNorm cannot have zero features: channel 0 stays")


def _batch_norm_plan(ctx):
    kept = ctx.kept()
    module = ctx.module
    shift = ctx.input_shift()  # NOTE [BatchNorm absorbs]
    if kept is None or (len(kept) == module.num_features and shift is None):
        return
    replacement = copy.deepcopy(module).to(torch.float64)
    index = torch.from_numpy(kept)
    params = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        new = ctx.param(name)[index].clone()
        if name == "running_mean" and shift is not None:
            new = new - shift
        if isinstance(tensor, nn.Parameter):
            setattr(replacement, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            setattr(replacement, name, new)
        params[name] = (tuple(tensor.shape), (), (kept,))
    replacement.num_features = len(kept)
    ctx.replace_module(replacement, params)


rule("batch_norm", doc=(
         'In eval mode: a per-channel affine map `const(c) -> const(γ(c-m)/√(v+ε)+β)`; `γ == 0` gives'
         ' `const(β)`.',
         'Slices weight, bias, running mean and variance to the kept channels (couples input and '
         'output).',
         'Every channel when the input is not tracked on axis 1.',
         ),
     modules=_BATCH_NORMS, backward=_batch_norm_backward, plan=_batch_norm_plan,
     input_axis=lambda node, root: 1, absorbs_shift=_absorbs_shift,
     edits_module=True)(_batch_norm_forward)


# -- LayerNorm, RMSNorm, GroupNorm(1, C): through CompensatedLayerNorm ------------------------------------------
#
# NOTE [Compensated normalization]
# A LayerNorm couples all channels through its statistics, so an input channel may only
# leave when it is constant: its constant then moves into the CompensatedLayerNorm
# (see compensated-layernorm.md). Outputs are independent of inputs: an output channel is
# emitted iff a reader needs it, even when its input no longer arrives.

def _norm_view(ctx):
    """(CompensatedLayerNorm equal to the node's norm, input node, channel axis) or None."""
    from ..compensated.layer_norm import CompensatedLayerNorm

    def compute():
        module = ctx.module
        x = ctx.arg(0, "input")
        shape = ctx.shape(x)
        if shape is None:
            return None
        if module is not None:
            if isinstance(module, CompensatedLayerNorm):
                norm = copy.deepcopy(module).to(torch.float64)
            elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
                norm = CompensatedLayerNorm.from_layer_norm(module)
            elif isinstance(module, nn.RMSNorm) and len(module.normalized_shape) == 1:
                norm = CompensatedLayerNorm.from_rms_norm(module)
            elif isinstance(module, nn.GroupNorm) and module.num_groups == 1:
                norm = CompensatedLayerNorm.from_group_norm(module)
            else:
                return None
            norm = norm.to(torch.float64)
        else:
            norm = _functional_norm(ctx, shape)
            if norm is None:
                return None
        axis = 1 if norm.kind == "group" else len(shape) - 1
        return norm, x, axis

    return ctx.memo("norm", compute)


def _functional_norm(ctx, shape):
    from ..compensated.layer_norm import CompensatedLayerNorm

    target = ctx.node.target
    if target in (F.group_norm, torch.ops.aten.group_norm.default):
        groups, weight_node, bias_node, eps = ctx.arg(1, "num_groups"), ctx.arg(2, "weight"), ctx.arg(3, "bias"), ctx.arg(4, "eps", 1e-5)
        if groups != 1:
            return None
        width, kind = shape[1], "group"
    else:
        normalized = ctx.arg(1, "normalized_shape")
        if not isinstance(normalized, (tuple, list)) or len(normalized) != 1 or not isinstance(normalized[0], int):
            return None
        width = normalized[0]
        if target is F.rms_norm:
            weight_node, bias_node, eps, kind = ctx.arg(2, "weight"), None, ctx.arg(3, "eps"), "rms"
        else:
            weight_node, bias_node, eps, kind = ctx.arg(2, "weight"), ctx.arg(3, "bias"), ctx.arg(4, "eps", 1e-5), "layer"
    affine = []
    for node in (weight_node, bias_node):
        if node is None:
            affine.append(False)
            continue
        value = ctx.attr_value(node)
        if value is None or len(node.users) > 1 or not isinstance(eps, (int, float, type(None))):
            return None  # computed or shared affine parameters: not followed
        affine.append(value)
    return CompensatedLayerNorm(width, eps=eps, weight=affine[0], bias=affine[1], kind=kind, dtype=torch.float64)


def _norm_forward(ctx):
    """Exact through CompensatedLayerNorm: removed inputs must be constant (their constants join
    the statistics); outputs go when unread; ``weight_i == 0`` makes output ``i`` ``const(bias_i)``."""
    view = _norm_view(ctx)
    shape = ctx.shape()
    if view is None:
        return ValueFact.untracked(), None
    norm, x, axis = view
    fact = ctx.fact(x)
    outputs = len(norm.outputs)
    weight = norm.weight.detach().numpy() if norm.weight is not None else np.ones(outputs)
    bias = norm.bias.detach().numpy() if norm.bias is not None else np.zeros(outputs)
    const = weight == 0
    value = np.where(const, bias, 0.0)
    if fact is not None and fact.tracked and fact.axis == axis and fact.const.all() and len(shape) >= 1:
        with torch.no_grad():  # every input is constant: so is every output
            sample = torch.tensor(fact.value).reshape((1, -1) + ((1,) * (len(shape) - 2) if norm.kind == "group" else ()))
            value = norm(sample).reshape(-1).numpy()
        const = np.ones(outputs, bool)
    return ValueFact.constants(axis, const, value), ctx.fresh(outputs)


def _norm_backward(ctx):
    view = _norm_view(ctx)
    if view is None:
        opaque_backward(ctx)
        return
    _, x, axis = view
    fact = ctx.fact(x)
    if fact is None or not fact.tracked or fact.axis != axis:
        ctx.require_all(x)
        return
    if ctx.present().any():
        ctx.require(x, fact.varying_mask, "feeds the statistics of a LayerNorm (only constant channels can leave)")


def _norm_plan(ctx):
    view = _norm_view(ctx)
    if view is None:
        return
    norm, x, axis = view
    fact = ctx.fact(x)
    current_kept = norm.kept.tolist()
    current_outputs = norm.outputs.tolist()
    if fact is not None and fact.tracked and fact.axis == axis:
        present = ctx.present(x)
        kept = [current_kept[i] for i in np.nonzero(present)[0]]
        constants = {current_kept[i]: float(fact.value[i]) for i in np.nonzero(~present)[0]}
    else:
        kept, constants = current_kept, {}
    outputs = [current_outputs[i] for i in ctx.kept()]
    if kept == current_kept and outputs == current_outputs:
        return  # nothing leaves: the norm stays as it is
    shrunk = norm.shrink(kept, constants, outputs).to(torch.float64)
    params = {name: (tuple(getattr(norm, name).shape), ()) for name in ("weight", "bias") if getattr(norm, name) is not None}
    if ctx.module is not None:
        ctx.replace_module(shrunk, params)
        return
    weight_node = ctx.arg(2, "weight")
    like = ctx.original(weight_node) if isinstance(weight_node, torch.fx.Node) else None
    owner = weight_node.target.rpartition(".")[0] if like is not None else ""
    target = owner if owner and not _is_called(ctx, owner) else f"_fxmin_{ctx.node.name}"
    ctx.add_module(target, shrunk, params, like)
    ctx.patch((x,), {}, op="call_module", target=target)


def _is_called(ctx, path) -> bool:
    return any(n.op == "call_module" and (n.target == path or n.target.startswith(path + ".")) for n in ctx.node.graph.nodes)


def _norm_input_axis(node, root) -> int:
    """GroupNorm(1, C) normalizes channels on axis 1; the LayerNorm kinds, the last axis."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return 1 if isinstance(module, nn.GroupNorm) or getattr(module, "kind", None) == "group" else -1
    return 1 if node.target in (F.group_norm, torch.ops.aten.group_norm.default) else -1


def _cln_type():
    from ..compensated.layer_norm import CompensatedLayerNorm

    return CompensatedLayerNorm


rule("layer_norm", doc=(
         'Through `CompensatedLayerNorm` (see `compensated-layernorm.md`): removed inputs must be '
         'constant; their constants join the statistics. `weight_i == 0` makes output `i` '
         '`const(bias_i)`.',
         'Constant input channels (into `S1`/`S2`); output channels nobody reads.',
         'Every varying input channel while any output is needed (it feeds the mean and variance).',
         ),
     modules=(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _cln_type()),
     functions=(F.layer_norm, F.rms_norm, F.group_norm),
     backward=_norm_backward, plan=_norm_plan, edits_module=True, backward_untracked=True, input_axis=_norm_input_axis)(_norm_forward)


# ATen keys of the functional norms, with the signatures of F.layer_norm / F.group_norm / F.rms_norm
# (NOTE [ATen aliases] in functional.py)
_aten = torch.ops.aten
REGISTRY.alias(F.layer_norm, _aten.layer_norm.default)
REGISTRY.alias(F.group_norm, _aten.group_norm.default)
REGISTRY.alias(F.rms_norm, _aten.rms_norm.default)
