"""``nn.MultiheadAttention``: a leaf in FX, analysed as the attention it computes and, when
channels go, replaced by :class:`fxmin.compensated.attention.SlicedMultiheadAttention` (projections + SDPA).

NOTE [MultiheadAttention]
``MHA(q, k, v) = out_proj(concat_h softmax(q W_q,h (k W_k,h)^T / sqrt(hd) + mask) v W_v,h)``.
The rule decides, inside the module, what the graph rules decide for hand-written attention
(NOTE [Attention], transformers.md), from the masked weights and the facts of its inputs:

- output channel ``o`` (a row of ``out_proj``) is ``const(b_o + sum W_o[o, (h,e)] c_(h,e))``
  when it reads no varying value dim; it goes when no reader needs it (readers fold constants);
- value dim ``(h, e)`` stays when a kept output reads it (``W_o[:, (h,e)] != 0``) and it varies;
  a constant value dim (``W_v`` row zero on varying inputs) folds ``W_o[:, (h,e)] c`` into the
  output bias: softmax rows sum to 1, and attention dropout acts only in training;
- a head stays when any of its value dims stays; it keeps each q/k dim ``d`` unless ``q_d``
  or ``k_d`` is ``const(0)``; the softmax scale stays ``1/sqrt(original head_dim)``;
- every kept head keeps as many q/k dims and as many value dims as the fullest head (SDPA
  needs uniform heads; a dim kept too is computed as before, so growing is exact);
- input channel ``j`` of query/key/value stays when a kept projection row reads it and it
  varies; a removed constant input folds into that projection's bias.

Supported: ``batch_first`` True and False, q/k/v the same or different tensors with one
``embed_dim``, biases present or absent, ``key_padding_mask`` and a 2-D ``attn_mask``
(boolean or additive), ``is_causal``. Anything else (``add_bias_kv``, ``add_zero_attn``,
``kdim``/``vdim``, 3-D per-head masks, a read of the attention weights, a shared module) keeps
the module whole and every channel around it: exact, shrinks nothing there.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx
from torch import nn

from ..compensated.attention import SlicedMultiheadAttention
from ..arrays import product
from ..facts import TupleFact, ValueFact
from .api import ParamEdit, rule
from .kit import uniform_digits

_INPUTS = ("query", "key", "value")


# -- analysis -------------------------------------------------------------------------------------------------

def _setting(ctx, index, name, default):
    return ctx.arg(index, name, default)


def _supported(ctx):
    """The three input nodes, or None when the module must stay whole."""
    module = ctx.module
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return None
    inputs = [ctx.arg(i, name) for i, name in enumerate(_INPUTS)]
    if not all(isinstance(x, torch.fx.Node) and ctx.shape(x) is not None and len(ctx.shape(x)) == 3 for x in inputs):
        return None
    attn_mask = _setting(ctx, 5, "attn_mask", None)
    if isinstance(attn_mask, torch.fx.Node) and (ctx.shape(attn_mask) is None or len(ctx.shape(attn_mask)) != 2):
        return None
    padding = _setting(ctx, 3, "key_padding_mask", None)
    if isinstance(padding, torch.fx.Node) and (ctx.shape(padding) is None or len(ctx.shape(padding)) != 2):
        return None
    for user in ctx.node.users:  # only the output is read, never the attention weights
        if not (user.op == "call_function" and user.target is operator.getitem and (user.args[1] == 0 or not user.users)):
            return None
    return inputs


def _weights(ctx):
    """Masked float64 (W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o)."""
    def compute():
        E = ctx.module.embed_dim
        weight = ctx.param("in_proj_weight")
        bias = ctx.param("in_proj_bias")
        bias = bias if bias is not None else torch.zeros(3 * E, dtype=torch.float64)
        out_weight = ctx.param("out_proj.weight")
        out_bias = ctx.param("out_proj.bias")
        out_bias = out_bias if out_bias is not None else torch.zeros(E, dtype=torch.float64)
        return (*weight.split(E), *bias.split(E), out_weight, out_bias)

    return ctx.memo("weights", compute)


def _input_facts(ctx, inputs):
    """Per input: (fact on the last axis or None when untracked there)."""
    facts = []
    for x in inputs:
        fact = ctx.fact(x)
        ok = isinstance(fact, ValueFact) and fact.tracked and fact.simple and fact.axis == 2
        facts.append(fact if ok else None)
    return facts


def _projection(weight, bias, fact):
    """(rows reading a varying input, constant value of every row when all its inputs are constant)."""
    if fact is None:
        return np.ones(weight.shape[0], bool), np.zeros(weight.shape[0])
    nonzero = (weight != 0).numpy()
    varying = (nonzero & fact.varying_mask).any(axis=1)
    value = bias.numpy() + product(weight.numpy(), fact.value)
    return varying, np.where(varying, 0.0, value)


def _state(ctx):
    """The module's facts: projections, output constants."""
    inputs = _supported(ctx)
    if inputs is None:
        return None
    W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o = _weights(ctx)
    facts = _input_facts(ctx, inputs)
    q_vary, q_value = _projection(W_q, b_q, facts[0])
    k_vary, k_value = _projection(W_k, b_k, facts[1])
    v_vary, v_value = _projection(W_v, b_v, facts[2])
    return inputs, facts, (q_vary, q_value), (k_vary, k_value), (v_vary, v_value)


def _forward(ctx):
    """Exact: see NOTE [MultiheadAttention]."""
    state = _state(ctx)
    if state is None:
        return None, None
    *_, (v_vary, v_value) = state
    W_o, b_o = _weights(ctx)[6], _weights(ctx)[7]
    reads = (W_o.numpy() != 0)
    out_vary = (reads & v_vary).any(axis=1)
    out_value = b_o.numpy() + product(W_o.numpy(), v_value)
    fact = ValueFact.constants(2, ~out_vary, out_value)
    units = ctx.fresh(fact.size)
    ctx.watch(units)
    weights_part = ValueFact.untracked()
    return TupleFact((fact, weights_part), (units, np.zeros(0, np.int64)), ctx.node), None


def _selection(ctx):
    """(kept out channels, kept value dims, kept q/k dims, heads kept), from output presence."""
    state = _state(ctx)
    inputs, facts, (q_vary, q_value), (k_vary, k_value), (v_vary, v_value) = state
    module = ctx.module
    H, hd = module.num_heads, module.head_dim
    W_o = _weights(ctx)[6].numpy()
    out_kept = ctx.present_units(ctx.fact(ctx.node).units[0])
    v_kept = (W_o[out_kept] != 0).any(axis=0) & v_vary
    heads = v_kept.reshape(H, hd).any(axis=1)
    zero_q = ~q_vary & (q_value == 0)
    zero_k = ~k_vary & (k_value == 0)
    qk_kept = ~(zero_q | zero_k) & np.repeat(heads, hd)
    for mask in (v_kept, qk_kept):  # a kept head keeps at least one dim of each
        grid = mask.reshape(H, hd)
        grid[heads & ~grid.any(axis=1), 0] = True
    v_kept = uniform_digits(v_kept, (H, hd)) & np.repeat(heads, hd) | v_kept
    qk_kept = uniform_digits(qk_kept, (H, hd)) & np.repeat(heads, hd) | qk_kept
    return out_kept, v_kept, qk_kept, heads


def _backward(ctx):
    inputs, facts, *_ = _state(ctx)
    out_kept, v_kept, qk_kept, _ = _selection(ctx)
    W_q, W_k, W_v = _weights(ctx)[:3]
    for x, x_fact, weight, rows in zip(inputs, facts, (W_q, W_k, W_v), (qk_kept, qk_kept, v_kept)):
        if x_fact is None:
            ctx.require_all(x)
            continue
        reads = (weight.numpy()[rows] != 0).any(axis=0)
        ctx.require(x, reads & x_fact.varying_mask, "read by a kept projection of nn.MultiheadAttention")
    for node in ctx.input_nodes():
        if node not in inputs:
            ctx.require_all(node)  # masks


def _sliced_linear(weight, bias, rows, cols, fact, kept_inputs):
    """Linear with ``rows`` x ``cols``; removed constant inputs fold into the bias."""
    new_bias = bias[rows].clone()
    if fact is not None:
        folded = fact.const & ~kept_inputs
        if folded.any():
            new_bias += weight[rows][:, torch.from_numpy(np.nonzero(folded)[0])] @ torch.from_numpy(fact.value[folded])
    linear = nn.Linear(len(cols), len(rows), dtype=torch.float64)
    linear.weight = nn.Parameter(weight[rows][:, cols].clone())
    linear.bias = nn.Parameter(new_bias)
    return linear


def _plan(ctx):
    fact = ctx.fact(ctx.node)
    if not isinstance(fact, TupleFact):
        return
    module = ctx.module
    inputs, facts, _, _, (v_vary, v_value) = _state(ctx)
    out_kept, v_kept, qk_kept, heads = _selection(ctx)
    W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o = _weights(ctx)
    if out_kept.all() and v_kept.all() and qk_kept.all() and all(ctx.present(x).all() for x in inputs):
        return
    projections = []
    for x, x_fact, weight, bias, rows in zip(inputs, facts, (W_q, W_k, W_v), (b_q, b_k, b_v), (qk_kept, qk_kept, v_kept)):
        kept_inputs = ctx.present(x) if x_fact is not None else np.ones(module.embed_dim, bool)
        projections.append(_sliced_linear(weight, bias, torch.from_numpy(np.nonzero(rows)[0]),
                                          torch.from_numpy(np.nonzero(kept_inputs)[0]), x_fact, kept_inputs))
    folded_v = ~v_kept  # removed value dims are constant (or unread): their constant joins the output bias
    out_bias = b_o + W_o[:, torch.from_numpy(np.nonzero(folded_v)[0])] @ torch.from_numpy(v_value[folded_v])
    out_rows, v_cols = torch.from_numpy(np.nonzero(out_kept)[0]), torch.from_numpy(np.nonzero(v_kept)[0])
    out_proj = nn.Linear(len(v_cols), len(out_rows), dtype=torch.float64)
    out_proj.weight = nn.Parameter(W_o[out_rows][:, v_cols].clone())
    out_proj.bias = nn.Parameter(out_bias[out_rows].clone())
    replacement = SlicedMultiheadAttention(*projections, out_proj, int(heads.sum()), 1.0 / math.sqrt(module.head_dim),
                                           module.batch_first, module.dropout)
    ctx.replace_module(replacement, {}, report=_reported_shapes(ctx, replacement, bool(np.any(v_value[folded_v] != 0))))


def _reported_shapes(ctx, replacement, folded: bool) -> tuple:
    """The report lists the module's parameters under their nn.MultiheadAttention names."""
    module, target = ctx.module, ctx.node.target
    stacked = sum(p.weight.shape[0] for p in (replacement.q_proj, replacement.k_proj, replacement.v_proj))
    width = replacement.q_proj.weight.shape[1]
    edits = [ParamEdit(f"{target}.in_proj_weight", tuple(module.in_proj_weight.shape), (stacked, width)),
             ParamEdit(f"{target}.out_proj.weight", tuple(module.out_proj.weight.shape),
                       tuple(replacement.out_proj.weight.shape))]
    if module.in_proj_bias is not None:
        edits.insert(1, ParamEdit(f"{target}.in_proj_bias", tuple(module.in_proj_bias.shape), (stacked,)))
    edits.append(ParamEdit(f"{target}.out_proj.bias", (module.embed_dim,), tuple(replacement.out_proj.bias.shape),
                           ("constant value dims",) if folded else ()))
    return tuple(edits)


rule("multihead_attention", doc=(
         '`nn.MultiheadAttention` analysed as the attention it computes (NOTE [MultiheadAttention]), '
         'replaced by `SlicedMultiheadAttention` (projections + SDPA, original scale) when channels '
         'go.',
         'Dead heads, value dims, `const(0)` q/k dims, input channels (constants folded into the '
         'projections), output channels.',
         'The whole module when its attention weights are read, with `add_bias_kv`, `add_zero_attn`, '
         '`kdim`/`vdim` or 3-D per-head masks.',
         ),
     modules=(nn.MultiheadAttention,), input_axis=lambda node, root: -1, backward=_backward, plan=_plan,
     reads_input_presence=True, edits_module=True)(_forward)
