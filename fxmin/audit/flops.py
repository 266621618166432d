"""``flops``: multiply-accumulates per node of an FX graph, for "ideal speed-up = MACs before / after".

NOTE [What is counted]
``macs`` counts the multiply-accumulates of the dense products, the work that shrinks with the
channels fxmin removes: Linear and ``F.linear`` (``out.numel() * in_features``), ConvNd and
``F.convNd`` including groups (``out.numel() * in_channels / groups * prod(kernel)``), ``matmul`` /
``@`` / ``addmm`` (``out.numel() * K``) and ``F.scaled_dot_product_attention`` (``B * L * S * (E +
Ev)``, counted dense even when causal: the ideal ratio compares like with like). ``other`` counts
the cheap extras, roughly one operation per output element: pointwise arithmetic and activations
one, BatchNorm two (scale and shift), LayerNorm / GroupNorm / RMSNorm four (mean, variance,
normalize, affine), softmax three, pooling and reductions one per input element, a bias one per
output element. Shape ops, indexing, copies, casts, dropout and embedding lookups cost nothing.

Each count lives on the rule of its op (``Rule.macs``; the shared counters are in
``fxmin.rules.kit.costs``): this module only walks the graph. A node whose rule has no counter, or
that has no rule (a custom leaf module, ``einsum``, ``bmm``, a transposed convolution), is run under
``torch.utils.flop_counter.FlopCounterMode``, whose FLOPs / 2 become its MACs, plus one ``other``
per output element: nothing is silently counted as free.

>>> import torch, fxmin
>>> net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
>>> fxmin.flops(net, (torch.randn(3, 10),)).macs   # 3*20*10 + 3*5*20
900
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import InputError
from ..graph_helpers import count_elements
from ..trace import trace

__all__ = ["FlopReport", "NodeFlops", "flops", "mac_costs"]


@dataclass(frozen=True)
class NodeFlops:
    """One node: its name, what it calls, its multiply-accumulates and its cheap extras."""

    name: str
    target: str
    macs: int
    other: int


@dataclass(frozen=True)
class FlopReport:
    """Per-node counts in graph order. ``macs``: the dense products; ``other``: elementwise extras.

    ``before.speedup(after)`` is the ideal speed-up ``before.macs / after.macs``.
    """

    nodes: tuple

    def __post_init__(self):
        if any(n.macs < 0 or n.other < 0 for n in self.nodes):
            raise ValueError("negative operation count")

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    @property
    def other(self) -> int:
        return sum(n.other for n in self.nodes)

    @property
    def total(self) -> int:
        return self.macs + self.other

    def speedup(self, after: "FlopReport") -> float:
        """Ideal speed-up from ``self`` (before) to ``after``: the ratio of multiply-accumulates."""
        return self.macs / max(after.macs, 1)

    def by_target(self) -> dict:
        """``{target: macs}`` summed over the nodes that call it."""
        totals: dict = {}
        for n in self.nodes:
            totals[n.target] = totals.get(n.target, 0) + n.macs
        return totals

    def table(self, tablefmt: str = "simple", top: int | None = None) -> str:
        rows = sorted(self.nodes, key=lambda n: -n.macs)[:top] if top else self.nodes
        body = tabulate([(n.name, n.target, f"{n.macs:,}", f"{n.other:,}") for n in rows],
                        headers=["node", "calls", "MACs", "other ops"], tablefmt=tablefmt, disable_numparse=True)
        return body + f"\ntotal: {self.macs:,} MACs, {self.other:,} other operations"

    def __str__(self) -> str:
        return self.table(top=20)


def _describe(node: torch.fx.Node, module) -> str:
    if node.op == "call_module":
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


class _Counter(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule):
        from .. import REGISTRY  # the public registry, filled once fxmin is imported

        super().__init__(module)
        self.registry = REGISTRY
        self.counts: list = []

    def run_node(self, node):
        if node.op in ("placeholder", "output", "get_attr"):
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        module = self.fetch_attr(node.target) if node.op == "call_module" else None
        rule = self.registry.lookup(node, self.module)
        if rule is not None and rule.macs is not None:  # NOTE [What is counted]
            out = getattr(self, node.op)(node.target, args, kwargs)
            macs, other = rule.macs(module if module is not None else node.target, args, kwargs, out)
        else:
            with FlopCounterMode(display=False) as mode:
                out = getattr(self, node.op)(node.target, args, kwargs)
            macs, other = mode.get_total_flops() // 2, count_elements(out)
        self.counts.append(NodeFlops(node.name, _describe(node, module), int(macs), int(other)))
        return out


def _count(module: nn.Module, example_inputs, **trace_options) -> tuple:
    """``module`` traced (a GraphModule as it is) and run once on ``example_inputs``: (graph module, counts).

    The run is in eval mode, without gradients, and every submodule's mode is restored afterwards: the
    traced graph shares the user's submodules, and a training-mode BatchNorm would otherwise update
    their running statistics (counting must not change the model it counts).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    graph_module = trace(module, **trace_options)
    counter = _Counter(graph_module)
    modes = [(m, m.training) for m in graph_module.modules()]
    graph_module.eval()
    try:
        with torch.no_grad():
            counter.run(*example_inputs)
    finally:
        for m, training in modes:
            m.training = training
    return graph_module, counter.counts


def flops(module: nn.Module, example_inputs, **trace_options) -> FlopReport:
    """Count the multiply-accumulates of ``module`` on ``example_inputs``, node by node.

    ``module`` is traced with :func:`fxmin.trace` (a GraphModule, such as ``minimize(...).module``,
    is used as it is) and run once without gradients in eval mode; the model is left as it was (its
    modes, its BatchNorm statistics). ``trace_options`` (``tracer``, ``leaf_modules``,
    ``concrete_args``) go to :func:`fxmin.trace` for a model that needs them. See NOTE [What is counted].

    >>> import torch, fxmin
    >>> conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
    >>> fxmin.flops(conv, torch.randn(1, 8, 8, 8)).macs   # 512 outputs x (8/4 x 3x3)
    9216
    """
    return FlopReport(tuple(_count(module, example_inputs, **trace_options)[1]))


def _weight_of(node: torch.fx.Node, graph_module: torch.fx.GraphModule, parameters: dict):
    """The name of the weight whose entries a MAC node multiplies, or None.

    A Linear / Conv module call (its ``weight``) or a function whose second argument is a parameter read
    by ``get_attr`` (``F.linear(x, w)``, ``F.conv2d(x, w)``). Other products (``x @ w.t()``, attention)
    multiply activations or derived tensors, not a parameter's entries one for one: no weight.
    """
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return f"{node.target}.weight"
        return None
    if node.op == "call_function" and node.target in (F.linear, F.conv1d, F.conv2d, F.conv3d):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target in parameters:
            return weight.target
    return None


def mac_costs(module: nn.Module, example_inputs, *, power: float = 1.0, **trace_options) -> dict:
    """Multiply-accumulates per entry of each weight on ``example_inputs``, relative to the mean: ``{name: cost}``.

    An entry of a Linear weight is used once per input row, an entry of a convolution weight once per
    output position: the cost of a weight is its node's MACs (:func:`flops`) divided by its number of
    entries, so a 7x7 depthwise kernel at 14x14 resolution costs 196 where the same kernel at 1x1 costs
    1. The costs are raised to ``power`` (0: all alike, 1: MACs as they are, 0.5 in between) and divided
    by their mean over all entries of the weights listed, so the batch size of ``example_inputs`` does not
    matter and a cost of 1 is the average. A weight used by several nodes costs their sum.

    Only the weights of Linear / Conv modules and of ``F.linear`` / ``F.convNd`` calls on a parameter are
    listed; anything else (biases, norm affine, a weight used through ``matmul``) has no entry: treat it
    as 1. :class:`fxmin.MacScaled` (a pruning criterion) and ``group_lasso(costs=...)`` use them.
    ``trace_options`` go to :func:`fxmin.trace`, as for :func:`flops`.

    >>> import torch, fxmin
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(32, 4))
    >>> {k: round(v, 3) for k, v in fxmin.mac_costs(net, torch.randn(1, 1, 4, 4)).items()}   # 16 positions vs 1
    {'0.weight': 5.615, '2.weight': 0.351}
    """
    if power < 0:
        raise InputError(f"mac_costs: power must be at least 0, got {power}")
    graph_module, counts = _count(module, example_inputs, **trace_options)
    parameters = dict(graph_module.named_parameters())
    macs = {n.name: n.macs for n in counts}
    totals: dict = {}
    for node in graph_module.graph.nodes:
        name = _weight_of(node, graph_module, parameters)
        if name is not None and name in parameters and parameters[name].numel():
            totals[name] = totals.get(name, 0) + macs.get(node.name, 0)
    costs = {name: (total / parameters[name].numel()) ** power for name, total in totals.items()}
    entries = sum(parameters[name].numel() for name in costs)
    mean = sum(cost * parameters[name].numel() for name, cost in costs.items()) / max(entries, 1)
    return {name: cost / mean for name, cost in costs.items()} if mean > 0 else {name: 1.0 for name in costs}
