"""Functional and ATen forms of the layer rules: what ``torch.compile`` and ``torch.export`` graphs call.

Dynamo (torch >= 2.4 inlines built-in modules) records ``torch.conv2d(x, w, b, ...)``,
``F.batch_norm(x, mean, var, w, b, False, ...)`` and ``torch._C._nn.linear``; ``torch.export``
records ``aten.conv2d.default``, ``aten.batch_norm.default``, ``aten.add.Tensor``... Once
:mod:`fxmin.compile` turns the lifted parameters back into ``get_attr`` nodes, these rules
read them exactly as the module rules read ``module.weight``.

NOTE [Functional weights]
A weight (or BatchNorm statistic) is followed only when it is a ``get_attr`` read by this
node alone: a tensor computed at run time, or shared by two readers, keeps every channel
(exact, shrinks nothing there). Without a bias there is nothing to fold a removed nonzero
constant into, so such a channel stays (``can_fold=False``), as for ``F.linear``.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F

from ..facts import ValueFact
from .api import REGISTRY, rule
from .kit import (dense_macs, dense_view, layer_rule, new_weights, no_cost, opaque_forward, per_output,
                  pointwise_forward, register_pointwise, whole_then_sliced)

aten = torch.ops.aten

# -- convolution ----------------------------------------------------------------------------------

_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
          aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv_setting(node, name, default):
    index = _CONV_ARGS.index(name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _conv_padded(node, weight: torch.Tensor) -> bool:
    padding = _conv_setting(node, "padding", 0)
    if isinstance(padding, str):
        return padding == "same" and any(k > 1 for k in weight.shape[2:])
    padding = padding if isinstance(padding, (tuple, list)) else (padding,)
    return any(p > 0 for p in padding)


def _single_reader(node, reader) -> bool:
    return node is None or (isinstance(node, torch.fx.Node) and node.op == "get_attr" and set(node.users) == {reader})


def _conv_view(ctx):
    def compute():
        node = ctx.node
        weight_node, bias_node = _conv_setting(node, "weight", None), _conv_setting(node, "bias", None)
        weight = ctx.attr_weight(weight_node)
        bias = ctx.attr_value(bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            return None
        if not (_single_reader(weight_node, node) and _single_reader(bias_node, node)):
            return None
        groups = _conv_setting(node, "groups", 1)
        if not isinstance(groups, int):
            return None
        return dense_view(whole_then_sliced(lambda: ctx.attr_weight(weight_node)), bias, groups,
                          _conv_padded(node, weight), 1, can_fold=bias is not None)

    return ctx.memo("view", compute)


def _conv_plan(ctx):
    view = _conv_view(ctx)
    if view is None:
        return
    node = ctx.node
    weight_node, bias_node = _conv_setting(node, "weight", None), _conv_setting(node, "bias", None)
    bias = ctx.attr_value(bias_node) if bias_node is not None else None
    new_weight, new_bias, folded_from, _, _, groups = new_weights(ctx, view, bias)
    if tuple(new_weight.shape) != view.weight_shape:
        ctx.replace_attr(weight_node, new_weight)
    if bias_node is not None and (new_bias.shape != bias.shape or not torch.equal(new_bias, bias)):
        ctx.replace_attr(bias_node, new_bias, folded_from)
    groups = max(groups, 1)
    if groups != view.groups:
        args = list(node.args)
        kwargs = dict(node.kwargs)
        index = _CONV_ARGS.index("groups")
        if index < len(args):
            args[index] = groups
        else:
            while len(args) < index:  # fill defaults up to groups, positionally
                name = _CONV_ARGS[len(args)]
                args.append(kwargs.pop(name, {"bias": None, "stride": 1, "padding": 0, "dilation": 1}[name]))
            args.append(groups)
            kwargs.pop("groups", None)
        ctx.patch(tuple(args), kwargs)


layer_rule("functional conv", _conv_view, _conv_plan, doc=(
               'As `nn.ConvNd` when weight (and bias) are model attributes read only by this call.',
               'As `nn.ConvNd`.',
               'Everything around it when the weight is computed or shared; as `nn.ConvNd` otherwise.',
               ),
           channel_axis=1,
           exact="Exact as nn.ConvNd when weight (and bias) are model attributes read only here; otherwise "
                 "every channel around the conv is kept.",
           functions=tuple(_CONVS), macs=dense_macs)

# -- linear: the F.linear rule serves aten.linear too (same signature) -----------------------------

REGISTRY.alias(F.linear, aten.linear.default)

# -- batch norm -------------------------------------------------------------------------------------

#: target -> positions of (input, weight, bias, running_mean, running_var, training, eps)
_BATCH_NORMS = {
    F.batch_norm: dict(input=0, running_mean=1, running_var=2, weight=3, bias=4, training=5, eps=7),
    aten.batch_norm.default: dict(input=0, weight=1, bias=2, running_mean=3, running_var=4, training=5, eps=7),
}
_BATCH_NORM_DEFAULTS = dict(weight=None, bias=None, running_mean=None, running_var=None, training=False, eps=1e-5)


def _batch_norm_args(node) -> dict:
    positions = _BATCH_NORMS[node.target]
    found = {}
    for name, index in positions.items():
        if index < len(node.args):
            found[name] = node.args[index]
        else:
            found[name] = node.kwargs.get(name, _BATCH_NORM_DEFAULTS.get(name))
    return found


def _batch_norm_tensors(ctx):
    """{name: float64 tensor or None} for the statistics and affine parameters, or None if not followed."""
    def compute():
        args = _batch_norm_args(ctx.node)
        if args["training"] is not False or args["running_mean"] is None or args["running_var"] is None:
            return None
        tensors = {}
        for name in ("weight", "bias", "running_mean", "running_var"):
            node = args[name]
            if node is None:
                tensors[name] = None
                continue
            if not _single_reader(node, ctx.node):
                return None
            tensors[name] = ctx.attr_value(node)
        return tensors

    return ctx.memo("batch_norm", compute)


def _functional_batch_norm_forward(ctx):
    """Exact in inference (``training=False``) with running statistics: a per-channel affine map,
    ``const(c) -> const(g (c - m) / sqrt(v + eps) + b)``; ``g == 0`` gives ``const(b)``."""
    args = _batch_norm_args(ctx.node)
    tensors = _batch_norm_tensors(ctx)
    x = args["input"]
    fact = ctx.fact(x)
    if tensors is None or not isinstance(fact, ValueFact) or not fact.tracked or fact.axis != 1 \
            or fact.size != tensors["running_mean"].numel():
        return opaque_forward(ctx)
    size = fact.size
    gamma = tensors["weight"].numpy() if tensors["weight"] is not None else np.ones(size)
    beta = tensors["bias"].numpy() if tensors["bias"] is not None else np.zeros(size)
    mean, var = tensors["running_mean"].numpy(), tensors["running_var"].numpy()
    value = gamma * (fact.value - mean) / np.sqrt(var + float(args["eps"])) + beta
    const = fact.const | (gamma == 0)
    value = np.where(gamma == 0, beta, value)
    return ValueFact.constants(1, const, np.where(const, value, 0.0)), ctx.units(x)


def _functional_batch_norm_plan(ctx):
    fact = ctx.fact(ctx.node)
    if not isinstance(fact, ValueFact) or not fact.tracked:
        return
    kept = ctx.kept()
    if len(kept) == fact.size:
        return
    args = _batch_norm_args(ctx.node)
    index = torch.from_numpy(kept)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if args[name] is not None:
            ctx.replace_attr(args[name], ctx.attr_value(args[name])[index].clone())


rule("functional batch_norm", doc=(
         'With `training=False` and running statistics: the same affine map as `nn.BatchNorm`.',
         'Slices the statistics and affine attributes.',
         'Every channel otherwise.',
         ),
     functions=tuple(_BATCH_NORMS), plan=_functional_batch_norm_plan,
     macs=per_output(2))(_functional_batch_norm_forward)

# -- ATen elementwise, pooling and shape ops (torch.export graphs) ------------------------------------

register_pointwise(functions=(
    aten.relu.default, aten.gelu.default,
    aten.silu.default, aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.elu.default, aten.leaky_relu.default, aten.clone.default, aten.exp.default,
    aten.abs.default, aten.neg.default,
))
REGISTRY.alias(aten.clone.default, aten.alias.default, aten.detach.default)  # the identity, as clone


def _aten_dropout_forward(ctx):
    """Exact when ``train`` is False (the identity); with ``train=True`` every channel is kept."""
    train = ctx.arg(2, "train", False)
    return opaque_forward(ctx) if train is not False else pointwise_forward(ctx)


rule("aten dropout", doc=(
         'With `train=False` (the identity).',
         'Nothing itself.',
         'Every channel with `train=True`.',
         ),
     functions=(aten.dropout.default,), macs=no_cost)(_aten_dropout_forward)

# NOTE [ATen aliases]: these ATen overloads compute what the rule's other targets compute, with the
# same signature (an ``alpha`` other than the default makes the elementwise rule opaque); the
# elementwise and pooling rules read their own tables, which list the ATen overloads too.
REGISTRY.alias(operator.add, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Scalar,
               aten.rsub.Tensor)
REGISTRY.alias(F.max_pool2d, aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
               aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default)
REGISTRY.alias(torch.flatten, aten.flatten.using_ints)
REGISTRY.alias(torch.reshape, aten.view.default, aten.reshape.default)
REGISTRY.alias(torch.mean, aten.mean.dim)
REGISTRY.alias(torch.cat, aten.cat.default)
