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

import copy
import math
import numpy as np
import torch
from torch import nn

from ...facts import ValueFact
from ..api import rule


class DenseView:
    """NOTE [Dense view] of one layer, read from its weight on demand: ``load()`` gives the weight
    (``(out, in per group, *taps)``, masked, in its own dtype), read again for each question (NOTE
    [Weights on demand] in fxmin/weights.py: the view holds vectors, never a matrix of the size of the
    weight). A grouped conv's dense view is built once (its weight is small next to it).
    ``bias``: float64 ``(out,)``, zeros when absent."""

    def __init__(self, load, bias: torch.Tensor | None, groups: int, padded: bool, channel_axis: int,
                 can_fold: bool = True):
        weight = load()
        out_channels, self.in_per_group = weight.shape[:2]
        self.taps = tuple(range(2, weight.dim()))
        self.groups, self.padded, self.channel_axis, self.can_fold = groups, padded, channel_axis, can_fold
        self.out_per_group = out_channels // groups
        self.shape = (out_channels, self.in_per_group * groups)
        self.bias = bias.numpy().copy() if bias is not None else np.zeros(out_channels)
        self._load = load
        self._dense = None
        nonzero = self._nonzero(weight)
        if groups > 1:
            self._dense = _grouped(nonzero.numpy(), self._sums(weight).numpy(), groups, self.shape)
            self.row_any, self.col_any = self._dense[0].any(axis=1), self._dense[0].any(axis=0)
        else:
            self.row_any, self.col_any = nonzero.any(dim=1).numpy(), nonzero.any(dim=0).numpy()

    def _nonzero(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight != 0).any(dim=self.taps) if self.taps else weight != 0

    def _sums(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.to(torch.float64)
        return weight.sum(dim=self.taps) if self.taps else weight

    def reads(self, columns: np.ndarray) -> np.ndarray:
        """bool ``(out,)``: which outputs read one of ``columns`` (bool ``(in,)``) through a nonzero tap."""
        if columns.all():
            return self.row_any
        if not columns.any():
            return np.zeros(self.shape[0], bool)
        if self._dense is not None:
            return self._dense[0][:, columns].any(axis=1)
        return self._nonzero(self._load().index_select(1, _index(columns))).any(dim=1).numpy()

    def read_by(self, rows: np.ndarray) -> np.ndarray:
        """bool ``(in,)``: which inputs one of ``rows`` (bool ``(out,)``) reads through a nonzero tap."""
        if rows.all():
            return self.col_any
        if not rows.any():
            return np.zeros(self.shape[1], bool)
        if self._dense is not None:
            return self._dense[0][rows].any(axis=0)
        return self._nonzero(self._load().index_select(0, _index(rows))).any(dim=0).numpy()

    def tap_sum(self, columns: np.ndarray) -> np.ndarray:
        """float64 ``(out, len(columns))``: the sums of the taps from those inputs (``columns`` bool ``(in,)``)."""
        if self._dense is not None:
            return self._dense[1][:, columns]
        return self._sums(self._load().index_select(1, _index(columns))).numpy()


def _index(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.nonzero(mask)[0])


def _grouped(grouped_nonzero: np.ndarray, grouped_sum: np.ndarray, groups: int, shape) -> tuple:
    """``(nonzero, tap_sum)`` of a grouped conv as dense ``(out, in)`` matrices, zero outside the groups."""
    out_per_group, in_per_group = shape[0] // groups, shape[1] // groups
    nonzero = np.zeros(shape, bool)
    tap_sum = np.zeros(shape)
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        cols = slice(group * in_per_group, (group + 1) * in_per_group)
        nonzero[rows, cols] = grouped_nonzero[rows]
        tap_sum[rows, cols] = grouped_sum[rows]
    return nonzero, tap_sum


def dense_view(load, bias: torch.Tensor | None, groups: int, padded: bool, channel_axis: int,
               can_fold: bool = True) -> DenseView:
    """The :class:`DenseView` of a layer whose (masked) weight ``load()`` gives in its own dtype (a
    tensor is taken as its own loader), with float64 ``bias`` (or None)."""
    return DenseView(load if callable(load) else (lambda: load), bias, groups, padded, channel_axis, can_fold)


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
        if np.any(fact.value != 0):
            value = view.bias + view.tap_sum(np.ones(fact.size, bool)) @ fact.value
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


def new_weights(ctx, view: DenseView, weight: torch.Tensor, bias: torch.Tensor | None):
    """(new weight, new bias or None, folded-from labels, kept inputs, kept outputs, new groups): the weight
    sliced in its own dtype, the bias (float64 ``bias`` plus what folds into it) in float64."""
    x, fact = dense_input(ctx, view)
    rows = ctx.kept()
    in_channels = view.shape[1]
    cols = ctx.kept(x) if fact is not None else np.arange(in_channels)
    delta = np.zeros(view.shape[0])
    folded_from = ()
    if fact is not None:
        fold = ctx.folded(x)
        if fold.any():
            tap_sum = view.tap_sum(fold)
            delta = tap_sum @ fact.value[fold]
            contributes = fold.copy()
            contributes[fold] = (tap_sum[rows] * fact.value[fold] != 0).any(axis=0)
            folded_from = tuple(f"{x.name}[{j}]" for j in np.nonzero(contributes)[0])
    groups = view.groups
    if groups == 1:
        new_weight = _rows_and_columns(weight, rows, cols)
    elif _depthwise(view):
        groups = len(cols)
        new_weight = weight[rows] if len(cols) else weight[rows][:, :0]
    else:
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


def _rows_and_columns(weight: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """``weight[rows][:, cols]``, gathering only along the axes that lose entries (``weight`` itself when none does)."""
    all_rows, all_cols = len(rows) == weight.shape[0], len(cols) == weight.shape[1]  # kept indices are sorted
    if all_rows and all_cols:
        return weight  # read-only: new_parameter copies it if it is installed
    if not all_rows:
        weight = weight.index_select(0, torch.from_numpy(np.asarray(rows, np.int64)))
    return weight if all_cols else weight.index_select(1, torch.from_numpy(np.asarray(cols, np.int64)))


def new_parameter(value: torch.Tensor, like: torch.Tensor | None) -> nn.Parameter:
    """``value`` as a new parameter (copied when it shares storage with ``like``, the model's own)."""
    shared = like is not None and value.untyped_storage().data_ptr() == like.untyped_storage().data_ptr()
    return nn.Parameter(value.clone() if shared or value._base is not None else value,
                        requires_grad=like.requires_grad if like is not None else True)


def module_shell(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its parameters (each left ``None``), for a rule that sets every one:
    copying the weights it replaces anyway would hold them twice."""
    return copy.deepcopy(module, {id(p): None for p in module.parameters(recurse=False)})


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

