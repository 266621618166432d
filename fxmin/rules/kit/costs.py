"""``Rule.macs`` counters several rule families share: ``counter(module_or_target, args, kwargs, out)
-> (macs, other)`` on the call's real arguments and output, as :func:`fxmin.flops` runs the graph.
The conventions (what is a multiply-accumulate, what an "other" operation) are NOTE [What is counted]
in :mod:`fxmin.audit.flops`. Part of :mod:`fxmin.rules.kit`.

>>> import torch
>>> per_output(4)(None, (torch.ones(2, 3),), {}, torch.ones(2, 3))   # a norm: four per output element
(0, 24)
>>> dot_products(None, (torch.ones(2, 5), torch.ones(5, 3)), {}, torch.ones(2, 3))   # 6 dot products of length 5
(30, 0)
"""
from __future__ import annotations

from typing import Callable

from ...graph_helpers import count_elements

#: ``counter(module_or_target, args, kwargs, out) -> (macs, other)``
Counter = Callable[..., tuple]


def no_cost(*_) -> tuple:
    """Shape ops, indexing, copies and casts: nothing to compute."""
    return 0, 0


def per_output(times: int = 1) -> Counter:
    """``times`` operations per output element (pointwise ops 1, BatchNorm 2, softmax 3, LayerNorm 4)."""
    def counter(_target, _args, _kwargs, out) -> tuple:
        return 0, times * count_elements(out)
    return counter


def per_input(_target, args, _kwargs, _out) -> tuple:
    """One operation per input element (pooling, reductions)."""
    return 0, count_elements(args[0])


def dot_products(_target, args, _kwargs, out) -> tuple:
    """Each output element is a dot product of length K, the first operand's last axis (``matmul``)."""
    return out.numel() * args[0].shape[-1], 0


def add_dot_products(_target, args, _kwargs, out) -> tuple:
    """``addmm(input, a, b)``: the products of ``a @ b`` plus the add of ``input``, one per output element."""
    return out.numel() * args[1].shape[-1], out.numel()
