"""Shape propagation without the products no op reads the values of: which nodes need their values, and
the zero tensor a skipped product leaves in its place.

NOTE [Products computed for their shape alone]
Shape propagation (:func:`fxmin.trace.propagate_shapes`) runs the model once to record each node's shape
and dtype; the values are thrown away. Most of that run's time goes to a few products (Linear and
convolution layers, matrix products) whose values, in most models, decide no shape: what reads them
is elementwise arithmetic, normalization, views, reductions over fixed dims, more products, or the
graph's output, and each of those gives the same shapes whatever the values. Such a product is not
computed: its place holds zeros of the shape, dtype and strides the real product has
(:func:`product_placeholder`), so everything after it still runs and records real shapes.

A product is computed when some op may read its values for a shape: :func:`values_needed` walks the
graph from the output up. An op is *value-blind* when its output's shape depends on the shapes of its
tensor inputs alone (a closed list, :data:`VALUE_BLIND`, and :data:`VALUE_BLIND_MODULES`); an op that
reads shapes only (``size``, ``dim``) needs no values at all; every other op (``nonzero``,
``masked_select``, ``item``, indexing with a tensor, a user's own function or module) needs the values
of everything it reads, and so do the inputs of what it reads. A product whose inputs or settings are
anything but the plain case (another dtype, autocast on, a layout other than contiguous or channels
last, a shape the real op would refuse) is computed, so that the real op decides and raises. If the
run with placeholders fails anyway (a zero where a real run has none, divided), shape propagation
runs again computing everything.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Hashable

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from .compensated.layer_norm import CompensatedLayerNorm
from .graph_helpers import LINEAR_FUNCTIONS

#: ops whose output shape follows from their inputs' shapes and their non-tensor arguments, by name
#: (a method's name, a torch function's or an ATen op's name)
VALUE_BLIND = frozenset({
    # elementwise
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos",
    "tanh", "sigmoid", "relu", "gelu", "silu", "softplus", "elu", "leaky_relu", "hardswish", "hardsigmoid",
    "hardtanh", "relu6", "mish", "erf", "clamp", "clamp_min", "clamp_max", "clip", "reciprocal", "square",
    "maximum", "minimum", "masked_fill", "type_as", "to", "float", "half", "double", "bfloat16", "contiguous",
    "clone", "detach", "dropout", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "iadd", "imul",
    # normalization, attention, products
    "softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm", "rms_norm", "linear", "conv1d",
    "conv2d", "conv3d", "matmul", "bmm", "mm", "scaled_dot_product_attention",
    # views and layout
    "view", "reshape", "permute", "transpose", "t", "flatten", "unflatten", "unsqueeze", "squeeze", "expand",
    "expand_as", "view_as", "reshape_as", "narrow", "split", "chunk", "unbind", "cat", "concat", "stack",
    "flip", "roll", "tril", "triu", "pad", "repeat", "slice", "select", "index_select", "gather", "_to_copy",
    # reductions over given dims, pooling
    "mean", "sum", "amax", "amin", "var", "std", "cumsum", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d", "embedding",
})

#: ops that read their inputs' shapes, never their values
SHAPE_READERS = frozenset({"size", "dim", "numel", "sym_size", "sym_numel"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})

#: modules whose output shape follows from their input's shape (these classes, not their subclasses)
VALUE_BLIND_MODULES = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d,
    nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Dropout, nn.Identity,
    nn.Flatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d,
    nn.MaxPool2d, nn.Embedding, CompensatedLayerNorm,
})

_CONVOLUTIONS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.ops.aten.conv1d.default: 1,
                   torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3}
_MATMULS = (operator.matmul, torch.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)


def op_name(node: torch.fx.Node) -> str | None:
    """The name :data:`VALUE_BLIND` and :data:`SHAPE_READERS` know ``node``'s op by, or None for an op of
    the user's own (a function outside torch, a module)."""
    target = node.target
    if node.op == "call_method":
        return target
    if node.op != "call_function":
        return None
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if target is getattr:
        return "size" if len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES else None
    module = getattr(target, "__module__", None) or ""
    if module.startswith("torch") or module in ("_operator", "operator"):
        return getattr(target, "__name__", None)
    return None


def _reads(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """How ``node`` reads its inputs: 'shapes', 'values' (its output's shape may depend on them) or
    'blind' (only its output's values do)."""
    if node.op in ("output", "placeholder", "get_attr"):
        return "shapes"  # shape propagation records the outputs' shapes only
    if node.op == "call_module":
        return "blind" if type(gm.get_submodule(node.target)) in VALUE_BLIND_MODULES else "values"
    if node.op == "call_function" and node.target is operator.getitem:  # a tensor index selects by value
        index_nodes: list = []
        torch.fx.node.map_arg(node.args[1:], index_nodes.append)
        return "values" if index_nodes else "blind"
    name = op_name(node)
    return "shapes" if name in SHAPE_READERS else "blind" if name in VALUE_BLIND else "values"


def values_needed(gm: torch.fx.GraphModule) -> set:
    """Names of the nodes whose values some op may read for a shape (NOTE [Products computed for their
    shape alone]): read by an op that reads values, or by a value-blind op whose own values are needed."""
    needed: set = set()
    for node in reversed(gm.graph.nodes):
        reads = _reads(node, gm)
        if reads == "values" or (reads == "blind" and node.name in needed):
            needed.update(n.name for n in node.all_input_nodes)
    return needed


def product_placeholder(node: torch.fx.Node, gm: torch.fx.GraphModule, fetch: Callable[[], tuple]):
    """Zeros of the shape, dtype and strides ``node``'s product would have (a Linear, a convolution, a
    matrix product), or None: compute it (not a product, or not the plain case). ``fetch()`` gives the
    node's ``(args, kwargs)``; it is called for products only."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = type(module)
        if kind is not nn.Linear and kind not in _CONVOLUTIONS:
            return None
    elif node.op == "call_function" and isinstance(node.target, Hashable):
        target = node.target
        if target not in LINEAR_FUNCTIONS and target not in _CONV_FUNCTIONS and target not in _MATMULS:
            return None
    else:
        return None
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return None
    args, kwargs = fetch()
    if node.op == "call_module":
        if kwargs or len(args) != 1:
            return None
        if kind is nn.Linear:
            return _linear(args[0], module.weight, module.bias)
        return _convolution(_CONVOLUTIONS[kind], args[0], module.weight, module.bias, module.stride,
                            module.padding, module.dilation, module.groups)
    if target in LINEAR_FUNCTIONS:
        bound = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        return None if bound is None else _linear(*bound)
    if target in _CONV_FUNCTIONS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = _bind(args, kwargs, names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        return None if bound is None else _convolution(_CONV_FUNCTIONS[target], *bound)
    if kwargs or len(args) != 2:
        return None
    return _matmul(*args, batched=target in (torch.bmm, torch.ops.aten.bmm.default))


def _bind(args: tuple, kwargs: dict, names: tuple, defaults: dict) -> tuple | None:
    if len(args) > len(names) or any(k not in names[len(args):] for k in kwargs):
        return None
    values = dict(zip(names, args))
    values.update(kwargs)
    if any(name not in values and name not in defaults for name in names):
        return None
    return tuple(values.get(name, defaults.get(name)) for name in names)


def _plain(first, *others) -> bool:
    """Dense floating tensors of one dtype on one device (what the real op would not refuse for that); the
    weights may be on the meta device (NOTE [Weights from files] in fxmin/weights.py: not read for this)."""
    return not getattr(first, "is_meta", True) and all(
        isinstance(t, torch.Tensor) and t.layout == torch.strided and t.is_floating_point() and t.dtype == first.dtype
        and (t.device == first.device or t.is_meta) for t in (first, *others))


def _linear(x, weight, bias):
    operands = (x, weight) if bias is None else (x, weight, bias)
    if not _plain(*operands) or weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    return x.new_zeros((*x.shape[:-1], weight.shape[0]))


def _convolution(dims: int, x, weight, bias, stride, padding, dilation, groups):
    operands = (x, weight) if bias is None else (x, weight, bias)
    if not _plain(*operands) or x.dim() != dims + 2 or weight.dim() != dims + 2 or not isinstance(groups, int):
        return None
    if groups < 1 or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        return None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return None
    stride, dilation = _per_dim(stride, dims), _per_dim(dilation, dims)
    if stride is None or dilation is None or min(stride) < 1 or min(dilation) < 1:
        return None
    if padding == "same" and max(stride) == 1:
        spatial = tuple(x.shape[2:])
    else:
        padding = (0,) * dims if padding == "valid" else _per_dim(padding, dims)
        if padding is None or min(padding) < 0:
            return None
        spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                        for size, p, d, k, s in zip(x.shape[2:], padding, dilation, weight.shape[2:], stride))
    if any(size < 1 for size in spatial):
        return None  # the real op raises
    shape = (x.shape[0], weight.shape[0], *spatial)
    # the layout 2-d convolutions give their output: channels last when the input or the weight has it; a
    # 3-d one's depends on the backend torch picks, which the real op knows
    layout = torch.contiguous_format
    if _channels_last_like(x) or _channels_last_like(weight):
        if dims != 2:
            return None
        layout = torch.channels_last
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout).zero_()


def _channels_last_like(tensor: torch.Tensor) -> bool:
    """Whether a convolution reads ``tensor`` as channels last: ATen's test of its strides
    (``is_channels_last_strides_2d`` / ``_3d``, what ``Tensor.suggest_memory_format`` answers; ambiguous
    strides count as contiguous). Written out here because ``torch._prims_common.suggest_memory_format``,
    the Python one, imports sympy on first use: seconds in a fresh process."""
    order = {4: (1, 3, 2, 0), 5: (1, 4, 3, 2, 0)}.get(tensor.dim())
    shape, strides = tensor.shape, tensor.stride()
    if order is None or strides[1] == 0:
        return False
    least = 0
    for d in order:
        if shape[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * shape[d]
    return True


def _per_dim(value, dims: int) -> tuple | None:
    if isinstance(value, int):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return tuple(value) if len(value) == dims else (tuple(value) * dims if len(value) == 1 else None)
    return None


def _matmul(a, b, batched: bool):
    if not _plain(a, b) or a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        return None
    if b.dim() == 2 and not batched:
        return a.new_zeros((*a.shape[:-1], b.shape[-1]))
    if a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2] and (not batched or a.dim() == 3):
        return a.new_zeros((*a.shape[:-1], b.shape[-1]))
    return None
