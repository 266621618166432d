"""Streamed runs: a GraphModule run node by node, each layer's weights loaded and cast just for its call
(what verification and the first-divergent-node search run; an engine module)."""
from __future__ import annotations

from collections.abc import Hashable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .graph_helpers import LINEAR_FUNCTIONS
from .memory import release_freed
from .weights import Unread, call_loaded, read_unread, weights_of


# NOTE [Streamed runs]
# Verification never builds a second model: no masked copy of the reference and no float64 twin of
# either model. A :class:`StreamedRun` runs a GraphModule node by node and hands each module call
# (and each ``get_attr``) its tensors as ``load(name)`` gives them, cast to the run's dtype, just for
# that call: the reference's masked weights (NOTE [Weights on demand] in fxmin/weights.py), or the
# result's float64 build (its own tensors, with the plan's exact float64 values where it holds a
# folded constant rounded). One layer's weights exist in float64 at a time; the comparison is the
# same end-to-end comparison a float64 copy of the whole model would give.


# NOTE [Float64 convolutions on contiguous inputs]
# torch's CPU convolutions have no fast float64 kernel for an input in channels-last layout (what a block
# that permutes to channels-last and back leaves, as ConvNeXt's do): one such depthwise convolution runs
# several times slower than on the same values laid out contiguously. A streamed run hands a float64
# convolution a contiguous copy of such an input; the values and the output's shape are the same.

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = frozenset({F.conv1d, F.conv2d, F.conv3d, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                             torch.ops.aten.conv3d.default, torch.ops.aten.convolution.default})


def _contiguous_float64_input(args: tuple) -> tuple:
    """``args`` with a float64 input (the first) made contiguous (NOTE [Float64 convolutions on contiguous inputs])."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64 and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return args


class StreamedRun:
    """Calls ``module`` (a GraphModule) with every tensor it reads loaded by ``load(name)`` (default: its
    own) and cast to ``dtype`` (floating ones; None: as loaded) at the node that reads it.
    ``observe(node, value)``, if given, is called with each node's value as it is computed."""

    def __init__(self, module: torch.fx.GraphModule, load=None, dtype: torch.dtype | None = None, observe=None):
        self.module, self.load, self.dtype, self.observe = module, load or weights_of(module).load, dtype, observe

    def tensor(self, name: str) -> torch.Tensor:
        value = self.load(name)
        return value if self.dtype is None else _cast(value, self.dtype)

    def __call__(self, *inputs):
        return _Streamed(self).run(*inputs)


class _Streamed(torch.fx.Interpreter):
    def __init__(self, run: StreamedRun):
        super().__init__(run.module)
        self.stream = run

    def run_node(self, node):
        value = super().run_node(node)
        if self.stream.observe is not None:
            self.stream.observe(node, value)
        return value

    def get_attr(self, target, args, kwargs):  # NOTE [Weights read where they are used] in fxmin/weights.py
        value = super().get_attr(target, args, kwargs)
        return Unread(target, value) if isinstance(value, torch.Tensor) else value

    def call_function(self, target, args, kwargs):
        if self.stream.dtype is not None and target in LINEAR_FUNCTIONS and len(args) in (2, 3) and not kwargs \
                and isinstance(args[1], Unread) and not isinstance(args[0], Unread):
            bias = read_unread(args[2], self.stream.tensor) if len(args) == 3 else None
            return _linear_by_rows(args[0], args[1].target, bias, self.stream)
        if self.stream.dtype is not None and target is torch.ops.aten.embedding.default and isinstance(args[0], Unread):
            table, rest = self.stream.load(args[0].target), read_unread(args[1:], self.stream.tensor)
            return _cast(target(table, *rest, **kwargs), self.stream.dtype)  # the rows looked up, then cast
        args, kwargs = read_unread((args, kwargs), self.stream.tensor)
        if isinstance(target, Hashable) and target in _CONV_FUNCTIONS:
            args = _contiguous_float64_input(args)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *read_unread((args, kwargs), self.stream.tensor))

    def output(self, target, args, kwargs):
        return super().output(target, *read_unread((args, kwargs), self.stream.tensor))

    def call_module(self, target, args, kwargs):
        args, kwargs = read_unread((args, kwargs), self.stream.tensor)
        module = self.fetch_attr(target)
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        if not named:
            return module(*args, **kwargs)
        if self.stream.dtype is not None and type(module) in (nn.Linear, nn.Embedding) and len(args) == 1 \
                and not kwargs and getattr(module, "max_norm", None) is None:  # max_norm writes to the table
            return _cast_by_rows(module, target, args[0], self.stream)
        if type(module) in _CONVOLUTIONS:
            args = _contiguous_float64_input(args)
        return call_loaded(module, target, self.stream.tensor, args, kwargs)


#: rows of a weight cast to the run's dtype at a time (NOTE [Streamed runs]): a float64 copy of a whole
#: vocabulary table would be several times the largest tensor of the model
_CAST_ELEMENTS = 1 << 22


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if value.is_floating_point() else value


def _cast_by_rows(module: nn.Module, target: str, x: torch.Tensor, run: StreamedRun) -> torch.Tensor:
    """``module(x)`` (a Linear or an Embedding) in the run's dtype, its weight cast a block of rows at a time."""
    if isinstance(module, nn.Embedding):  # the rows looked up, then cast: the same values
        picked = F.embedding(x, run.load(f"{target}.weight"), module.padding_idx, module.max_norm, module.norm_type,
                             module.scale_grad_by_freq, module.sparse)
        return _cast(picked, run.dtype)
    bias = run.tensor(f"{target}.bias") if module.bias is not None else None
    return _linear_by_rows(x, f"{target}.weight", bias, run)


def _linear_by_rows(x: torch.Tensor, weight_name: str, bias: torch.Tensor | None, run: StreamedRun) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in the run's dtype, the weight ``weight_name`` cast a block of rows at a time."""
    weight = run.load(weight_name)
    step = max(1, _CAST_ELEMENTS // max(1, weight.shape[1]))
    blocks = []
    for start in range(0, max(weight.shape[0], 1), step):  # a Linear with no output: one empty block
        release_freed()  # the last block's cast (NOTE [Freed memory] in fxmin/memory.py)
        blocks.append(F.linear(x, weight[start:start + step].to(run.dtype),
                               None if bias is None else bias[start:start + step]))
    return torch.cat(blocks, dim=-1) if len(blocks) != 1 else blocks[0]
