"""Reading sizes: ``x.size(d)``, ``x.shape``, ``x.dim()``, and guards FX leaves behind.

NOTE [Size reads]
A size of a tracked axis flows through integer arithmetic (``C // n_head``, ``H % ws``) to its
uses, each of one kind:
- it scales tensors (``q.size(-1) ** -0.5``): the reference computes with the original value;
- it shapes a view at a channel axis coupled with the axis read (``x.view(-1, x.size(-1))``):
  its run-time value is the new size by itself ("follows");
- it shapes a view at a channel axis where the plan writes the kept count as a literal (NOTE
  [Computed sizes] in kit/views.py): its value does not matter ("patched");
- it sizes a channel axis of an expand that repeats heads (``repeat_kv`` reading ``x.shape``): the
  expand's plan writes the kept count there ("patched");
- anything else (a view's batch axis, ``torch.arange``, another ``expand``): it must not change.
Any "anything else", or scaling together with "follows", pins the axis (every channel kept). A read
that scales tensors is otherwise replaced by its original value when its axis loses channels.
"""
from __future__ import annotations

import builtins
import math
import operator

import torch
import torch.fx

from ..errors import MissingRuleError, describe_node
from .api import rule
from .kit import BINARY_OPS, no_cost, opaque_backward, opaque_forward, repeat_size_use, size_use_kinds


# -- reading sizes --------------------------------------------------------------------------------------------

def _size_forward(ctx):
    """Exact: a size of a tracked axis that only scales tensors (``q.size(-1) ** -0.5``) is
    replaced by its original value, which is what the reference computes with; one that shapes
    tensors (view arguments, ...) pins the axis: every channel is kept, so it never changes."""
    return None, None


def original_size(value: int) -> int:
    """Stands in for a size read whose original value the minimized graph must keep using."""
    return value


_SCALAR_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
                      operator.pow, operator.neg, math.sqrt, math.pow, math.floor, math.ceil}


def _reads(ctx):
    """[(node that yields the size, axis read)] for this size/shape node; axis None = whole shape."""
    node = ctx.node
    source = node.args[0]
    shape = ctx.shape(source)
    if shape is None:
        return []
    rank = len(shape)
    if node.op == "call_method" and node.target == "size" and ctx.arg(1, "dim") is not None:
        dim = ctx.arg(1, "dim")
        return [(node, dim % rank if isinstance(dim, int) else None)]
    reads = []
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            reads.append((user, user.args[1] % rank))
        elif user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], slice):
            for axis in range(rank)[user.args[1]]:
                reads.append((user, axis))  # a slice of the shape feeds its users as a tuple
            reads.append((user, "slice"))
        else:
            reads.append((user, None))
    return reads


def _use_kinds(ctx, read) -> set:
    """The kinds of use of the number ``read`` and of what is computed from it (NOTE [Size reads])."""
    def compute():
        cone, pending, kinds = {read}, [read], set()
        while pending:
            node = pending.pop()
            for user in node.users:
                if user in cone:
                    continue
                is_tensor = user.meta.get("tensor_meta") is not None
                key = user.target
                if user.op == "call_function" and key in _SCALAR_ARITHMETIC and not is_tensor:
                    cone.add(user)  # integer arithmetic, or a tuple concatenated for a view's shape
                    pending.append(user)
                elif user.op == "call_function" and key is torch.full and user.args[0] in ([], ()) and is_tensor:
                    cone.add(user)  # a 0-d tensor of the number (HF: torch.full([], size ** 0.5))
                    pending.append(user)
                elif is_tensor and user.op in ("call_function", "call_method") and key in BINARY_OPS:
                    kinds.add("scale")
                elif user.op in ("call_method", "call_function") and key in ("view", "reshape", torch.reshape):
                    kinds |= size_use_kinds(ctx, user, cone)
                elif user.op == "call_method" and key == "expand":
                    kinds.add(repeat_size_use(ctx, user, cone))
                else:
                    kinds.add("other")
        return kinds

    return ctx.memo(("size uses", read), compute)


def _pins(kinds) -> bool:
    return "other" in kinds or {"scale", "follows"} <= kinds


def _tracked_reads(ctx):
    source = ctx.node.args[0]
    fact = ctx.fact(source)
    if fact is None or not fact.tracked:
        return [], False
    axes = set(fact.axes)
    hits, whole = [], False
    for node, axis in _reads(ctx):
        if axis is None:
            whole = True
        elif axis == "slice":
            continue
        elif axis in axes:
            hits.append(node)
    return hits, whole


def _size_backward(ctx):
    node = ctx.node
    if node.op == "call_method" and node.target == "dim":
        return
    if node.op == "call_function" and node.args[1] != "shape":
        return
    hits, whole = _tracked_reads(ctx)
    sliced = [user for user, axis in _reads(ctx) if axis == "slice"]
    if whole or any(_pins(_use_kinds(ctx, hit)) for hit in hits if not _is_slice(hit)) or any(
            _slice_reads_tracked(ctx, user) for user in sliced):
        ctx.require_all(node.args[0], "its size is read to shape other tensors")


def _is_slice(node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice)


def _slice_reads_tracked(ctx, user) -> bool:
    fact = ctx.fact(ctx.node.args[0])
    rank = len(ctx.shape(ctx.node.args[0]))
    return any(axis in fact.axes for axis in range(rank)[user.args[1]]) if fact is not None and fact.tracked else False


def _size_plan(ctx):
    node = ctx.node
    if node.op == "call_method" and node.target == "dim":
        return
    if node.op == "call_function" and node.args[1] != "shape":
        return
    source = node.args[0]
    fact = ctx.fact(source)
    if fact is None or not fact.tracked or ctx.present(source).all():
        return
    hits, _ = _tracked_reads(ctx)
    shape = ctx.shape(source)
    for hit in hits:
        if _is_slice(hit):
            continue
        axis = (ctx.arg(1, "dim") if hit is node else hit.args[1]) % len(shape)
        if "scale" not in _use_kinds(ctx, hit):
            continue  # its run-time value is the new size, or views replace it (NOTE [Size reads])
        ctx.patch_node(hit, (shape[axis],), {}, op="call_function", target=original_size)


_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


def _getattr_forward(ctx):
    attribute = ctx.node.args[1]
    source = ctx.node.args[0]
    if isinstance(source, torch.fx.Node) and source.meta.get("type") in (torch.finfo, torch.iinfo):
        return None, None  # torch.finfo(dtype).min: a number, no channel
    if attribute not in _ATTRIBUTES:
        raise MissingRuleError(
            f"fxmin has no rule for {describe_node(ctx.node, ctx.root)} (attribute '{attribute}'); "
            f"known tensor attributes: {sorted(_ATTRIBUTES)}. Pass barriers=['{ctx.node.name}'] to keep "
            "every channel around it.", node_name=ctx.node.name)
    return None, None


rule("size", doc=(
         'A size of a tracked axis, through integer arithmetic (`C // n_head`, `H % ws`), that scales '
         'tensors (`q.size(-1) ** -0.5`) is replaced by its original value, which is what the reference'
         ' uses; one that shapes a channel axis of a view follows coupled channels or is replaced there '
         'by the kept count (NOTE [Size reads]).',
         '—',
         'A size that shapes anything else (a view\'s batch axis, `arange`, `expand`), or that both '
         'scales and follows coupled channels, pins its axis: every channel kept.',
         ),
     methods=("size", "dim"), backward=_size_backward, plan=_size_plan, heads_aware=True,
     backward_untracked=True, macs=no_cost)(_size_forward)
rule("getattr", doc=(
         '`.shape`, `.dtype`, `.device`, `.ndim`... read no channel.',
         '—',
         'Reading the size of the tracked axis pins it; an unknown attribute is a `MissingRuleError`.',
         ),
     functions=(builtins.getattr,), backward=_size_backward, plan=_size_plan, backward_untracked=True,
     heads_aware=True, macs=no_cost)(_getattr_forward)


def _guard_forward(ctx):
    """Exact: comparisons and asserts (the guards ``concrete_args`` leaves, ``flag_1 == True``)
    compute no channel; on tensors the result is opaque and every input channel is kept."""
    return opaque_forward(ctx)


rule("guard", doc=(
         'Comparisons and asserts (guards left by `concrete_args`) compute no channel.',
         '—',
         'On tensors the result is opaque: every input channel kept.',
         ),
     functions=(operator.eq, operator.ne, torch._assert), backward=opaque_backward)(_guard_forward)


def _number_forward(ctx):
    """Exact: ``math`` functions of numbers (``math.sqrt(k.size(-1))``) compute no channel; the sizes
    they read follow NOTE [Size reads]."""
    return None, None


rule("number", doc=(
         '`math` functions of numbers (`math.sqrt(k.size(-1))`) compute no channel.',
         '—',
         '— (the sizes they read follow NOTE [Size reads]).',
         ),
     functions=(math.sqrt, math.pow, math.floor, math.ceil, math.log, math.exp))(_number_forward)
