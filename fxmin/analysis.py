"""The fixed point: value facts forward, presence backward, over a traced graph.

NOTE [Fixed point]
Value facts (``const(c)`` / varying) depend only on what flows forward, so one
pass in graph order computes them. Presence depends on every reader of every
member of a coupling group, so it is a work queue: when a unit becomes present,
every node that owns it is processed again, and its rule may require more of its
inputs. Requirements only grow, so the queue empties. Nodes are popped in
reverse graph order, which processes a chain once. Requirements that pick channels
arbitrarily wait until the queue is empty: NOTE [Choices at the fixed point] in
``fxmin/choices.py``.

The analysis never edits the graph; :mod:`fxmin.plan` turns it into edits. It knows no op: it
asks the rules of a :class:`fxmin.rules.api.Registry` (a parameter; ``fxmin.REGISTRY`` by default),
which see the graph through :class:`fxmin.rules.api.Context`.

NOTE [Untracked output]
A node whose own value is untracked gives its readers nothing to follow back, so every channel
of its inputs stays (always exact); its rule's ``backward`` is not called unless it says
``backward_untracked=True`` (size reads, getitem of tuples, layers that pin their output...).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from .barriers import BARRIER, make_barrier_test, missing_rule_error
from .choices import Choices
from .facts import TupleFact, ValueFact
from .graph_helpers import tensor_shape
from .progress import phase, tick
from .rules.api import REGISTRY, Context, Registry, Rule
from .units import OwnerIndex, UnitTable
from .weights import weights_of


#: why a model output's channels stay (``Analysis.reasons``); not a rule blocking removal
OUTPUT_REASON = "a model output (outputs never shrink)"


@dataclass
class Analysis:
    """The result of :func:`analyze`: facts, coupling units and presence per node."""

    graph_module: torch.fx.GraphModule
    facts: dict
    units: dict
    present_units: np.ndarray
    rules: dict
    tensors: dict
    #: per unit, index into ``reasons`` of the requirement that made it present (-1: never present)
    reason_of_unit: np.ndarray = None
    #: (requiring node or None for the graph output, explanation or None)
    reasons: list = None

    def present(self, node: torch.fx.Node) -> np.ndarray | None:
        units = self.units.get(node)
        if units is None:
            return None
        return self.present_units[units]

    def kept(self, node: torch.fx.Node) -> np.ndarray | None:
        """Indices of the kept channels on the tracked axis, or None when untracked."""
        mask = self.present(node)
        return None if mask is None else np.nonzero(mask)[0]

    def forget_weight_reads(self) -> None:
        """Drop what the rules cached from the weights (their dense views, copies of norms), a fraction of the
        model's size: once the plan is made nothing needs it, and a rule that asks again recomputes it."""
        self.engine.memo.clear()

    def node(self, name: str) -> torch.fx.Node:
        for node in self.graph_module.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


class Engine:
    def __init__(self, root: torch.fx.GraphModule, registry: Registry, barriers):
        self.root = root
        self.weights = weights_of(root)
        self.registry = registry
        self.barriers = barriers
        self.table = UnitTable()
        self.facts: dict = {}
        self.units: dict = {}
        self.rules: dict = {}
        self.memo: dict = {}
        self.tensors: dict = {}
        self.present_units = np.zeros(0, bool)
        self._queue: list = []
        self._attr_units: dict = {}
        self.watched: dict = {}  # node -> units it reads the presence of (Context.watch)
        self._current = None
        self.reasons: list = []
        self._queued: set = set()
        self._order: dict = {}
        self.choices = Choices(self.table, self._order)  # NOTE [Choices at the fixed point]

    # -- tensors of the model: NOTE [Weights on demand] (fxmin/weights.py) -----------
    def module_tensor(self, target: str, name: str, dtype=torch.float64) -> torch.Tensor | None:
        """Masked, a float64 copy (``dtype=None``: own dtype, read-only); only vectors are kept."""
        key = f"{target}.{name}" if target else name
        if key in self.tensors and dtype is not None:
            return self.tensors[key]
        value = self.weights.load(key)
        if value is not None and dtype is not None:
            value = value.to(dtype, copy=True)
            self.tensors.update({key: value} if value.dim() <= 1 else {})
        return value

    def attr_tensor(self, target: str, dtype=torch.float64) -> torch.Tensor | None:
        module_path, _, name = target.rpartition(".")
        return self.module_tensor(module_path, name, dtype)

    # -- what the contexts read and write (fxmin.rules.contexts.EngineView) ------
    def fact(self, node):
        return self.facts.get(node)

    def units_of(self, node):
        return self.units.get(node)

    def rule_of(self, node):
        return self.rules.get(node)

    def order(self, node) -> int:
        return self._order[node]

    def fresh(self, size: int) -> np.ndarray:
        return self.table.fresh(size)

    def unify(self, first, second) -> None:
        self.table.unify(first, second)

    def watch(self, node, units) -> None:
        self.watched[node] = np.asarray(units, np.int64)

    def present_of(self, units) -> np.ndarray:
        return self.present_units[self.table.find(np.asarray(units, np.int64))]

    def copies(self, units, sources) -> None:
        self.choices.copies(units, sources)

    def source_present(self, units) -> np.ndarray:
        return self.present_units[self.choices.source_of(self.table.find(np.asarray(units, np.int64)))]

    # -- rules ------------------------------------------------------------------
    def rule_for(self, node) -> Rule | None:
        if self.barriers(node):
            return BARRIER
        rule = self.registry.lookup(node, self.root)
        if rule is not None and rule.edits_module and node.op == "call_module" and self._calls[node.target] > 1:
            # NOTE [Shared modules]: one module called from several nodes must keep one
            # shape; fxmin keeps all of its channels (exact, shrinks nothing there).
            return BARRIER
        return rule

    def forward(self) -> None:
        missing = []
        self._calls = {}
        for index, node in enumerate(self.root.graph.nodes):
            self._order[node] = index
            if node.op == "call_module":
                self._calls[node.target] = self._calls.get(node.target, 0) + 1
        for index, node in enumerate(self.root.graph.nodes):
            tick()
            self._order[node] = index
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "get_attr":
                self.facts[node] = ValueFact.untracked() if tensor_shape(node) is not None else None
            elif node.op == "output":
                continue
            else:
                rule = self.rule_for(node)
                if rule is None:
                    missing.append(node)
                    rule = BARRIER  # keep going to report every missing rule at once
                if not rule.heads_aware and self._reads_split_axis(node):
                    rule = BARRIER  # NOTE [Heads]: this rule reads single channel axes only
                self.rules[node] = rule
                fact, units = rule.forward(Context(self, node, rule))
                self._set(node, fact, units)
        if missing:
            raise missing_rule_error(missing, self.root)
        self.present_units = np.zeros(len(self.table), bool)
        self.reason_of_unit = np.full(len(self.table), -1, np.int64)
        self.choices.freeze()
        for node, units in self.units.items():
            self.units[node] = self.table.find(units)

    def _reads_split_axis(self, node) -> bool:
        return any(isinstance(self.facts.get(n), ValueFact) and not self.facts[n].simple for n in node.all_input_nodes)

    def _placeholder(self, node) -> None:
        shape = tensor_shape(node)
        meta = node.meta.get("tensor_meta")
        if shape is None or len(shape) < 2 or not getattr(meta, "dtype", torch.int64).is_floating_point:
            self.facts[node] = ValueFact.untracked() if shape is not None else None
            return
        # NOTE [Input axis]: axis 1 is the channel axis of (N, C, ...) inputs and the
        # feature axis of (N, F) inputs; (N, T, D) inputs read by a Linear or a LayerNorm are
        # tracked on their last axis. A reader that reads another axis requires all of the
        # tracked one, which is exact; it only forgoes dropping unused inputs.
        axis = self._reader_axis(node, len(shape))
        axis = 1 if axis is None else axis
        self._set(node, ValueFact.varying(axis, shape[axis]), self.table.fresh(shape[axis]))

    def _reader_axis(self, node, rank: int) -> int | None:
        """The axis the first layer reading ``node`` (through channel-preserving ops) reads, per its rule."""
        pending = [(user, node) for user in node.users]
        while pending:
            user, source = pending.pop(0)
            if user.op not in ("call_module", "call_function", "call_method") or user.args[:1] != (source,):
                return None
            rule = self.registry.lookup(user, self.root)
            if rule is not None and rule.input_axis is not None:
                axis = rule.input_axis(user, self.root)
                return None if axis is None else axis % rank
            if rule is None or not rule.passes_axis:
                return None
            pending.extend((reader, user) for reader in user.users)
        return None

    def adopt(self, node, axis: int) -> ValueFact | None:
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op in ("call_function", "call_method", "call_module"):
            # NOTE [Constant views]: a view of a model constant (an expanded class token, a sliced
            # table): adopt the constant, the view follows it
            rule = self.registry.lookup(node, self.root)
            view = rule.constant_view(node, self.root, axis) if rule is not None and rule.constant_view is not None else None
            if view is None:
                return None
            source, source_axis = view
            fact = self.adopt(source, source_axis)
            if fact is None:
                return None
            self._set(node, fact.moved(axis), self.units[source])
            return self.facts[node]
        if node.op != "get_attr":
            return None
        fact = self.facts.get(node)
        if fact is not None and fact.tracked:
            return fact if fact.axis == axis else None
        value = self.attr_tensor(node.target)
        if value is None or value.dim() == 0 or not 0 <= axis < value.dim():
            return None
        moved = value.movedim(axis, 0).reshape(value.shape[axis], -1)
        const = (moved == moved[:, :1]).all(dim=1).numpy()
        fact = ValueFact.constants(axis, const, moved[:, 0].numpy())
        units = self.table.fresh(fact.size)
        twin = self._attr_units.get(node.target)
        if twin is not None and len(twin[1]) == fact.size and twin[0] == axis:
            self.table.unify(units, twin[1])  # NOTE: one parameter read twice keeps one shape
        self._attr_units.setdefault(node.target, (axis, units))
        self._set(node, fact, units)
        return fact

    def require_units(self, units, why=None) -> None:
        self._require_units(self.table.find(np.asarray(units, np.int64)), None, why)

    def choose(self, node, mask, why: str | None = None) -> None:
        """Like :meth:`require`, for a choice (NOTE [Choices at the fixed point])."""
        units = self._masked_units(node, mask)
        if units is not None:
            self._choose(units, node, why)

    def choose_units(self, units, why=None) -> None:
        self._choose(self.table.find(np.asarray(units, np.int64)), None, why)

    def _choose(self, units, node, why) -> None:
        new = np.unique(units[~self.present_units[units]])
        if new.size == 0:
            return
        if self._current is None or self._current is self.choices.chooser:
            self.choices.chooser = None  # one choice per run: the node's next ones wait again
            self._require_units(new, node, why)
        else:
            self.choices.wait(self._current, new)

    def _set(self, node, fact, units) -> None:
        self.facts[node] = fact
        if isinstance(fact, ValueFact) and fact.tracked:
            if units is None or len(units) != fact.size:
                raise AssertionError(f"rule for {node.name} returned units that do not match its facts")
            self.units[node] = np.asarray(units, np.int64)

    # -- backward ----------------------------------------------------------------
    def present(self, node) -> np.ndarray:
        units = self.units.get(node)
        if units is None:
            fact = self.facts.get(node)
            size = fact.size if fact is not None else 0
            return np.ones(size, bool)
        return self.present_units[units]

    def require(self, node, mask, why: str | None = None) -> None:
        units = self._masked_units(node, mask)
        if units is not None:
            self._require_units(units, node, why)

    def _masked_units(self, node, mask) -> np.ndarray | None:
        units = self.units.get(node)
        if units is None:
            return None  # untracked: everything stays anyway
        mask = np.asarray(mask, bool)
        if mask.shape != units.shape:
            raise AssertionError(f"requirement on {node.name} has shape {mask.shape}, expected {units.shape}")
        return units[mask]

    def _require_units(self, new, node, why) -> None:
        new = new[~self.present_units[new]]
        if new.size == 0:
            return
        new = np.unique(new)
        self.present_units[new] = True
        self.reason_of_unit[new] = len(self.reasons)
        self.reasons.append((self._current, node, why))
        for owner in self._owner_index.owners(new):
            self._push(owner)
            for user in owner.users:
                rule = self.rules.get(user)
                if rule is not None and rule.reads_input_presence:
                    self._push(user)

    def _push(self, node) -> None:
        if node not in self._queued and (node in self.rules or node.op == "output"):
            self._queued.add(node)
            heapq.heappush(self._queue, (-self._order[node], id(node), node))

    def backward(self) -> None:
        watched = {node: self.table.find(units) for node, units in self.watched.items()}
        self._owner_index = OwnerIndex([*self.units.items(), *watched.items()])
        for node in reversed(self.root.graph.nodes):
            if node.op == "output":
                for value in node.all_input_nodes:
                    fact = self.facts.get(value)
                    if fact is not None and fact.tracked:
                        self.require(value, np.ones(fact.size, bool), OUTPUT_REASON)
            elif node in self.rules:
                self._push(node)
        self._drain()
        chooser = self.choices.next()
        while chooser is not None:  # NOTE [Choices at the fixed point] in fxmin/choices.py
            self.choices.chooser = chooser
            self._run(chooser)
            self.choices.chooser = None
            self._drain()
            chooser = self.choices.next()

    def _drain(self) -> None:
        while self._queue:
            _, _, node = heapq.heappop(self._queue)
            self._queued.discard(node)
            self._run(node)

    def _run(self, node) -> None:
        tick()
        rule = self.rules[node]
        self._current = node
        if rule.backward_untracked or self._tracked_output(node):
            if rule.backward is not None:
                rule.backward(Context(self, node, rule))
        else:  # NOTE [Untracked output]: nothing to follow back, every input channel stays
            BARRIER.backward(Context(self, node, rule))
        self._current = None

    def _tracked_output(self, node) -> bool:
        fact = self.facts.get(node)
        return isinstance(fact, TupleFact) or (isinstance(fact, ValueFact) and fact.tracked)


@phase("analysis")
def analyze_graph(root: torch.fx.GraphModule, barriers=(), registry: Registry | None = None) -> Analysis:
    """Run the fixed point over a traced, shape-annotated, masked GraphModule with the rules of
    ``registry`` (default: ``fxmin.REGISTRY``, every rule fxmin ships)."""
    registry = REGISTRY if registry is None else registry
    engine = Engine(root, registry, make_barrier_test(barriers, root))
    engine.forward()
    engine.backward()
    analysis = Analysis(root, engine.facts, engine.units, engine.present_units, engine.rules, engine.tensors,
                        engine.reason_of_unit, engine.reasons)
    analysis.engine = engine
    return analysis
