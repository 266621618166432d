"""Embeddings, tied unembeddings, and ops that create tensors from nothing (``arange``...)."""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..arrays import constant_columns
from ..facts import ValueFact
from ..graph_helpers import deep_copy
from .api import REGISTRY, rule
from .kit import no_cost, opaque_backward


def _embedding_forward(ctx):
    """Exact: column ``d`` of the output is ``const(c)`` iff every row of the table holds ``c``
    there; removed columns are dropped from the table. A tied unembedding (a Linear sharing
    the table) loses the same columns: its input couples with the embedding's output."""
    module = ctx.module
    weight = ctx.weight("weight")  # own dtype: equality is the same in float64
    shape = ctx.shape()
    if shape is None or module.max_norm is not None:
        return ValueFact.untracked(), None
    column_const = constant_columns(weight)
    fact = ValueFact.constants(len(shape) - 1, column_const, weight[0].to(torch.float64).numpy())
    return fact, ctx.fresh(fact.size)


def _embedding_plan(ctx):
    kept = ctx.kept()
    module = ctx.module
    if kept is None or len(kept) == module.embedding_dim:
        return
    replacement = deep_copy(module, {id(module.weight): None})
    replacement.weight = nn.Parameter(ctx.weight("weight", cols=torch.from_numpy(kept)),
                                      requires_grad=module.weight.requires_grad)
    replacement.embedding_dim = len(kept)
    ctx.replace_module(replacement, {"weight": (tuple(module.weight.shape), (), (None, kept))})


rule("embedding", doc=(
         'Always: column `d` is `const(c)` iff every row of the table holds `c` there.',
         'Columns of the table; a tied unembedding loses the same columns (its input couples with the'
         ' output).',
         '—',
         ),
     modules=(nn.Embedding,), plan=_embedding_plan,
     edits_module=True, macs=no_cost)(_embedding_forward)


def _table_node(ctx):
    """``aten.embedding(weight, indices, ...)``'s table when it is a model attribute read by this node alone
    (NOTE [Functional weights] in functional.py), else None."""
    weight = ctx.arg(0, "weight")
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and set(weight.users) == {ctx.node}:
        return weight
    return None


def _functional_embedding_forward(ctx):
    """As the ``nn.Embedding`` rule, on ``aten.embedding(weight, indices, padding_idx, ...)`` (the table
    first): exact when the table is a model attribute read only here; else every column is kept."""
    table, shape = _table_node(ctx), ctx.shape()
    if table is None or shape is None:
        return ValueFact.untracked(), None
    weight = ctx.attr_weight(table)
    column_const = constant_columns(weight)
    fact = ValueFact.constants(len(shape) - 1, column_const, weight[0].to(torch.float64).numpy())
    return fact, ctx.fresh(fact.size)


def _functional_embedding_plan(ctx):
    kept, table = ctx.kept(), _table_node(ctx)
    if kept is None or table is None or len(kept) == ctx.attr_weight(table).shape[1]:
        return
    ctx.replace_attr(table, ctx.attr_weight(table)[:, torch.from_numpy(kept)])


rule("functional embedding", doc=(
         'As `nn.Embedding`, when the table is a model attribute read only by this op.',
         'Columns of the table.',
         'Every column when the table is computed or read elsewhere too (a tied unembedding).',
         ),
     functions=(torch.ops.aten.embedding.default,), plan=_functional_embedding_plan,
     macs=no_cost)(_functional_embedding_forward)


def _creation_forward(ctx):
    """Exact: a tensor made from sizes alone (``arange``, ``zeros``...) carries no channel."""
    return (ValueFact.untracked() if ctx.shape() is not None else None), None


def _creation_backward(ctx):
    opaque_backward(ctx)


rule("creation", doc=(
         'Always: `arange`, `zeros`... made from sizes carry no channel.',
         '—',
         '—',
         ),
     functions=(torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor,
                            torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.tril,
                            torch.triu, torch.eye, torch.linspace),
     methods=("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "tril", "triu"),
     backward=_creation_backward, macs=no_cost)(_creation_forward)


# ATen keys of the creation rule (they read sizes only); most of these fold to constants in the
# canonical export graph (NOTE [Canonical export graph])
_aten = torch.ops.aten
REGISTRY.alias(torch.arange, _aten.arange.default, _aten.arange.start, _aten.arange.start_step)
REGISTRY.alias(torch.zeros, _aten.zeros.default)
REGISTRY.alias(torch.ones, _aten.ones.default)
REGISTRY.alias(torch.full, _aten.full.default)
REGISTRY.alias(torch.zeros_like, _aten.zeros_like.default)
REGISTRY.alias(torch.ones_like, _aten.ones_like.default)
REGISTRY.alias(torch.full_like, _aten.full_like.default)
REGISTRY.alias(torch.empty_like, _aten.empty_like.default)
REGISTRY.alias("new_ones", _aten.new_ones.default)
REGISTRY.alias("new_zeros", _aten.new_zeros.default)
REGISTRY.alias("new_full", _aten.new_full.default)
REGISTRY.alias("new_empty", _aten.new_empty.default)
