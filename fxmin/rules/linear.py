"""Linear and convolution rules: the layers whose rows and columns get removed.

The dense-view machinery they share (NOTE [Dense view]) is :mod:`fxmin.rules.kit.dense`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .api import rule
from .kit import (DenseView, dense_input, dense_macs, dense_output, dense_required_inputs, dense_view, layer_rule,
                  module_shell, new_parameter, new_weights, whole_then_sliced)


def _zero_padded(module) -> bool:
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return False  # reflect/replicate/circular padding keeps a constant channel constant
    padding = module.padding
    if isinstance(padding, str):
        return padding == "same" and any(k > 1 for k in module.kernel_size)
    return any(p > 0 for p in padding)


def _module_view(ctx) -> DenseView:
    def compute():
        module = ctx.module
        weight, bias = (lambda rows=None, cols=None: ctx.weight("weight", rows, cols)), ctx.param("bias")
        nonzero = lambda: ctx.weight_nonzero("weight")  # noqa: E731
        if isinstance(module, nn.Linear):
            return dense_view(weight, bias, 1, False, -1, nonzero=nonzero)
        return dense_view(weight, bias, module.groups, _zero_padded(module), 1, nonzero=nonzero)

    return ctx.memo("view", compute)


def _plan_module(ctx) -> None:
    view = _module_view(ctx)
    module = ctx.module
    bias = ctx.param("bias")
    new_weight, new_bias, folded_from, cols, rows, groups = new_weights(ctx, view, bias)
    absorber = _batch_norm_absorber(ctx) if bias is None and new_bias is not None else None
    if absorber is not None:
        # NOTE [BatchNorm absorbs]: a bias-less layer read only by an eval BatchNorm: the folded
        # constant shifts the BN's running mean instead of creating a bias (exact in eval; in
        # train mode the batch mean absorbs it anyway).
        ctx.shift_input(absorber, new_bias, folded_from)
        new_bias = None
    if tuple(new_weight.shape) == view.weight_shape and (new_bias is None) == (bias is None) and (
        bias is None or torch.equal(new_bias, bias)
    ):
        return  # nothing changes
    replacement = module_shell(module)
    replacement.weight = new_parameter(new_weight, module.weight)
    replacement.bias = new_parameter(new_bias, module.bias) if new_bias is not None else None
    if isinstance(module, nn.Linear):
        replacement.in_features, replacement.out_features = len(cols), len(rows)
    else:
        replacement.in_channels, replacement.out_channels, replacement.groups = len(cols), len(rows), max(groups, 1)
    params = {"weight": (view.weight_shape, (), (rows, cols))}
    if bias is not None or new_bias is not None:
        params["bias"] = (tuple(bias.shape) if bias is not None else (0,), folded_from, (rows,))
    ctx.replace_module(replacement, params)


def _batch_norm_absorber(ctx):
    """The node (a BatchNorm) that alone reads this layer's output and can absorb a constant."""
    users = list(ctx.node.users)
    if len(users) != 1 or users[0].args[:1] != (ctx.node,):
        return None
    reader = ctx.rule_of(users[0])
    if reader is None or reader.absorbs_shift is None or not reader.absorbs_shift(users[0], ctx.root):
        return None
    if type(ctx.module) is nn.Linear and ctx.shape(users[0])[1] != ctx.module.out_features:
        return None
    return users[0]


def _forward_module(ctx):
    """Exact: rows of present outputs and columns of present inputs are kept; removed constant
    inputs fold into the bias (behind zero padding only zero constants are removed)."""
    view = _module_view(ctx)
    result = dense_output(ctx, view)
    x, fact = dense_input(ctx, view)
    tied = _tied_embedding(ctx)
    if tied is not None and fact is not None and ctx.units(tied) is not None and len(ctx.units(tied)) == fact.size:
        ctx.unify(ctx.units(x), ctx.units(tied))  # a tied unembedding loses the embedding's columns
    return result


def _tied_embedding(ctx):
    """The embedding node whose table is this Linear's weight (a tied unembedding), or None."""
    if not isinstance(ctx.module, nn.Linear):
        return None

    def index():
        tables = {}
        for node in ctx.node.graph.nodes:
            if node.op == "call_module":
                other = ctx.root.get_submodule(node.target)
                if isinstance(other, nn.Embedding):
                    tables.setdefault(id(other.weight), node)
        return tables

    node = ctx.graph_memo("embedding tables", index).get(id(ctx.module.weight))
    return node if node is not None and ctx.order(node) < ctx.order(ctx.node) else None


def _module_macs(module, args, kwargs, out) -> tuple:
    """``Rule.macs``: each output element reads ``in_features`` (or in per group x kernel taps) inputs;
    a bias adds one operation per output element."""
    extra = out.numel() if module.bias is not None else 0
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features, extra
    return out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size), extra


def _backward_module(ctx):
    dense_required_inputs(ctx, _module_view(ctx))


rule(
    "linear/conv", doc=(
              'Always (Linear, Conv1d/2d/3d, any stride/dilation/groups). Output `k` is `const(b_k + '
              'Σ tap_sum[k,j]·c_j)` iff it reads no varying input; with zero padding also no nonzero '
              'constant input.',
              'Rows of outputs that are unneeded or constant; columns of removed inputs, folding '
              '`tap_sum[:, j]·c_j` into the bias (a bias is created if absent).',
              'A nonzero constant input behind zero padding (border pixels see fewer taps). Grouped '
              'convs keep groups uniform (every live group as full as the fullest; an empty group '
              'goes whole); depthwise convs couple in/out channels. A module called from several '
              'nodes is a barrier.',
              ),
          modules=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d),
    backward=_backward_module,
    backward_untracked=True,
    plan=_plan_module,
    reads_input_presence=True,
    input_axis=lambda node, root: -1 if isinstance(root.get_submodule(node.target), nn.Linear) else 1,
    edits_module=True,
    macs=_module_macs,
)(_forward_module)


# -- F.linear(x, weight, bias) with weights read through get_attr --------------------------------

def _functional_view(ctx) -> DenseView | None:
    def compute():
        weight_node, bias_node = ctx.arg(1, "weight"), ctx.arg(2, "bias")
        weight = ctx.attr_weight(weight_node)
        bias = ctx.attr_value(bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            return None
        if len(weight_node.users) > 1 or (bias_node is not None and len(bias_node.users) > 1):
            return None  # a shared weight must keep one shape
        return dense_view(whole_then_sliced(lambda: ctx.attr_weight(weight_node)), bias, 1, False, -1,
                          can_fold=bias is not None)

    return ctx.memo("view", compute)


def _plan_functional_linear(ctx):
    view = _functional_view(ctx)
    if view is None:
        return
    weight_node, bias_node = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    bias = ctx.attr_value(bias_node) if bias_node is not None else None
    new_weight, new_bias, folded_from, *_ = new_weights(ctx, view, bias)
    if tuple(new_weight.shape) != view.weight_shape:
        ctx.replace_attr(weight_node, new_weight)
    if bias_node is not None and not torch.equal(new_bias, bias):
        ctx.replace_attr(bias_node, new_bias, folded_from)


layer_rule("functional linear", _functional_view, _plan_functional_linear, doc=(
               'As `nn.Linear` when weight (and bias) are model attributes read only by this call.',
               'As `nn.Linear`: the attributes are replaced by sliced tensors.',
               'Everything around it when the weight is computed or shared; nonzero constant inputs '
               'when there is no bias to fold into.',
               ),
           channel_axis=-1,
           exact="Exact as nn.Linear when weight (and bias) are module attributes read only here; otherwise "
                 "every channel around it is kept.",
           functions=(F.linear,), macs=dense_macs)
