"""Normalization rules. BatchNorm here; LayerNorm and friends see ``compensated-layernorm.md``."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..facts import ValueFact
from ..graph_helpers import deep_copy
from .api import REGISTRY, rule
from .kit import opaque_backward, per_output

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
        # torch has no zero-feature BatchNorm (NOTE [No empty convs] in kit/dense.py): keep channel 0
        first = np.zeros(present.size, bool)
        first[0] = True
        ctx.choose(ctx.node, first, "torch BatchNorm cannot have zero features: channel 0 stays")


def _batch_norm_plan(ctx):
    kept = ctx.kept()
    module = ctx.module
    shift = ctx.input_shift()  # NOTE [BatchNorm absorbs]
    if kept is None or (len(kept) == module.num_features and shift is None):
        return
    sliced = ("weight", "bias", "running_mean", "running_var")
    replaced = (getattr(module, name, None) for name in sliced)  # set below: not copied first
    replacement = deep_copy(module, {id(t): None for t in replaced if t is not None}).to(torch.float64)
    index = torch.from_numpy(kept)
    params = {}
    for name in sliced:
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
        folded_from = ctx.input_shift_sources() if name == "running_mean" and shift is not None else ()
        params[name] = (tuple(tensor.shape), folded_from, (kept,))
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
     edits_module=True, macs=per_output(2))(_batch_norm_forward)


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
        x = ctx.arg(0, "input")
        shape = ctx.shape(x)
        if shape is None:
            return None
        module = ctx.masked_module() if ctx.module is not None else None
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
    the statistics); outputs go when unread; ``weight_i == 0`` makes output ``i`` ``const(bias_i)``.
    Over the head dim of channels split into heads, see NOTE [Per-head norms]."""
    if _reads_heads(ctx):
        return _per_head_forward(ctx)
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
            sample = torch.tensor(fact.value).reshape(1, -1)
            if norm.kind == "group":  # two equal positions per channel: the statistics of the channels alone,
                sample = sample[..., None].expand(1, outputs, 2)  # and GroupNorm accepts a single channel
            value = norm(sample)[..., 0].reshape(-1).numpy() if norm.kind == "group" else norm(sample).reshape(-1).numpy()
        const = np.ones(outputs, bool)
    return ValueFact.constants(axis, const, value), ctx.fresh(outputs)


def _norm_backward(ctx):
    if _reads_heads(ctx):
        _per_head_backward(ctx)
        return
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
    if _reads_heads(ctx):
        _per_head_plan(ctx)
        return
    view = _norm_view(ctx)
    if view is None:
        return
    norm, x, axis = view
    fact = ctx.fact(x)
    current_kept, current_outputs = norm.kept.cpu().numpy(), norm.outputs.cpu().numpy()
    kept, constants = current_kept, None
    if fact is not None and fact.tracked and fact.axis == axis:
        present = ctx.present(x)
        kept, leaving = current_kept[present], current_kept[~present]
        constants = fact.value[~present][np.argsort(leaving)]  # as shrink takes them: by channel, ascending
    outputs = current_outputs[ctx.kept()]
    if np.array_equal(kept, current_kept) and np.array_equal(outputs, current_outputs):
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


# NOTE [Per-head norms]
# Qwen3 and Gemma 3 normalize q and k per head over the head dim (``q_norm``, ``k_norm``: an RMSNorm
# of head_dim features applied to (B, T, heads, head_dim)). Heads are independent under it, so a
# whole head leaves like any other. Its output dims and input dims are separate channels, one set
# for every kept head (the norm's weight is one per dim, shared by all heads): an output dim stays
# when some kept head's reader needs it; an input dim stays when it varies in some kept head, or
# holds different constants in two of them. A removed input dim holds one constant in every kept
# head (0 when its projection rows are zero), so the norm becomes a CompensatedLayerNorm over the
# head dim that counts it (NOTE [Compensated normalization]), exactly as before. A norm written as
# a function (``F.rms_norm``) keeps every dim of a kept head.

def _reads_heads(ctx) -> bool:
    fact = ctx.fact(ctx.arg(0, "input"))
    return isinstance(fact, ValueFact) and fact.tracked and not fact.simple


def _per_head(ctx):
    """(norm, x, fact) when the norm normalizes the innermost digit of split channels, or None."""
    from ..compensated.layer_norm import CompensatedLayerNorm

    view = _norm_view(ctx)
    x = ctx.arg(0, "input")
    fact, shape = ctx.fact(x), ctx.shape(x)
    if view is None or shape is None or isinstance(ctx.module, CompensatedLayerNorm) or view[0].kind == "group":
        return None
    if fact.axes[-1] != len(shape) - 1 or fact.radix[-1] != view[0].width:
        return None
    return view[0], x, fact


def _per_head_forward(ctx):
    """Exact: NOTE [Per-head norms]. A head whose every input is constant gives constants (computed
    by the norm itself); ``weight_e == 0`` makes output dim ``e`` ``const(bias_e)`` in every head,
    and so does, in an RMSNorm, a ``const(0)`` input dim (it is scaled, not centred)."""
    spec = _per_head(ctx)
    if spec is None:
        return ValueFact.untracked(), None
    norm, x, fact = spec
    dims = fact.radix[-1]
    const_heads = fact.const.reshape(-1, dims).all(axis=1)
    value = np.zeros((len(const_heads), dims))
    if const_heads.any():
        with torch.no_grad():
            value[const_heads] = norm(torch.tensor(fact.value.reshape(-1, dims)[const_heads])).numpy()
    const = np.repeat(const_heads[:, None], dims, axis=1)
    silent = np.zeros((len(const_heads), dims), bool)
    if norm.weight is not None:
        silent |= (norm.weight.detach().numpy() == 0)[None, :]
    if norm.kind == "rms":
        silent |= (fact.const & (fact.value == 0)).reshape(-1, dims)
    bias = norm.bias.detach().numpy() if norm.bias is not None else np.zeros(dims)
    const |= silent
    value = np.where(silent & ~const_heads[:, None], bias[None, :], value)
    return fact.replaced(const.reshape(-1), value.reshape(-1)), ctx.fresh(fact.size)


def _per_head_sets(ctx, spec):
    """(kept heads, input dims, output dims): what the heads' requirements ask of the norm."""
    _, x, fact = spec
    dims = fact.radix[-1]
    out = ctx.present().reshape(-1, dims)
    heads = out.any(axis=1) | ctx.present(x).reshape(-1, dims).any(axis=1)
    if ctx.module is None:  # a functional norm stays as it is: every dim of a kept head
        every = np.ones(dims, bool) if heads.any() else np.zeros(dims, bool)
        return heads, every, every
    const = fact.const.reshape(-1, dims)[heads]
    value = fact.value.reshape(-1, dims)[heads]
    one_constant = const.all(axis=0) & (value == value[:1]).all(axis=0) if heads.any() else np.ones(dims, bool)
    inputs = ~one_constant | ctx.present(x).reshape(-1, dims)[heads].any(axis=0)
    return heads, inputs, out[heads].any(axis=0)


def _per_head_backward(ctx):
    spec = _per_head(ctx)
    if spec is None:
        opaque_backward(ctx)
        return
    heads, inputs, outputs = _per_head_sets(ctx, spec)
    ctx.require(ctx.node, (heads[:, None] & outputs[None, :]).reshape(-1), "every kept head emits the same dims")
    ctx.require(spec[1], (heads[:, None] & inputs[None, :]).reshape(-1), "feeds the statistics of a kept head")


def _per_head_plan(ctx):
    """The norm over the head dim as a CompensatedLayerNorm of the kept input and output dims; with
    no head left its input is empty (the views make it (..., 0, 0)) and it becomes an identity."""
    spec = _per_head(ctx)
    if spec is None:
        return
    norm, x, fact = spec
    heads, inputs, outputs = _per_head_sets(ctx, spec)
    if ctx.module is None:
        if not heads.any():
            ctx.patch((x,), {}, op="call_function", target=torch.clone)
        return
    params = {name: (tuple(getattr(ctx.module, name).shape), ())
              for name in ("weight", "bias") if getattr(ctx.module, name, None) is not None}
    if not heads.any():
        ctx.replace_module(nn.Identity(), params)
        return
    if inputs.all() and outputs.all():
        return
    dims = fact.radix[-1]
    first = np.nonzero(heads)[0][0]
    constants = {int(e): float(fact.value.reshape(-1, dims)[first, e]) for e in np.nonzero(~inputs)[0]}
    ctx.replace_module(norm.shrink(np.nonzero(inputs)[0].tolist(), constants, np.nonzero(outputs)[0].tolist()), params)


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
         'Every varying input channel while any output is needed (it feeds the mean and variance). Over the '
         'head dim of heads (`q_norm`/`k_norm`, NOTE [Per-head norms]): whole heads leave; an input dim leaves '
         'when it holds one constant in every kept head; `F.rms_norm` keeps every dim of a kept head.',
         ),
     modules=(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _cln_type()),
     functions=(F.layer_norm, F.rms_norm, F.group_norm),
     backward=_norm_backward, plan=_norm_plan, edits_module=True, backward_untracked=True, input_axis=_norm_input_axis,
     heads_aware=True, macs=per_output(4))(_norm_forward)


# ATen keys of the functional norms, with the signatures of F.layer_norm / F.group_norm / F.rms_norm
# (NOTE [ATen aliases] in functional.py)
_aten = torch.ops.aten
REGISTRY.alias(F.layer_norm, _aten.layer_norm.default)
REGISTRY.alias(F.group_norm, _aten.group_norm.default)
REGISTRY.alias(F.rms_norm, _aten.rms_norm.default)
