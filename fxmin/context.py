"""What a rule sees of the graph while it runs for one node: :class:`Context`.

Rules read facts, shapes and (masked, float64) tensors through it, declare units in
``forward``, require channels in ``backward``; :class:`fxmin.plan.PlanContext` extends it
with the kept channels and the ways to record edits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx

from .errors import describe_node
from .facts import TupleFact, ValueFact
from .rules.registry import Rule

if TYPE_CHECKING:
    from .analysis import Engine


def tensor_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


class Context:
    """What a rule sees of the graph while it runs for one node."""

    def __init__(self, engine: "Engine", node: torch.fx.Node, rule: Rule):
        self._engine = engine
        self.node = node
        self.rule = rule
        self.root = engine.root
        self.module = self.root.get_submodule(node.target) if node.op == "call_module" else None

    # -- reading the node --------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name`` of the node (module input excluded for nothing)."""
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def input_nodes(self) -> list[torch.fx.Node]:
        return list(self.node.all_input_nodes)

    def fact(self, value) -> ValueFact | None:
        """The value facts of an argument, or None for a non-tensor (int, shape, ...)."""
        if isinstance(value, torch.fx.Node):
            return self._engine.facts.get(value)
        return None

    def shape(self, value=None) -> tuple[int, ...] | None:
        return tensor_shape(self.node if value is None else value)

    def describe(self) -> str:
        return describe_node(self.node, self.root)

    def param(self, name: str) -> torch.Tensor | None:
        """The module's (masked) parameter or buffer ``name`` as a float64 tensor, or None."""
        return self._engine.module_tensor(self.node.target, name)

    def attr_value(self, node) -> torch.Tensor | None:
        """The float64 value of a ``get_attr`` node, or None if ``node`` is not one."""
        if isinstance(node, torch.fx.Node) and node.op == "get_attr":
            return self._engine.attr_tensor(node.target)
        return None

    def order(self, node) -> int:
        """Position of ``node`` in the graph."""
        return self._engine._order[node]

    def graph_memo(self, key, compute):
        """A value computed once per graph (not per node), e.g. an index of tied parameters."""
        cache = self._engine.memo
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def memo(self, key, compute):
        cache = self._engine.memo
        full_key = (self.node, key)
        if full_key not in cache:
            cache[full_key] = compute()
        return cache[full_key]

    # -- forward -------------------------------------------------------------
    def units(self, node) -> np.ndarray | None:
        return self._engine.units.get(node)

    def fresh(self, size: int) -> np.ndarray:
        return self._engine.table.fresh(size)

    def unify(self, first: np.ndarray, second: np.ndarray) -> None:
        self._engine.table.unify(first, second)

    def adopt(self, node, axis: int) -> ValueFact | None:
        """Track a model constant (a ``get_attr`` tensor) along ``axis``, as its reader aligns it.

        Channel ``c`` is ``const`` when the tensor holds one value across its other axes. The
        plan slices the tensor along ``axis`` to the kept channels. Returns the fact, or None
        when ``node`` is not a model constant (or is already tracked on another axis).
        """
        return self._engine.adopt(node, axis)

    def watch(self, units) -> None:
        """Process this node again whenever one of ``units`` becomes present: for a rule whose
        output is a tuple of fresh pieces (their units belong to the ``getitem`` nodes)."""
        self._engine.watched[self.node] = np.asarray(units, np.int64)

    # -- backward ------------------------------------------------------------
    def present(self, node=None) -> np.ndarray:
        """Which channels of ``node`` (default: this node) are present; all True if untracked."""
        return self._engine.present(self.node if node is None else node)

    def require(self, node, mask, why: str | None = None) -> None:
        """Channels ``mask`` of ``node`` must stay; ``why`` says so for ``Analysis.explain``."""
        self._engine.require(node, mask, why)

    def present_units(self, units) -> np.ndarray:
        """Presence of raw unit ids (e.g. the pieces of a TupleFact)."""
        return self._engine.present_units[self._engine.table.find(np.asarray(units, np.int64))]

    def require_units(self, units, why: str | None = None) -> None:
        self._engine.require_units(units, why)

    def require_all(self, node, why: str | None = None) -> None:
        fact = self.fact(node)
        if isinstance(fact, TupleFact):
            for units in fact.units:
                self._engine.require_units(units, why or f"{self.rule.name} keeps every channel of its inputs")
            return
        if fact is not None and fact.tracked:
            self._engine.require(node, np.ones(fact.size, bool), why or f"{self.rule.name} keeps every channel of its inputs")
