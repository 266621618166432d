"""Repeated heads: grouped-query and multi-query attention, key/value heads shared by groups of
query heads (inserted axes for getitem/unsqueeze, the repeat for expand, the grouping for SDPA).
Part of :mod:`fxmin.rules.kit`.

NOTE [Grouped heads]
With ``heads`` query heads and ``groups`` key/value heads, query head ``h`` reads key/value head
``g = h // rep`` (``rep = heads // groups``). Models write it two ways, and both are followed:

- ``repeat_kv`` (Hugging Face): ``k[:, :, None].expand(B, groups, rep, T, hd).reshape(B, heads,
  T, hd)``. Indexing with ``None`` (or ``unsqueeze``) moves the channel axes; the expand makes the
  repeat axis a new digit of the channels, ``(g, r, e)``, with *fresh* units: copy ``r`` of head
  ``g`` is its own channel, so a query head can leave without taking its group along; the reshape
  merges the ``(g, r)`` digits into one head axis. The expand requires ``(g, e)`` of its source
  when any copy ``(g, r, e)`` is present; it makes every present copy keep all of its source's
  present dims and every present source head keep a copy (an expand copies whole heads), and
  keeps its digits uniform (equal copies per head, equal dims per copy, NOTE [Heads]); a copy added
  to even out the copies holds its source's dims, so the copies of one head never disagree. It
  declares its copies (``Context.copies``): a kept query head that has no q/k dim yet (it reads
  only ``const(0)`` ones) takes a dim its key head holds rather than dim 0, which would add that dim
  to the key head and to every copy of it (NOTE [Choices at the fixed point] in fxmin/choices.py).
- ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)``: the rule maps query head ``h`` to
  group ``h // rep`` itself, with the same requirements between q and k, and between v and the
  output.

What leaves: a key/value head when no query head of its group stays (its k and v projection rows
go); query heads in equal numbers per group, since the repeat count (``rep``, or ``heads // groups``
inside SDPA) is one number: every group that stays keeps as many query heads as the fullest one
(exact, it only shrinks less). A q/k dim ``e`` of group ``g`` when ``k[g, e]`` is ``const(0)`` or
``q[h, e]`` is ``const(0)`` in every kept query head of the group: the query heads of a group keep
exactly their key head's dims. The softmax scale stays ``1/sqrt(original head_dim)``. Per-head
``q_norm``/``k_norm`` (Qwen3, Gemma 3): NOTE [Per-head norms] in ``fxmin/rules/norm.py``.
"""
from __future__ import annotations

import numpy as np
import torch.fx

from ...facts import ValueFact
from .elementwise import opaque_backward, opaque_forward, tracked_fact
from .products import first_per_head
from .views import new_radix, uniform_digits


# -- inserting axes (``x[:, :, None]``, ``x.unsqueeze(2)``) -------------------------------------------------------

def _moved_axes(items, rank):
    """Output axis of each input axis under an index of full slices and None, or None."""
    full = slice(None, None, None)
    mapping, source, target = {}, 0, 0
    for item in items:
        if item is None:
            target += 1
        elif item == full:
            mapping[source] = target
            source, target = source + 1, target + 1
        else:
            return None
    for axis in range(source, rank):
        mapping[axis] = target + axis - source
    return mapping


def index_new_axes_forward(ctx):
    """Exact: ``x[:, :, None]`` (full slices and ``None``) moves the channel axes."""
    x, index = ctx.node.args
    fact, shape = tracked_fact(ctx, x), ctx.shape(x)
    items = index if isinstance(index, tuple) else (index,)
    if fact is None or shape is None or not any(item is None for item in items):
        return None
    mapping = _moved_axes(items, len(shape))
    if mapping is None:
        return None
    return fact.with_axes([mapping[a] for a in fact.axes]) if not fact.simple else fact.moved(mapping[fact.axis]), \
        ctx.units(x)


# -- expand: repeated heads ----------------------------------------------------------------------------------------

def _expand_sizes(ctx):
    node = ctx if isinstance(ctx, torch.fx.Node) else ctx.node
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    return list(rest) if rest else list(node.kwargs.get("size", ()))


def repeat_spec(ctx):
    """(source, source fact, offset, repeat axis, repeat digit position, copies) when an expand
    repeats split channels along an axis between their digits, or None."""
    x = ctx.node.args[0]
    fact, shape, out = tracked_fact(ctx, x), ctx.shape(x), ctx.shape()
    if fact is None or fact.simple or shape is None or out is None or list(fact.axes) != sorted(fact.axes):
        return None
    offset = len(out) - len(shape)
    grown = [a for a in range(len(shape)) if shape[a] != out[a + offset]]
    inside = [a for a in grown if fact.axes[0] < a < fact.axes[-1]]
    if len(inside) != 1:
        return None
    axis = inside[0]
    position = sum(1 for a in fact.axes if a < axis)
    return x, fact, offset, axis, position, out[axis + offset]


def expand_heads_forward(ctx):
    """Exact: expanding split channels along an axis between their digits (``repeat_kv``) makes
    that axis a digit: copy ``r`` of channel ``(g, e)`` is channel ``(g, r, e)``, a new unit, with
    the source's value. Expanding other axes keeps the channels (NOTE [Grouped heads])."""
    x = ctx.node.args[0]
    fact, shape, out = tracked_fact(ctx, x), ctx.shape(x), ctx.shape()
    spec = repeat_spec(ctx)
    if spec is None:
        if fact is None or shape is None or out is None:
            return opaque_forward(ctx)
        offset = len(out) - len(shape)
        if any(shape[a] != out[a + offset] and fact.axes[0] < a < fact.axes[-1] for a in range(len(shape))):
            return opaque_forward(ctx)
        return fact.with_axes([a + offset for a in fact.axes]), ctx.units(x)
    x, fact, offset, axis, position, copies = spec
    radix = fact.radix
    outer, inner = int(np.prod(radix[:position])), int(np.prod(radix[position:]))
    const = np.repeat(fact.const.reshape(outer, 1, inner), copies, axis=1).reshape(-1)
    value = np.repeat(fact.value.reshape(outer, 1, inner), copies, axis=1).reshape(-1)
    axes = [a + offset for a in fact.axes]
    axes.insert(position, axis + offset)
    sizes = list(radix)
    sizes.insert(position, copies)
    units = ctx.fresh(fact.size * copies)
    ctx.copies(units, np.repeat(ctx.units(x).reshape(outer, 1, inner), copies, axis=1).reshape(-1))
    return ValueFact(axes[0], fact.size * copies, const, value, tuple(zip(axes[1:], sizes[1:]))), units


def expand_heads_backward(ctx):
    spec = repeat_spec(ctx)
    if spec is None:
        fact = tracked_fact(ctx, ctx.node)
        if fact is None:
            opaque_backward(ctx)
        elif not _literal_digits(ctx, fact):
            ctx.require_all(ctx.node, "a size computed at run time shapes it")
        return
    x, fact, offset, axis, position, copies = spec
    out = tracked_fact(ctx, ctx.node)
    if not _literal_digits(ctx, out):
        ctx.require_all(ctx.node, "a size computed at run time shapes it")
        ctx.require_all(x)
        return
    radix = fact.radix
    outer, inner = int(np.prod(radix[:position])), int(np.prod(radix[position:]))
    grid = ctx.present().reshape(outer, copies, inner)
    ctx.require(x, grid.any(axis=1).reshape(-1), "read by a kept copy of a repeated head")
    source = ctx.present(x).reshape(outer, inner)
    copy_alive = grid.any(axis=2)  # (outer, copies)
    ctx.require(ctx.node, (copy_alive[:, :, None] & source[:, None, :]).reshape(-1),
                "a copy of a head keeps its source's dims")
    # the choices (NOTE [Choices at the fixed point]): a kept source head is copied whole, so one copy
    # at least; then as many copies per head and dims per copy as the fullest
    first = np.zeros((outer, copies, inner), bool)
    first[:, 0] = source & ~copy_alive.any(axis=1, keepdims=True)
    ctx.choose(ctx.node, first.reshape(-1), "a kept head is copied: one copy at least")
    ctx.choose(ctx.node, _even_copies(ctx.present().reshape(outer, copies, inner), source),
               "keeps repeated heads uniform")
    ctx.choose(ctx.node, uniform_digits(ctx.present(), out.radix), "keeps repeated heads uniform")


def _even_copies(grid: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Every kept head of ``grid`` (head, copy, dim) grown to as many copies as the fullest, each new
    copy holding its source's dims ``source`` (head, dim): copies of one head then hold the same dims,
    so evening out their dims later adds the same ones to each (added at dim 0, copies would disagree
    and their source would keep the union, up to every dim)."""
    grid = grid.copy()
    alive = grid.any(axis=2)
    target = int(alive.sum(axis=1).max()) if alive.size else 0
    for head in np.nonzero(alive.any(axis=1))[0]:
        for copy in np.nonzero(~alive[head])[0][: target - int(alive[head].sum())]:
            grid[head, copy] = source[head]
    return grid.reshape(-1)


def _literal_digits(ctx, fact) -> bool:
    """Whether the expand writes every size at the channel axes as a literal or as a number read in
    the graph (HF's ``repeat_kv`` reads ``num_key_value_heads, head_dim`` from ``x.shape``): the plan
    writes the kept count at each of them (NOTE [Computed sizes] in views.py)."""
    sizes = _expand_sizes(ctx)
    return len(sizes) == len(ctx.shape()) and all(
        isinstance(sizes[a], int) or _is_number(sizes[a]) for a in fact.axes)


def _is_number(value) -> bool:
    return isinstance(value, torch.fx.Node) and value.meta.get("type") is int and value.meta.get("tensor_meta") is None


def repeat_size_use(ctx, expand, numbers) -> str:
    """How an expand uses the numbers ``numbers`` (a size read and what is computed from it), as
    NOTE [Size reads] in sizes.py classifies uses: "patched" when they only size channel axes of a
    repeat of heads (its plan writes the kept counts there), else "other"."""
    fact = tracked_fact(ctx, expand)
    sizes = _expand_sizes(expand)
    positions = [i for i, size in enumerate(sizes) if isinstance(size, torch.fx.Node) and size in numbers]
    if fact is None or fact.simple or not positions or not all(i in fact.axes for i in positions):
        return "other"
    return "patched"


def expand_heads_plan(ctx):
    fact = tracked_fact(ctx, ctx.node)
    kept = ctx.kept()
    if fact is None or len(kept) == fact.size:
        return
    sizes = _expand_sizes(ctx)
    for axis, size in zip(fact.axes, new_radix(kept, fact.radix)):
        if sizes[axis] != -1:
            sizes[axis] = int(size)
    as_list = isinstance(ctx.node.args[1], (list, tuple)) and len(ctx.node.args) == 2  # aten.expand(x, [sizes])
    ctx.patch((ctx.node.args[0], list(sizes)) if as_list else (ctx.node.args[0], *sizes), {})


# -- SDPA with enable_gqa (the attention rule reads the inputs) -------------------------------------------------------

def grouped_sdpa_forward(ctx, inputs):
    """Exact: see NOTE [Grouped heads]; output head ``h`` holds value head ``h // rep``, so a
    constant value channel gives constant output channels in its group when no dropout is applied.
    ``inputs``: (q, k, v, their facts, rep) as the attention rule reads them, or None."""
    if inputs is None:
        return opaque_forward(ctx)
    q, k, v, fq, fk, fv, rep = inputs
    dropout = ctx.arg(4, "dropout_p", 0.0)
    const = fv.const if dropout == 0 else fv.const & (fv.value == 0)
    groups, dims = fv.radix
    const = np.repeat(const.reshape(groups, 1, dims), rep, axis=1).reshape(-1)
    value = np.repeat(np.where(fv.const, fv.value, 0.0).reshape(groups, 1, dims), rep, axis=1).reshape(-1)
    out = ValueFact(fq.axis, groups * rep * dims, const, np.where(const, value, 0.0), ((fv.axes[1], dims),))
    return out, ctx.fresh(out.size)


def _grow_groups(alive: np.ndarray, groups_alive: np.ndarray, rep: int) -> np.ndarray:
    """Alive query heads grown so that every alive group keeps as many as the fullest one."""
    grid = alive.reshape(-1, rep).copy()
    groups_alive = groups_alive | grid.any(axis=1)
    target = max(int(grid.sum(axis=1).max()), 1)
    for group in np.nonzero(groups_alive)[0]:
        for head in np.nonzero(~grid[group])[0][: target - int(grid[group].sum())]:
            grid[group, head] = True
    return grid.reshape(-1)


def grouped_sdpa_backward(ctx, inputs):
    if inputs is None:
        opaque_backward(ctx)
        return
    q, k, v, fq, fk, fv, rep = inputs
    heads, qk_dims = fq.radix
    groups, v_dims = fv.radix
    out_grid = ctx.present().reshape(heads, v_dims)
    alive = out_grid.any(axis=1) | ctx.present(q).reshape(heads, qk_dims).any(axis=1)
    groups_alive = ctx.present(k).reshape(groups, qk_dims).any(axis=1) | ctx.present(v).reshape(groups, v_dims).any(axis=1)
    group_alive = alive.reshape(groups, rep).any(axis=1) | groups_alive
    # q.k: a key dim stays when a kept query head of its group reads it; its query heads keep exactly its dims
    zero_q = (fq.const & (fq.value == 0)).reshape(groups, rep, qk_dims)
    zero_k = (fk.const & (fk.value == 0)).reshape(groups, qk_dims)
    reads = (~zero_q & alive.reshape(groups, rep, 1)).any(axis=1) & ~zero_k & group_alive[:, None]
    reads |= (ctx.present(q).reshape(groups, rep, qk_dims) & alive.reshape(groups, rep, 1)).any(axis=1)
    ctx.require(k, reads.reshape(-1), "read by a kept query head of its group (q.k)")
    # the choices (NOTE [Choices at the fixed point]): a dim of a kept key or value head, and query
    # heads added to a group so that every kept group has as many as the fullest (each new one holding
    # its key head's dims, as every query head of the group)
    ctx.choose(k, first_per_head(group_alive, ctx.present(k), qk_dims), "a kept key head keeps a q/k dim")
    k_grid = ctx.present(k).reshape(groups, qk_dims)
    ctx.require(q, (alive.reshape(groups, rep, 1) & k_grid[:, None, :]).reshape(-1),
                "a kept query head keeps its key head's dims")
    added = _grow_groups(alive, groups_alive, rep) & ~alive
    ctx.choose(q, (added.reshape(groups, rep, 1) & k_grid[:, None, :]).reshape(-1),
               "as many query heads in every kept group as in the fullest")
    # values: a value dim stays when a kept output channel of its group reads it; kept heads output all of it
    ctx.require(v, (out_grid.reshape(groups, rep, v_dims) & alive.reshape(groups, rep, 1)).any(axis=1).reshape(-1),
                "read by a kept output channel of its group")
    ctx.choose(v, first_per_head(group_alive, ctx.present(v), v_dims), "a kept value head keeps a value dim")
    v_grid = ctx.present(v).reshape(groups, v_dims)
    ctx.require(ctx.node, (alive.reshape(groups, rep, 1) & v_grid[:, None, :]).reshape(-1),
                "a kept query head outputs its value head's dims")
    mask = ctx.arg(3, "attn_mask")
    if mask is not None:
        ctx.require_all(mask)
