"""The rule registry: all per-op knowledge is registered here, keyed by real FX targets.

A :class:`Rule` bundles three small functions for one op family:

- ``forward(ctx) -> (ValueFact | None, units | None)``: the output's value facts and
  the *units* of its tracked axis (fresh ones, or its inputs' units when channels
  pass through; ``ctx.unify`` couples axes that must keep the same index set).
- ``backward(ctx)``: given which output channels are present, call
  ``ctx.require(input_node, mask)`` for the input channels that must stay.
- ``plan(ctx)``: given the kept channels, record the edits (new modules, folded
  constants, patched arguments).

Targets are matched as FX records them: module types through their MRO (only
when the subclass does not override ``forward``), callables by identity, and
method names for ``call_method`` nodes.

>>> from fxmin.rules import REGISTRY
>>> import torch
>>> REGISTRY.lookup_module(torch.nn.ReLU()).name
'pointwise'
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable


@dataclass(frozen=True)
class Rule:
    """How one family of ops transforms facts. ``exact`` says when the rule is exact."""

    name: str
    forward: Callable
    backward: Callable | None = None
    plan: Callable | None = None
    exact: str = ""
    #: backward reads the presence of its inputs too (e.g. grouped convs keep groups uniform)
    reads_input_presence: bool = False
    #: plan replaces the module's parameters; a module called from several nodes is then a barrier
    edits_module: bool = False
    #: understands channel axes split over several tensor axes (attention heads, NOTE [Heads]);
    #: other rules see such inputs as opaque and keep all of them
    heads_aware: bool = False
    #: ``input_axis(node, root)``: the axis of argument 0 the op reads as channels (-1 for a Linear,
    #: 1 for a conv), or None; it decides which axis of a model input is tracked (NOTE [Input axis])
    input_axis: Callable | None = None
    #: channels of argument 0 pass through unchanged (activations, dropout, elementwise ops)
    passes_axis: bool = False


@dataclass
class Registry:
    modules: dict = field(default_factory=dict)
    functions: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)

    def register(self, rule: Rule, *, modules: Iterable[type] = (), functions: Iterable = (), methods: Iterable[str] = ()):
        for module_type in modules:
            self.modules[module_type] = rule
        for function in functions:
            self.functions[function] = rule
        for method in methods:
            self.methods[method] = rule
        return rule

    def lookup_module(self, module) -> Rule | None:
        module_type = type(module)
        for base in module_type.__mro__:
            rule = self.modules.get(base)
            if rule is None:
                continue
            # NOTE [Subclass forward]: a subclass that overrides forward may compute
            # anything; matching it to its base's rule would be a guess.
            if base is module_type or getattr(module_type, "forward") is getattr(base, "forward"):
                return rule
            return None
        return None

    def lookup(self, node, root) -> Rule | None:
        if node.op == "call_module":
            return self.lookup_module(root.get_submodule(node.target))
        if node.op == "call_function":
            try:
                return self.functions.get(node.target)
            except TypeError:  # unhashable target
                return None
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None

    def table(self) -> list[tuple[str, str, str]]:
        """(kind, target, rule name) for every registered target, sorted."""
        rows = []
        for module_type, rule in self.modules.items():
            rows.append(("module", f"{module_type.__module__}.{module_type.__qualname__}", rule.name))
        for function, rule in self.functions.items():
            module = getattr(function, "__module__", None) or ""
            name = getattr(function, "__qualname__", None) or getattr(function, "__name__", repr(function))
            rows.append(("function", f"{module}.{name}" if module else name, rule.name))
        for method, rule in self.methods.items():
            rows.append(("method", f"Tensor.{method}", rule.name))
        return sorted(rows)


REGISTRY = Registry()


def rule(name: str, *, modules=(), functions=(), methods=(), backward=None, plan=None, exact="",
         reads_input_presence=False, edits_module=False, heads_aware=False, input_axis=None, passes_axis=False,
         registry=None):
    """Decorator: register ``forward`` (the decorated function) with its companions."""

    def decorate(forward):
        registered = Rule(name, forward, backward, plan, exact or (forward.__doc__ or "").strip(),
                          reads_input_presence, edits_module, heads_aware, input_axis, passes_axis)
        (registry or REGISTRY).register(registered, modules=modules, functions=functions, methods=methods)
        return forward

    return decorate
