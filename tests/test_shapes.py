"""Shape propagation (fxmin.trace.propagate_shapes) records for every node the shape, dtype and strides a
real run of the graph gives, also where it computes no product (NOTE [Returned products])."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmin.trace  # noqa: F401 (the module, not the function fxmin.trace exports)
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


def _cases():
    factory, make_inputs = MODELS["gpt"]
    torch.manual_seed(0)
    return [("gpt (its head only returned)", factory().eval(), make_inputs()),
            ("a head another op reads", _HeadAlsoRead().eval(), (torch.randn(3, 5, 4),)),
            ("a functional head", _FunctionalHead().eval(), (torch.randn(2, 4),))]


@pytest.mark.parametrize("name, model, inputs", _cases(), ids=[case[0] for case in _cases()])
def test_shapes_are_those_of_a_real_run(name, model, inputs):
    gm = fxmin.trace(model)
    heads = [m for m in (getattr(model, "lm_head", None), getattr(model, "head", None)) if m is not None]
    calls = []
    hooks = [head.register_forward_hook(lambda *_: calls.append(1)) for head in heads]
    shapes.propagate_shapes(gm, inputs)
    for hook in hooks:
        hook.remove()
    assert len(calls) == (0 if name.startswith("gpt") else len(heads))  # a product only the output reads is not computed
    oracle = _Recorded(fxmin.trace(model))
    with torch.no_grad():
        oracle.run(*inputs)
    recorded = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if isinstance(n.meta.get("tensor_meta"), tuple)
                and hasattr(n.meta["tensor_meta"], "shape")}
    assert set(recorded) == set(oracle.seen)
    for node, (shape, dtype, stride) in oracle.seen.items():
        meta = recorded[node]
        assert (tuple(meta.shape), meta.dtype, tuple(meta.stride)) == (shape, dtype, stride), node


def test_a_returned_head_that_a_real_run_would_refuse_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(7, 3))  # the head does not fit its input
    with pytest.raises(fxmin.InputError, match="failed on the example inputs .* at node '_1'"):
        shapes.propagate_shapes(fxmin.trace(model), (torch.randn(2, 4),))
