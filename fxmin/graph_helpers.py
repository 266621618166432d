"""Small helpers over ``torch.fx`` graphs that the engine and the rules share (a base module)."""
from __future__ import annotations

import copy
import functools
import itertools
from collections import OrderedDict

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten


#: the functions a Linear's product is called as in a graph (torch.fx's ``F.linear``; torch.export's ``aten.linear``)
LINEAR_FUNCTIONS = (torch.nn.functional.linear, torch.ops.aten.linear.default)


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
        place = device if device is not None else source.device if tensor.is_meta or source.is_meta else tensor.device
        value = source.to(device=place, dtype=target,
                          copy=not fresh)
        memo[id(tensor)] = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
    copied = deep_copy(module, memo)
    return copied.to(device=device, dtype=dtype) if dtype is not None else moved(copied, device)


def moved(module: nn.Module, device) -> nn.Module:
    """``module.to(device)`` (None: where it is), skipped when every tensor of it is there already:
    ``Module.to`` would still visit each one."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    if device is None or all(t.device == device for t in tensors):
        return module
    return module.to(device=device)


def share_module(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that holds the same tensor objects (copies none)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return deep_copy(module, memo)


# NOTE [Copying module trees]
# The pass copies module structure often (the model's, sharing its tensors; each replacement layer's
# shell), and ``copy.deepcopy`` spends most of that in its generic protocol: ``__reduce_ex__``,
# ``copyreg`` and a reconstruction per object, for every hook dictionary of every module.
# :func:`deep_copy` makes the same copy by the same steps where it knows them: a module whose class
# keeps ``object``'s reduction and defines no ``__deepcopy__`` is rebuilt as ``deepcopy`` rebuilds it
# (``cls.__new__``, its ``__getstate__`` copied, its own ``__setstate__``), and plain dicts, lists, sets and
# tuples and immutable atoms are copied as ``deepcopy`` copies them; anything else (tensors, other
# objects, a module class with its own copying) goes to ``copy.deepcopy`` with the same memo.

_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, type})
_MISSING = object()


def deep_copy(value, memo: dict | None = None):
    """``copy.deepcopy(value, memo)``, faster on trees of modules (NOTE [Copying module trees])."""
    memo = {} if memo is None else memo
    found = memo.get(id(value), _MISSING)
    if found is not _MISSING:
        return found
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind in (dict, OrderedDict):
        copied = memo[id(value)] = kind()
        for key, item in value.items():
            copied[deep_copy(key, memo)] = deep_copy(item, memo)
        return copied
    if kind is list:
        copied = memo[id(value)] = []
        copied.extend(deep_copy(item, memo) for item in value)
        return copied
    if kind is set:
        copied = memo[id(value)] = set()
        copied.update(deep_copy(item, memo) for item in value)
        return copied
    if kind is tuple:
        items = tuple(deep_copy(item, memo) for item in value)
        return value if all(a is b for a, b in zip(items, value)) else items
    if isinstance(value, nn.Module) and _rebuilt_like_deepcopy(kind):
        copied = memo[id(value)] = kind.__new__(kind)
        copied.__setstate__({key: deep_copy(item, memo) for key, item in value.__getstate__().items()})
        return copied
    return copy.deepcopy(value, memo)


@functools.cache
def _rebuilt_like_deepcopy(kind: type) -> bool:
    """Whether ``copy.deepcopy`` rebuilds instances of ``kind`` from ``__getstate__`` / ``__setstate__`` alone."""
    return (kind.__reduce_ex__ is object.__reduce_ex__ and kind.__reduce__ is object.__reduce__
            and not hasattr(kind, "__deepcopy__") and not hasattr(kind, "__getnewargs_ex__")
            and not hasattr(kind, "__getnewargs__") and "__slots__" not in kind.__dict__)


def free_name(root: torch.fx.GraphModule, name: str, taken=()) -> str:
    """``name``, or ``name_2``, ``name_3``, ...: the first attribute name that neither ``root`` (nor its
    graph) nor ``taken`` uses."""
    used = {n.target for n in root.graph.nodes if n.op in ("get_attr", "call_module")} | set(taken)
    candidate, suffix = name, 1
    while candidate in used or hasattr(root, candidate):
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate
