"""Layers read through a dense (out, in) view of their weights: Linear, ConvNd, ``F.linear``,
``addmm`` (HF Conv1D), functional convs. Part of :mod:`fxmin.rules.kit`.

NOTE [Dense view]
Every Linear/ConvNd is analysed through a dense (out, in) view: ``nonzero[k, j]``
says output ``k`` reads input ``j`` through some nonzero tap, ``tap_sum[k, j]`` is
the sum of those taps (what a constant input contributes). Grouped convs have
zeros outside their groups. The three functions below then read the same for
all of them:

- output ``k`` is ``const(b_k + sum_j tap_sum[k, j] c_j)`` iff it reads no varying
  input, and (zero padding) no nonzero constant input: border pixels see fewer taps;
- input ``j`` is required iff a present output reads it and ``j`` is varying (or a
  nonzero constant behind zero padding, where folding is inexact);
- removed constant inputs fold into the bias: ``b += tap_sum[:, j] c_j``.
"""
from __future__ import annotations

import math
import numpy as np
import torch
from torch import nn

from ... import arrays
from ...facts import ValueFact
from ...graph_helpers import deep_copy
from ...weights import sliced
from ..api import rule


class DenseView:
    """NOTE [Dense view] of one layer, read from its weight on demand (NOTE [Weights on demand] in
    fxmin/weights.py). ``load(rows=None, cols=None)`` gives the weight (``(out, in per group, *taps)``,
    masked, in its own dtype), or only some of its rows and columns (int64 indices); ``nonzero()``, where
    it is nonzero (a bool numpy array; by default read from ``load()``). The view keeps which input each
    output reads as packed bits (one bit per output and input, the taps reduced) and reads the weight's
    values again only for the sums of the columns fed nonzero constants and for the rows and columns the
    plan keeps. A grouped conv's dense tap sums are built once (its weight is small next to them).
    ``bias``: float64 ``(out,)``, zeros when absent."""

    def __init__(self, load, bias: torch.Tensor | None, groups: int, padded: bool, channel_axis: int,
                 can_fold: bool = True, nonzero=None):
        pattern = nonzero() if nonzero is not None else arrays.nonzero(load())
        self.weight_shape = tuple(pattern.shape)
        out_channels, self.in_per_group = self.weight_shape[:2]
        self.taps = tuple(range(2, pattern.ndim))
        self.groups, self.padded, self.channel_axis, self.can_fold = groups, padded, channel_axis, can_fold
        self.out_per_group = out_channels // groups
        self.shape = (out_channels, self.in_per_group * groups)
        self.bias = bias.numpy().copy() if bias is not None else np.zeros(out_channels)
        self._load = load
        self._grouped_sums = None
        self._added = None  # (columns, their values, what they add): the last constant_output
        reads = arrays.any_tap(pattern) if self.taps else pattern
        del pattern
        if groups > 1:
            reads, self._grouped_sums = _grouped(reads, self._sums(load()).numpy(), groups, self.shape)
        self._bits = np.packbits(reads, axis=1)  # (out, ceil(in / 8)): output k reads input j
        self.row_any = self._bits.any(axis=1)
        self.col_any = self._unpacked(np.bitwise_or.reduce(self._bits, axis=0))

    def kept_weight(self, rows: np.ndarray | None, cols: np.ndarray | None) -> torch.Tensor:
        """The weight's entries in ``rows`` and ``cols`` (sorted indices; None or all of them: every one), loaded
        (masked) in its own dtype; the whole weight when nothing is left out (read-only: it may be the
        model's own tensor; :func:`new_parameter` copies it)."""
        return self._load(_unless_all(rows, self.shape[0]), _unless_all(cols, self.weight_shape[1]))

    def _unpacked(self, bits: np.ndarray) -> np.ndarray:
        return np.unpackbits(bits, count=self.shape[1]).astype(bool)

    def _sums(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.sum(dim=self.taps, dtype=torch.float64) if self.taps else weight.to(torch.float64)

    def reads(self, columns: np.ndarray) -> np.ndarray:
        """bool ``(out,)``: which outputs read one of ``columns`` (bool ``(in,)``) through a nonzero tap."""
        if columns.all():
            return self.row_any
        return (self._bits & np.packbits(columns)).any(axis=1)

    def read_by(self, rows: np.ndarray) -> np.ndarray:
        """bool ``(in,)``: which inputs one of ``rows`` (bool ``(out,)``) reads through a nonzero tap."""
        if rows.all():
            return self.col_any
        if not rows.any():
            return np.zeros(self.shape[1], bool)
        return self._unpacked(np.bitwise_or.reduce(self._bits[rows], axis=0))

    def tap_sum(self, columns: np.ndarray) -> np.ndarray:
        """float64 ``(out, len(columns))``: the sums of the taps from those inputs (``columns`` bool ``(in,)``)."""
        sums = np.zeros((self.shape[0], int(columns.sum())))  # an output that reads nothing sums to zero
        sums[self.row_any] = self._read_sums(columns)
        return sums

    def _read_sums(self, columns: np.ndarray) -> np.ndarray:
        """:meth:`tap_sum` of the outputs that read something (``row_any``)."""
        if self._grouped_sums is not None:
            return self._grouped_sums[self.row_any][:, columns]
        rows = None if self.row_any.all() else _index(self.row_any)
        return self._sums(self._load(rows, _index(columns))).numpy()

    def _product(self, columns: np.ndarray, value: np.ndarray) -> np.ndarray:
        """float64 ``(out,)``: ``tap_sum(columns) @ value[columns]``, without the zero rows."""
        out = np.zeros(self.shape[0])
        out[self.row_any] = arrays.product(self._read_sums(columns), value[columns])
        return out

    def constant_output(self, value: np.ndarray) -> np.ndarray:
        """float64 ``(out,)``: the bias plus what constant inputs ``value`` (float64 ``(in,)``) add."""
        nonzero = value != 0
        if not nonzero.any():
            return self.bias
        self._added = (nonzero, value[nonzero], self._product(nonzero, value))
        return self.bias + self._added[2]

    def added(self, columns: np.ndarray, value: np.ndarray) -> np.ndarray:
        """float64 ``(out,)``: what the constants ``value`` of the inputs ``columns`` (bool ``(in,)``) add to
        each output; the sum :meth:`constant_output` computed when those are the same inputs and values."""
        if self._added is not None and np.array_equal(self._added[0], columns) and np.array_equal(self._added[1],
                                                                                                  value[columns]):
            return self._added[2]
        return self._product(columns, value)


def _index(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.nonzero(mask)[0])


def _unless_all(kept: np.ndarray | None, size: int) -> torch.Tensor | None:
    """``kept`` (sorted indices) as int64 indices, or None when it keeps all ``size`` of them."""
    return None if kept is None or len(kept) == size else torch.from_numpy(np.asarray(kept, np.int64))


def _grouped(grouped_reads: np.ndarray, grouped_sum: np.ndarray, groups: int, shape) -> tuple:
    """``(reads, tap_sum)`` of a grouped conv as dense ``(out, in)`` matrices, zero outside the groups."""
    out_per_group, in_per_group = shape[0] // groups, shape[1] // groups
    rows = np.arange(shape[0])[:, None]
    cols = (rows // out_per_group) * in_per_group + np.arange(in_per_group)  # output k's group's inputs
    reads = np.zeros(shape, bool)
    tap_sum = np.zeros(shape)
    reads[rows, cols] = grouped_reads
    tap_sum[rows, cols] = grouped_sum
    return reads, tap_sum


def dense_view(load, bias: torch.Tensor | None, groups: int, padded: bool, channel_axis: int,
               can_fold: bool = True, nonzero=None) -> DenseView:
    """The :class:`DenseView` of a layer: ``load(rows=None, cols=None)`` gives its (masked) weight in its own
    dtype, or some rows and columns of it (:func:`whole_then_sliced` makes one from a loader of the whole
    tensor; a tensor is taken as its own); ``nonzero()`` optionally where it is nonzero (a bool numpy array),
    without a copy of its values; ``bias`` float64 (or None)."""
    if isinstance(load, torch.Tensor):
        load = whole_then_sliced(lambda tensor=load: tensor)
    return DenseView(load, bias, groups, padded, channel_axis, can_fold, nonzero)


def whole_then_sliced(fetch):
    """A :class:`DenseView` loader from ``fetch()``, which gives the whole weight: sliced after fetching."""
    return lambda rows=None, cols=None: sliced(fetch(), rows, cols)


def dense_input(ctx, view: DenseView):
    """(fact of the input on the axis the layer reads, or None if it is tracked elsewhere)."""
    x = ctx.arg(0, "input")
    fact = ctx.fact(x)
    shape = ctx.shape(x)
    if fact is None or not fact.tracked or shape is None:
        return x, None
    axis = view.channel_axis % len(shape)
    if fact.axis != axis or fact.size != view.shape[1]:
        return x, None
    return x, fact


def _depthwise(view: DenseView) -> bool:
    return view.groups > 1 and view.in_per_group == 1


def dense_output(ctx, view: DenseView):
    x, fact = dense_input(ctx, view)
    shape = ctx.shape()
    axis = view.channel_axis % len(shape)
    out_channels = view.shape[0]
    value = view.bias
    if fact is None:  # the input is tracked on another axis (or not at all): every column varies
        reads_varying = view.row_any
    else:
        inexact = fact.const & (fact.value != 0) if view.padded else np.zeros(fact.size, bool)
        reads_varying = view.reads(fact.varying_mask | inexact)
        value = view.constant_output(fact.value)
    out_fact = ValueFact.constants(axis, ~reads_varying, value)
    if fact is not None and _depthwise(view):
        units = np.repeat(ctx.units(x), view.out_per_group)  # NOTE: in/out channels of a depthwise conv couple
    else:
        units = ctx.fresh(out_channels)
    return out_fact, units


def dense_required_inputs(ctx, view: DenseView) -> None:
    x, fact = dense_input(ctx, view)
    if _is_conv(view) and not ctx.present().any():
        ctx.choose(ctx.node, _first_only(len(ctx.present())), _NO_EMPTY_CONV)
    if fact is None:
        ctx.require_all(x)
        if view.groups > 1:
            ctx.require_all(ctx.node)  # groups cannot shrink when the input cannot
        return
    present = ctx.present()
    reads = view.read_by(present)
    required = reads & fact.varying_mask
    pinned = np.zeros_like(required)
    if view.padded or not view.can_fold:
        pinned = reads & fact.const & (fact.value != 0) & ~required
    if view.groups > 1 and not _depthwise(view):
        # NOTE [Choices at the fixed point]: which channels fill a group is a choice
        grown, filled = _uniform_groups(required | pinned | ctx.present(x), present, view.groups)
        ctx.choose(ctx.node, filled, "keeps the groups of a grouped conv uniform")
        ctx.choose(x, grown & ~(required | pinned), "keeps the groups of a grouped conv uniform")
    ctx.require(x, required)
    if pinned.any():
        where = "zero-padded conv" if view.padded else "layer without a bias to fold into"
        ctx.require(x, pinned, f"nonzero constant into {where} {ctx.node.target}")
    if _is_conv(view) and not (required | pinned | ctx.present(x)).any():
        ctx.choose(x, _first_only(fact.size), _NO_EMPTY_CONV)


# NOTE [No empty convs]: torch has no zero-channel convolution (no output channel: an error; no
# input channel: a wrong output shape), unlike nn.Linear. A conv whose every input (or output)
# channel would go keeps channel 0 instead; exact, since a kept channel is computed as before. A
# choice, made once the other requirements are met (NOTE [Choices at the fixed point] in fxmin/choices.py).
_NO_EMPTY_CONV = "torch convolutions cannot have zero channels: channel 0 stays"


def _is_conv(view: DenseView) -> bool:
    return view.channel_axis != -1


def _first_only(size: int) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[:1] = True
    return mask


def _uniform_groups(inputs: np.ndarray, outputs: np.ndarray, groups: int):
    """Grow channel masks so the groups that stay keep equal numbers of inputs and of outputs.

    A group with no input and no output left goes whole (the conv gets fewer groups); every
    other group keeps as many channels as the fullest one.
    """
    inputs = inputs.reshape(groups, -1).copy()
    outputs = outputs.reshape(groups, -1).copy()
    alive = inputs.any(axis=1) | outputs.any(axis=1)
    for mask in (inputs, outputs):
        target = mask[alive].sum(axis=1).max() if alive.any() else 0
        for group in np.nonzero(alive)[0]:
            missing = target - mask[group].sum()
            if missing:
                mask[group, np.nonzero(~mask[group])[0][:missing]] = True
    return inputs.reshape(-1), outputs.reshape(-1)


def new_weights(ctx, view: DenseView, bias: torch.Tensor | None):
    """(new weight, new bias or None, folded-from labels, kept inputs, kept outputs, new groups): the
    weight's kept rows and columns loaded (masked) in its own dtype, the bias (float64 ``bias`` plus what
    folds into it) in float64. Compare ``view.weight_shape`` to see whether the weight shrank."""
    x, fact = dense_input(ctx, view)
    rows = ctx.kept()
    in_channels = view.shape[1]
    cols = ctx.kept(x) if fact is not None else np.arange(in_channels)
    delta = np.zeros(view.shape[0])
    folded_from = ()
    if fact is not None:
        fold = ctx.folded(x) & (fact.value != 0)  # a zero constant folds to nothing
        if fold.any():
            delta = view.added(fold, fact.value)
            kept = np.zeros(view.shape[0], bool)
            kept[rows] = True
            folded_from = tuple(f"{x.name}[{j}]" for j in np.nonzero(view.read_by(kept) & fold)[0])
    groups = view.groups
    if groups == 1:
        new_weight = view.kept_weight(rows, cols)
    elif _depthwise(view):
        groups = len(cols)
        new_weight = view.kept_weight(rows, None)
        new_weight = new_weight if len(cols) else new_weight[:, :0]
    else:
        weight = view.kept_weight(None, None)
        alive = np.unique(np.concatenate([cols // view.in_per_group, rows // view.out_per_group]))
        groups = len(alive)
        local = (cols.reshape(groups, -1) - (alive * view.in_per_group)[:, None]) if groups else np.zeros((0, 0), int)
        slot = {group: index for index, group in enumerate(alive)}
        if len(rows):
            new_weight = torch.stack([weight[r, torch.from_numpy(local[slot[r // view.out_per_group]])] for r in rows])
        else:
            new_weight = weight[:0, :0]
    new_bias = None
    if bias is not None or np.any(delta[rows] != 0):
        base = bias[rows] if bias is not None else torch.zeros(len(rows), dtype=torch.float64)
        new_bias = base + torch.from_numpy(delta[rows])
    return new_weight, new_bias, folded_from, cols, rows, groups


def new_parameter(value: torch.Tensor, like: torch.Tensor | None) -> nn.Parameter:
    """``value`` as a new parameter (copied when it shares storage with ``like``, the model's own)."""
    shared = like is not None and value.untyped_storage().data_ptr() == like.untyped_storage().data_ptr()
    return nn.Parameter(value.clone() if shared or value._base is not None else value,
                        requires_grad=like.requires_grad if like is not None else True)


def module_shell(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its parameters (each left ``None``), for a rule that sets every one:
    copying the weights it replaces anyway would hold them twice."""
    return deep_copy(module, {id(p): None for p in module.parameters(recurse=False)})


def dense_macs(_target, args, kwargs, out) -> tuple:
    """``Rule.macs`` of ``F.linear`` / ``torch.convNd`` calls: each output element reads
    ``weight.shape[1:]`` inputs (in per group x kernel taps); a bias adds one operation per output."""
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return out.numel() * math.prod(weight.shape[1:]), out.numel() if bias is not None else 0


def layer_rule(name: str, view, plan, *, channel_axis: int, exact: str, operand=None, input_axis=None, **targets):
    """Register a layer read through a :class:`DenseView` (``view(ctx)``, None when its weights are
    not model constants read by this node alone: then every channel around it stays).

    ``channel_axis`` is the output axis the layer writes; ``operand(ctx)`` adapts the context when
    the input is not argument 0 (``addmm``).
    """
    adapt = operand or (lambda ctx: ctx)

    def forward(ctx):
        dense = view(ctx)
        if dense is not None:
            return dense_output(adapt(ctx), dense)
        shape = ctx.shape()
        if not shape:
            return ValueFact.untracked() if shape is not None else None, None
        axis = channel_axis % len(shape)
        return ValueFact.varying(axis, shape[axis]), ctx.fresh(shape[axis])

    def backward(ctx):
        dense = view(ctx)
        if dense is not None:
            dense_required_inputs(adapt(ctx), dense)
            return
        why = f"{name} whose weights are not model constants read here alone"
        for node in ctx.input_nodes():
            ctx.require_all(node, why)
        ctx.require_all(ctx.node, why)

    forward.__doc__ = exact
    reads = input_axis if input_axis is not None else (None if operand else (lambda node, root: channel_axis))
    return rule(name, backward=backward, plan=plan, exact=exact, reads_input_presence=True, input_axis=reads,
                backward_untracked=True,
                **targets)(forward)

