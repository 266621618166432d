"""Embeddings, tied unembeddings, and ops that create tensors from nothing (``arange``...)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..facts import ValueFact
from .api import rule
from .kit import opaque_backward


def _embedding_forward(ctx):
    """Exact: column ``d`` of the output is ``const(c)`` iff every row of the table holds ``c``
    there; removed columns are dropped from the table. A tied unembedding (a Linear sharing
    the table) loses the same columns: its input couples with the embedding's output."""
    module = ctx.module
    weight = ctx.param("weight")
    shape = ctx.shape()
    if shape is None or module.max_norm is not None:
        return ValueFact.untracked(), None
    column_const = (weight == weight[:1]).all(dim=0).numpy()
    fact = ValueFact.constants(len(shape) - 1, column_const, weight[0].numpy())
    return fact, ctx.fresh(fact.size)


def _embedding_plan(ctx):
    kept = ctx.kept()
    module = ctx.module
    if kept is None or len(kept) == module.embedding_dim:
        return
    replacement = copy.deepcopy(module).to(torch.float64)
    replacement.weight = nn.Parameter(ctx.param("weight")[:, torch.from_numpy(kept)].clone(),
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
     edits_module=True)(_embedding_forward)


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
     backward=_creation_backward)(_creation_forward)
