"""Small helpers over ``torch.fx`` graphs that the engine and the rules share (a base module)."""
from __future__ import annotations

import copy
import itertools

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten


def tensor_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The shape recorded for ``node`` by shape propagation, or None when it is not a tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def count_elements(value) -> int:
    """Elements of every tensor in ``value`` (a tensor, or a tuple / list / dict of them)."""
    return sum(leaf.numel() for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor))


def copy_module(module: nn.Module, dtype: torch.dtype | None = None, device=None, load=None) -> nn.Module:
    """``copy.deepcopy(module).to(device, dtype)`` with each tensor copied once, straight to its target.

    ``load(name)``: where the value of the tensor ``name`` (as in ``module.named_parameters()``) comes
    from, e.g. a :class:`fxmin.weights.ModuleWeights`' masked load (default: the tensor itself).

    NOTE [One copy per tensor]
    The deep copy and the cast each copy every weight; the memo hands deepcopy tensors already on
    ``device`` in ``dtype`` (floating point ones; others keep their dtype, as ``Module.to`` does), so
    the final ``.to`` has nothing left to do. Shared tensors stay shared; ``requires_grad`` is kept.
    A loaded value that is already a fresh tensor of the right dtype is used as it is.
    """
    memo: dict = {}
    named = itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in memo:
            continue
        source = load(name) if load is not None else tensor.detach()
        fresh = source.numel() > 0 and source.data_ptr() != tensor.data_ptr()
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        place = device if device is not None else source.device if tensor.is_meta else tensor.device  # meta: loaded
        value = source.to(device=place, dtype=target,
                          copy=not fresh)
        memo[id(tensor)] = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
    copied = copy.deepcopy(module, memo)
    return copied.to(device=device, dtype=dtype) if dtype is not None else copied.to(device=device)


def share_module(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that holds the same tensor objects (copies none)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def free_name(root: torch.fx.GraphModule, name: str, taken=()) -> str:
    """``name``, or ``name_2``, ``name_3``, ...: the first attribute name that neither ``root`` (nor its
    graph) nor ``taken`` uses."""
    used = {n.target for n in root.graph.nodes if n.op in ("get_attr", "call_module")} | set(taken)
    candidate, suffix = name, 1
    while candidate in used or hasattr(root, candidate):
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate
