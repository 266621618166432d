"""Shape propagation (fxmin.trace.propagate_shapes) records for every node the shape, dtype and strides a
real run of the graph gives, also where it computes no product (NOTE [Products computed for their shape
alone] in fxmin/shape_only.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import fxmin.trace  # noqa: F401 (the module, not the function fxmin.trace exports)
from fxmin import shape_only
from fxmin.shape_only import values_needed
from fxmin.zoo import MODELS

shapes = sys.modules["fxmin.trace"]


class _Recorded(torch.fx.Interpreter):
    """An independent record: every node run for real."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen = {}

    def run_node(self, node):
        value = super().run_node(node)
        if isinstance(value, torch.Tensor):
            self.seen[node.name] = (tuple(value.shape), value.dtype, value.stride())
        return value


class _HeadAlsoRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 6)

    def forward(self, x):
        logits = self.head(torch.relu(self.body(x)))
        return logits, torch.nonzero(logits > 0)  # a data-dependent op reads the head: it runs for real


class _FunctionalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))

    def forward(self, x):
        return F.linear(x, self.table)


class _IndexFromProducts(nn.Module):
    """A product's values pick rows of a table: zeros in its place would pick row 0, a real run a NaN's."""

    def __init__(self):
        super().__init__()
        self.body, self.table = nn.Linear(4, 4), nn.Embedding(10, 3)

    def forward(self, x):
        h = self.body(x)
        return self.table((h / h).long().clamp(0, 9)), self.table((h.sum(-1) / h.sum(-1)).isnan().long())


class _ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, stride=2, padding="valid", dilation=2)

    def forward(self, x):
        y = self.a(x.contiguous(memory_format=torch.channels_last))
        ones = torch.ones(4, 5, dtype=x.dtype).expand(2, 4, 4, 5)
        return self.b(y) @ ones, torch.bmm(y.flatten(2), y.flatten(2).transpose(1, 2))


def _zoo_case(name):
    factory, make_inputs = MODELS[name]
    torch.manual_seed(0)
    return factory().eval(), make_inputs()


def _cases():
    cases = [(f"zoo {name}", *_zoo_case(name)) for name in MODELS]
    return cases + [("a head another op reads", _HeadAlsoRead().eval(), (torch.randn(3, 5, 4),)),
                    ("a functional head", _FunctionalHead().eval(), (torch.randn(2, 4),)),
                    ("values that pick rows", _IndexFromProducts().eval(), (torch.randn(2, 4),)),
                    ("channels last, matmul, bmm", _ChannelsLast().eval(), (torch.randn(2, 3, 12, 12),)),
                    ("the same in float64", _ChannelsLast().double().eval(), (torch.randn(2, 3, 12, 12).double(),))]


PRODUCTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@pytest.mark.parametrize("name, model, inputs", _cases(), ids=[case[0] for case in _cases()])
def test_shapes_are_those_of_a_real_run(name, model, inputs):
    gm = fxmin.trace(model)
    products = [m for m in gm.modules() if isinstance(m, PRODUCTS)]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in products]
    shapes.propagate_shapes(gm, inputs)
    for hook in hooks:
        hook.remove()
    if name == "a head another op reads":
        assert len(calls) == len(products)  # nonzero reads the head: everything before it runs
    elif products and name != "values that pick rows":
        assert len(calls) < len(products), "no product was left out"
    oracle = _Recorded(gm)
    with torch.no_grad():
        oracle.run(*inputs)
    recorded = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if isinstance(n.meta.get("tensor_meta"), tuple)
                and hasattr(n.meta["tensor_meta"], "shape")}
    assert set(recorded) == set(oracle.seen)
    for node, (shape, dtype, stride) in oracle.seen.items():
        meta = recorded[node]
        assert (tuple(meta.shape), meta.dtype, tuple(meta.stride)) == (shape, dtype, stride), node


def test_only_products_no_op_reads_for_a_shape_are_left_out():
    gm = fxmin.trace(_HeadAlsoRead())
    assert values_needed(gm) >= {"head", "relu", "body", "gt"}
    gm = fxmin.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    assert not values_needed(gm) & {"_0", "_1", "_2"}


def test_a_returned_head_that_a_real_run_would_refuse_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(7, 3))  # the head does not fit its input
    with pytest.raises(fxmin.InputError, match="failed on the example inputs .* at node '_1'"):
        shapes.propagate_shapes(fxmin.trace(model), (torch.randn(2, 4),))


@settings(max_examples=400, deadline=None)
@given(dims=st.integers(1, 3), batch=st.integers(1, 2), groups=st.integers(1, 3), per_group=st.integers(1, 3),
       out_per_group=st.integers(1, 3), size=st.integers(1, 9), kernel=st.integers(1, 4), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), padding=st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"])),
       layout=st.sampled_from(["contiguous", "channels last", "weight channels last", "transposed"]), bias=st.booleans())
def test_a_convolution_placeholder_has_the_shape_dtype_and_strides_of_the_real_output(
        dims, batch, groups, per_group, out_per_group, size, kernel, stride, dilation, padding, layout, bias):
    x = torch.randn(batch, groups * per_group, *(size,) * dims)
    weight = torch.randn(groups * out_per_group, per_group, *(kernel,) * dims)
    channels_last = {2: torch.channels_last, 3: torch.channels_last_3d}.get(dims)
    if layout == "channels last" and channels_last is not None:
        x = x.contiguous(memory_format=channels_last)
    if layout == "weight channels last" and channels_last is not None:
        weight = weight.contiguous(memory_format=channels_last)
    if layout == "transposed":  # strided in no memory format
        x = x.transpose(-1, 0).contiguous().transpose(-1, 0)
    b = torch.randn(groups * out_per_group) if bias else None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    try:
        real = conv(x, weight, b, stride, padding, dilation, groups)
    except RuntimeError:
        real = None
    placeholder = shape_only._convolution(dims, x, weight, b, stride, padding, dilation, groups)
    if real is None:
        assert placeholder is None  # what the real op refuses, it is left to refuse
    elif placeholder is not None:
        assert (placeholder.shape, placeholder.dtype, placeholder.stride()) == (real.shape, real.dtype, real.stride())
        assert not placeholder.any()


@settings(max_examples=100, deadline=None)
@given(left=st.lists(st.integers(1, 4), min_size=1, max_size=4), right=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       inner=st.integers(1, 4), batched=st.booleans())
def test_a_matmul_placeholder_has_the_shape_of_the_real_product(left, right, inner, batched):
    a, b = torch.randn(*left, inner), torch.randn(*right[:-1], inner, right[-1])
    try:
        real = torch.bmm(a, b) if batched else a @ b
    except RuntimeError:
        real = None
    placeholder = shape_only._matmul(a, b, batched)
    if real is None:
        assert placeholder is None
    elif placeholder is not None:
        assert (placeholder.shape, placeholder.dtype, placeholder.stride()) == (real.shape, real.dtype, real.stride())


def test_shape_propagation_records_no_autograd_graph():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    grad_enabled = []
    model[1].register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    shapes.propagate_shapes(fxmin.trace(model), (torch.randn(2, 4),))
    assert grad_enabled == [False]


@pytest.mark.parametrize("name", ["llama", "gpt", "convnext"])
def test_shapes_of_an_exported_graph_are_those_of_a_real_run(name):
    """The export front end's ATen graph (NOTE [Canonical export graph]): the same op names, the same check."""
    from fxmin.trace_export import export_trace

    model, inputs = _zoo_case(name)
    gm, flat_inputs, _ = export_trace(model, inputs)
    shapes.propagate_shapes(gm, flat_inputs)
    oracle = _Recorded(gm)
    with torch.no_grad():
        oracle.run(*flat_inputs)
    nodes = {node.name: node for node in gm.graph.nodes}
    for node, (shape, dtype, stride) in oracle.seen.items():
        recorded = nodes[node].meta["tensor_meta"]
        assert (tuple(recorded.shape), recorded.dtype, tuple(recorded.stride)) == (shape, dtype, stride), node


class _ZerosWouldFail(nn.Module):
    """Value-blind ops all the way (``to`` and ``embedding``), but zeros in the product's place make 0 / 0
    an index no table has: the run with placeholders fails and shape propagation runs everything."""

    def __init__(self):
        super().__init__()
        self.body, self.table = nn.Linear(4, 4), nn.Embedding(10, 3)
        with torch.no_grad():
            self.body.weight.copy_(torch.eye(4))
            self.body.bias.fill_(1.0)

    def forward(self, x):
        h = self.body(x)
        return self.table((h / h).to(torch.long))


def test_a_run_that_zeros_break_is_run_again_computing_everything():
    model = _ZerosWouldFail().eval()
    gm = fxmin.trace(model)
    assert not values_needed(gm) & {"body"}  # nothing marks the product as needed
    calls = []
    gm.get_submodule("body").register_forward_hook(lambda *_: calls.append(1))
    shapes.propagate_shapes(gm, (torch.rand(2, 4) + 1,))
    assert calls == [1]  # computed, in the second run
    assert tuple(next(n for n in gm.graph.nodes if n.op == "output").args[0].meta["tensor_meta"].shape) == (2, 4, 3)


def test_a_pass_over_convolutions_imports_no_sympy():
    """Shape propagation asks for convolutions' layouts without torch._prims_common (whose answer imports
    sympy: seconds in a fresh process). A fresh interpreter minimizes and verifies a channels-last model."""
    code = (
        "import sys, torch, fxmin\n"
        "from torch import nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()\n"
        "x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)\n"
        "mask = (torch.arange(8) % 2 == 0).view(8, 1, 1, 1).expand(8, 3, 3, 3)\n"
        "result = fxmin.minimize(model, {'0.weight': mask}, (x,), progress=False)\n"
        "assert result.report.params_after < fxmin.count_parameters(model)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'sympy')[:3])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
