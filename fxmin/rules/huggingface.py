"""Ops that Hugging Face models traced with ``transformers.utils.fx.symbolic_trace`` record.

HF's tracer inlines every module outside ``torch.nn``, so a GPT-2 block reaches fxmin as
plain ops: ``transformers.pytorch_utils.Conv1D`` becomes ``torch.addmm(bias, x.view(-1,
x.size(-1)), weight)`` with the weight stored transposed ``(in, out)``; the GELU is
``0.5 * x * (1 + tanh(c * (x + 0.044715 * torch.pow(x, 3))))``; attention masks are built
with ``torch.finfo(dtype).min``, comparisons and ``masked_fill_``. This module needs no
``transformers`` import; when transformers is installed, a ``Conv1D`` kept as a leaf module
(a custom tracer) gets the same rule as the inlined ``addmm``.

NOTE [Conv1D]
``Conv1D(x) = x @ W + b`` with ``W`` of shape ``(in, out)``: a Linear whose weight is ``W.T``.
The rules below reuse :mod:`fxmin.rules.linear` on that transposed view, through a context
whose argument 0 is the matrix operand, and store the result transposed back.
"""
from __future__ import annotations

import operator
import sys

import torch
import torch.fx

from .api import REGISTRY, rule
from .kit import (add_dot_products, check_in_place, dense_view, layer_rule, module_shell, mutates, new_parameter,
                  new_weights, no_cost, opaque_backward, opaque_forward, pointwise_forward, register_pointwise,
                  whole_then_sliced)

# -- scalars and guards ----------------------------------------------------------------------------------------


def _no_channels_forward(ctx):
    """Exact: computes no channel (dtype information, comparisons of sizes or of masks);
    on tensors the result is opaque and every input channel is kept."""
    return opaque_forward(ctx)


rule("dtype info", doc=(
         'Always: `torch.finfo`/`torch.iinfo` compute no channel.',
         '—',
         '—',
         ),
     functions=(torch.finfo, torch.iinfo), backward=opaque_backward)(_no_channels_forward)
rule("comparison", doc=(
         'Comparisons (`<`, `>`, `torch.lt`...) compute no followed channel.',
         '—',
         'On tensors the result is opaque: every input channel kept.',
         ),
     functions=(operator.gt, operator.lt, operator.ge, operator.le, torch.gt, torch.lt, torch.ge,
                              torch.le, torch.eq, torch.ne, operator.not_, operator.invert, operator.and_, operator.or_),
     methods=("gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__", "__ge__", "__le__"),
     backward=opaque_backward)(_no_channels_forward)


def _in_place_fill_forward(ctx):
    """Exact on a tensor that carries no channel (HF's causal mask: ``torch.full(...).masked_fill_(
    ...)``): every channel around it is kept. In place on a tracked tensor that is read later,
    it is refused (NOTE [In-place])."""
    mutated = ctx.arg(0, "input")
    fact = ctx.fact(mutated)
    if fact is not None and fact.tracked:
        check_in_place(ctx, mutated)
    return opaque_forward(ctx)


rule("in-place fill", doc=(
         "`masked_fill_`/`fill_`/`zero_` on a tensor that carries no channel (HF's causal mask); "
         'refused when it overwrites a tracked tensor that is read later.',
         '—',
         'Every channel around it.',
         ),
     methods=("masked_fill_", "fill_", "zero_"), backward=opaque_backward, mutates=mutates)(_in_place_fill_forward)


def _cast_forward(ctx):
    """Exact up to rounding: ``x.to(dtype)``/``x.type(dtype)`` with the dtype (or device) read
    at run time (``x.to(y.dtype)``) to a floating dtype changes no channel; constants stay
    (rounded the same way in both models). Any other operand keeps every channel."""
    operands = []
    torch.fx.node.map_arg((ctx.node.args[1:], ctx.node.kwargs), operands.append)
    if not operands:
        return pointwise_forward(ctx)  # x.to(torch.float64): computed on the constants
    x = ctx.arg(0, "input")
    fact = ctx.fact(x)
    meta = ctx.node.meta.get("tensor_meta")
    if fact is None or not fact.tracked or meta is None or not meta.dtype.is_floating_point:
        return opaque_forward(ctx)
    if not all(node.meta.get("type") in (torch.dtype, torch.device) for node in operands):
        return opaque_forward(ctx)
    return fact, ctx.units(x)


rule("cast", doc=(
         '`x.to(dtype)`/`x.type(dtype)` with the dtype read at run time (`y.dtype`) to a floating '
         'dtype: up to rounding; with literal arguments, as a pointwise op.',
         'Nothing itself.',
         'Any other operand (a tensor in `type_as`, a cast to an integer dtype read at run time).',
         ),
     methods=("to", "type", "type_as"), heads_aware=True, macs=no_cost)(_cast_forward)

# ``torch.pow(x, 3.0)`` in GELU-tanh: elementwise when the exponent is a number (a node operand
# makes the pointwise rule opaque, which is exact).
register_pointwise(functions=(torch.pow, operator.pow), methods=("pow", "__pow__"))


# -- Conv1D: torch.addmm(bias, x, weight) -------------------------------------------------------------------------

class _MatrixOperand:
    """A rule context whose argument 0 is the matrix operand (``addmm``'s argument 1), so the
    Linear helpers read the layer input where they expect it."""

    def __init__(self, ctx, index: int):
        self._ctx, self._index = ctx, index

    def arg(self, index, name=None, default=None):
        return self._ctx.node.args[self._index] if index == 0 else self._ctx.arg(index, name, default)

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def _addmm_view(ctx):
    """The dense (out, in) view of ``addmm(bias, x, W)`` with ``W`` a model constant (in, out),
    or None when the weights are computed, shared, or scaled (``beta``/``alpha``)."""

    def compute():
        node = ctx.node
        if len(node.args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        bias_node, x, weight_node = node.args
        weight, bias = ctx.attr_weight(weight_node), ctx.attr_value(bias_node)
        shape = ctx.shape(x)
        if weight is None or bias is None or shape is None or len(shape) != 2 or bias.dim() != 1:
            return None
        if len(weight_node.users) > 1 or len(bias_node.users) > 1:
            return None  # a shared weight must keep one shape
        return dense_view(whole_then_sliced(lambda: ctx.attr_weight(weight_node).t()), bias, 1, False, -1)

    return ctx.memo("view", compute)


def _addmm_plan(ctx):
    view = _addmm_view(ctx)
    if view is None:
        return
    bias_node, _, weight_node = ctx.node.args
    bias = ctx.attr_value(bias_node)
    new_weight, new_bias, folded_from, *_ = new_weights(_MatrixOperand(ctx, 1), view, bias)
    if tuple(new_weight.shape) == view.weight_shape and torch.equal(new_bias, bias):
        return
    ctx.replace_attr(weight_node, new_weight.t().contiguous())
    ctx.replace_attr(bias_node, new_bias, folded_from)


layer_rule("addmm (Conv1D)", _addmm_view, _addmm_plan, doc=(
               '`torch.addmm(b, x, W)` with `W` (in, out) and `b` model constants read only here '
               "(HF's inlined `Conv1D`): exact as `nn.Linear` with weight `W.T`.",
               'As Linear: rows (columns of `W`) of removed outputs, inputs with their constants '
               'folded into `b`.',
               'Every channel when `W`/`b` are computed or shared, or with `beta`/`alpha`.',
               ),
           channel_axis=-1, operand=lambda ctx: _MatrixOperand(ctx, 1),
           exact="Exact as nn.Linear with weight W.T (NOTE [Conv1D]) when W and the bias are model constants "
                 "read only here; otherwise every channel around it is kept.",
           functions=(torch.addmm,), macs=add_dot_products)


# -- Conv1D kept as a leaf module -------------------------------------------------------------------------------

def _conv1d_view(ctx):
    def compute():
        x = ctx.arg(0, "input")
        shape = ctx.shape(x)
        if shape is None or len(shape) < 1:
            return None
        # Conv1D stores (in, out): the view's rows are its columns
        return dense_view(lambda rows=None, cols=None: ctx.weight("weight", cols, rows).t(), ctx.param("bias"), 1,
                          False, -1, nonzero=lambda: ctx.weight_nonzero("weight").T)

    return ctx.memo("view", compute)


def _conv1d_plan(ctx):
    view = _conv1d_view(ctx)
    if view is None:
        return
    module = ctx.module
    bias = ctx.param("bias")
    new_weight, new_bias, folded_from, cols, rows, _ = new_weights(ctx, view, bias)
    if tuple(new_weight.shape) == view.weight_shape and torch.equal(new_bias, bias):
        return
    replacement = module_shell(module)
    replacement.weight = new_parameter(new_weight.t().contiguous(), module.weight)
    replacement.bias = new_parameter(new_bias, module.bias)
    replacement.nf, replacement.nx = len(rows), len(cols)
    ctx.replace_module(replacement, {"weight": (view.weight_shape[::-1], ()), "bias": (tuple(bias.shape), folded_from)})


def register_conv1d() -> bool:
    """Register the rule for HF ``Conv1D`` kept as a leaf module; True when transformers is there.

    Done at import when transformers was imported before fxmin (importing it costs about half a
    second, so fxmin does not do it itself); call it otherwise. HF's own tracer inlines Conv1D
    into the ``addmm`` above, which needs no registration.

    >>> register_conv1d()  # doctest: +SKIP
    True
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is an optional extra
        return False
    layer_rule("Conv1D", _conv1d_view, _conv1d_plan, doc=(
                   'HF `Conv1D` kept as a leaf module (registered when transformers is imported '
                   'before fxmin): as `nn.Linear` with weight `W.T`.',
                   'As Linear.',
                   'As Linear.',
                   ),
               channel_axis=-1, edits_module=True,
               exact="Exact as nn.Linear with weight W.T (NOTE [Conv1D]).", modules=(Conv1D,))
    return True


if "transformers" in sys.modules:
    register_conv1d()


# ATen keys of these rules, with the torch-level signature (NOTE [ATen aliases] in functional.py)
_aten = torch.ops.aten
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):
    REGISTRY.alias(getattr(torch, _name), getattr(_aten, _name).Tensor, getattr(_aten, _name).Scalar)
REGISTRY.alias(operator.and_, _aten.__and__.Tensor, _aten.bitwise_and.Tensor, _aten.logical_and.default)
REGISTRY.alias(operator.or_, _aten.__or__.Tensor, _aten.bitwise_or.Tensor, _aten.logical_or.default)
REGISTRY.alias(operator.invert, _aten.bitwise_not.default, _aten.logical_not.default)
REGISTRY.alias(torch.pow, _aten.pow.Tensor_Scalar)
REGISTRY.alias(torch.addmm, _aten.addmm.default)
REGISTRY.alias("to", _aten._to_copy.default)  # keyword dtype/device: computed on the constants
REGISTRY.alias("type_as", _aten.type_as.default)
