"""The channel dependency graph: which channel groups exist, who reads them, why each channel stays.

NOTE [Channel groups]
The analysis maps every channel of every tracked axis to a *unit*; coupled axes share
units (see NOTE [Units]). A *channel group* is a connected set of values that share
units: a layer's outputs with the activations, norms and flattens that pass them on,
or, where an elementwise op or a concatenation couples several writers, a whole
residual stream or concat block. Its size is the number of distinct units; a unit is
kept iff it is present. Edges go from the group a node reads to the group it writes
(through untracked values, which carry no channels of their own).

>>> import torch, fxmin
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> mask = torch.ones(8, 4, dtype=torch.bool); mask[5:] = False
>>> audit = fxmin.dependency_graph(net, {"0.weight": mask})
>>> audit.explain("0.weight", 6).startswith("removed")
True
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import networkx as nx
import numpy as np
import torch
import torch.fx
from networkx.utils import UnionFind

from ..analysis import OUTPUT_REASON, Analysis, analyze_graph
from . import exports
from ..facts import ValueFact
from ..plan import Plan, make_plan

class DependencyGraph:
    """Channel groups and their read/write dependencies for one analysis; see :func:`dependency_graph`.

    ``graph`` is a ``networkx.DiGraph``: one node per channel group (attributes ``size``,
    ``kept``, ``removed``, ``constant``, ``blocked``, ``members``, ``writers``, ``kind``) plus
    ``"input:NAME"`` and ``"output"`` ends; edge ``A -> B`` means a node of ``B`` reads ``A``
    (attribute ``via``: the reading nodes).
    """

    def __init__(self, analysis: Analysis, plan: Plan | None = None, masks: Mapping | None = None,
                 example_inputs: tuple = ()):
        self.analysis = analysis
        self.plan = plan if plan is not None else make_plan(analysis)
        self.masks = dict(masks or {})
        self.example_inputs = example_inputs
        self.graph_module = analysis.graph_module
        self._group_of: dict = {}
        self.groups: dict = {}
        self.graph = self._build()

    # -- groups -----------------------------------------------------------------------------------
    def _tracked(self):
        for node in self.graph_module.graph.nodes:
            units = self.analysis.units.get(node)
            if units is not None and node.op != "get_attr":
                yield node, units

    def _build(self) -> nx.DiGraph:
        analysis = self.analysis
        nodes = list(self._tracked())
        # Nodes that share a unit are one channel group.
        groups = UnionFind(range(len(nodes)))
        first_owner: dict = {}
        for index, (_, units) in enumerate(nodes):
            for unit in np.unique(units).tolist():
                groups.union(index, first_owner.setdefault(unit, index))
        members = defaultdict(list)
        for index, (node, _) in enumerate(nodes):
            members[groups[index]].append(node)
            self._group_of[node] = None  # tracked; named below
        graph = nx.DiGraph()
        for group_nodes in members.values():
            head = group_nodes[0]
            name = f"input:{head.name}" if head.op == "placeholder" else head.name
            if head.op == "call_module" and head.target not in graph:
                name = head.target
            units = np.unique(np.concatenate([analysis.units[n] for n in group_nodes]))
            present = analysis.present_units[units]
            const = self._constant_units(group_nodes, units)
            blocked = np.array([self._blocked(u) for u in units], bool) if units.size else np.zeros(0, bool)
            writers = [n.name for n in group_nodes if self._writes_fresh(n)]
            kind = "input" if head.op == "placeholder" else (
                "coupled" if len(writers) > 1 else "layer outputs")
            info = {
                "label": name, "kind": kind, "size": int(units.size), "kept": int(present.sum()),
                "removed": int((~present).sum()), "constant": int((const & ~present).sum()),
                "blocked": int((blocked & present).sum()),
                "members": ",".join(n.name for n in group_nodes), "writers": ",".join(writers),
            }
            graph.add_node(name, **info)
            self.groups[name] = {**info, "nodes": group_nodes, "units": units}
        for name, group in self.groups.items():
            for node in group["nodes"]:
                self._group_of[node] = name
        graph.add_node("output", label="output", kind="output", size=0, kept=0, removed=0, constant=0, blocked=0,
                       members="", writers="")
        via = defaultdict(set)
        for node in self.graph_module.graph.nodes:
            target = "output" if node.op == "output" else self._group_of.get(node)
            if target is None:
                continue
            for source in self._tracked_sources(node):
                if self._group_of[source] != target:
                    via[(self._group_of[source], target)].add(node.name)
        for (a, b), names in via.items():
            graph.add_edge(a, b, via=",".join(sorted(names)))
        return graph

    def _tracked_sources(self, node) -> set:
        """Tracked values ``node`` reads, looking through untracked intermediates."""
        found, seen, stack = set(), set(), list(node.all_input_nodes)
        while stack:
            current = stack.pop()
            if current in seen or current.op == "get_attr":
                continue
            seen.add(current)
            if current in self._group_of:
                found.add(current)
            else:
                stack.extend(current.all_input_nodes)
        return found

    def _writes_fresh(self, node) -> bool:
        if node.op == "placeholder":
            return True
        inherited = [self.analysis.units[i] for i in self._tracked_sources(node)]
        own = np.unique(self.analysis.units[node])
        if not inherited:
            return True
        return bool(np.setdiff1d(own, np.concatenate(inherited)).size)

    def _constant_units(self, nodes, units) -> np.ndarray:
        const = np.zeros(units.size, bool)
        for node in nodes:
            fact = self.analysis.facts.get(node)
            if isinstance(fact, ValueFact) and fact.tracked:
                const[np.searchsorted(units, self.analysis.units[node][fact.const])] = True
        return const

    def _reason(self, unit: int):
        index = int(self.analysis.reason_of_unit[unit]) if self.analysis.reason_of_unit is not None else -1
        return self.analysis.reasons[index] if index >= 0 else None

    def _blocked(self, unit: int) -> bool:
        reason = self._reason(unit)
        return reason is not None and reason[2] is not None and reason[2] != OUTPUT_REASON

    # -- explain ----------------------------------------------------------------------------------
    def locate(self, name) -> tuple:
        """``(node, description)`` for a parameter name, module path, node name or node."""
        graph = self.graph_module.graph
        if isinstance(name, torch.fx.Node):
            return name, f"node '{name.name}'"
        path, _, leaf = str(name).rpartition(".")
        for node in graph.nodes:
            if node.op == "call_module" and node.target == path and leaf in dict(
                    self.graph_module.get_submodule(path).named_parameters(recurse=False)):
                return node, f"parameter '{name}' (row = output channel of '{path}')"
        for node in graph.nodes:
            if node.op == "get_attr" and node.target == name:
                readers = [u for u in node.users if u in self.analysis.units]
                if readers:
                    return readers[0], f"parameter '{name}' (row = output channel of '{readers[0].name}')"
        for node in graph.nodes:
            if node.name == name or (node.op == "call_module" and node.target == name):
                return node, f"'{name}'"
        known = [n for n, _ in self.graph_module.named_parameters()][:5]
        raise KeyError(f"'{name}' is neither a parameter, a module path nor a node of the traced model; "
                       f"parameters look like {known}")

    def status(self, name, channel: int) -> dict:
        """Facts about one channel: ``kept``, ``constant``, ``value``, ``group``, ``reason`` tuple."""
        node, what = self.locate(name)
        units = self.analysis.units.get(node)
        if units is None:
            return {"node": node, "what": what, "tracked": False, "kept": True}
        if not 0 <= channel < len(units):
            raise IndexError(f"channel {channel} is out of range: {what} has {len(units)} channels")
        unit = int(units[channel])
        fact = self.analysis.facts.get(node)
        constant = bool(isinstance(fact, ValueFact) and fact.const[channel])
        return {"node": node, "what": what, "tracked": True, "kept": bool(self.analysis.present_units[unit]),
                "constant": constant, "value": float(fact.value[channel]) if constant else None,
                "group": self._group_of.get(node), "reason": self._reason(unit), "unit": unit}

    def explain(self, name, channel: int) -> str:
        """Why channel ``channel`` of a parameter's rows (its layer's outputs), a module or a node stays or goes.

        >>> audit.explain("features.3.weight", 17)  # doctest: +SKIP
        "kept: channel 17 of 'features.3' ... nonzero constant into zero-padded conv features.6"
        """
        info = self.status(name, channel)
        node, what = info["node"], info["what"]
        if node.name in self.plan.dropped:
            return (f"removed: {what} leaves the model whole. Its branch is constant in every channel where it "
                    f"joins the rest ({', '.join(repr(r) for r in self._constant_readers(node))} reads the constants "
                    "instead: NOTE [Constant operands]), and nothing else reads it.")
        if not info["tracked"]:
            rule = self.analysis.rules.get(node)
            return (f"kept: {what} is not tracked by the analysis (rule "
                    f"'{rule.name if rule else node.op}' does not follow its channels), so every channel stays")
        group = self.groups.get(info["group"], {})
        where = f"channel {channel} of {what}, in channel group '{info['group']}' ({group.get('kept')} of " \
                f"{group.get('size')} channels kept)"
        row = self._row_note(name, channel)
        if info["kept"]:
            reason = info["reason"]
            text = f"kept: {where}"
            if info["constant"]:
                text += f" (constant {info['value']:.6g} here)"
            if reason is None:
                return text + "."
            requiring, required, why = reason
            via = "" if required is None or required is node else f" through its coupled member '{required.name}'"
            if via and isinstance(self.analysis.facts.get(required), ValueFact):
                there = np.nonzero(self.analysis.units[required] == info["unit"])[0]
                fact = self.analysis.facts[required]
                if there.size and fact.const[there[0]]:
                    via += f" (constant {fact.value[there[0]]:.6g} there)"
            if why == OUTPUT_REASON:
                return f"{text}: it is{via} {why}.{row}"
            reader = f"'{requiring.name}'" if requiring is not None else "the graph"
            rule = self.analysis.rules.get(requiring)
            rule_name = f" (rule '{rule.name}')" if rule is not None else ""
            if why is not None:
                return f"{text}: blocked by {reader}{rule_name}{via}: {why}.{row}"
            return (f"{text}: reader {reader}{rule_name} needs it{via} (it varies and a kept output of "
                    f"{reader} reads it through a nonzero weight).{row}")
        if info["constant"]:
            readers = sorted({u.name for m in group.get("nodes", [node]) for u in m.users
                              if self._group_of.get(u) != info["group"] and u.op != "output"})
            into = f" into its readers ({', '.join(readers)})" if readers else ""
            return (f"removed: {where} is constant {info['value']:.6g} at every position; the constant is "
                    f"folded{into}.{row}")
        return f"removed: {where} varies, but no surviving computation reads it.{row}"

    def _constant_readers(self, node) -> list:
        """The nodes that read a constant in place of the dropped branch ``node`` belongs to."""
        dropped, sources = set(self.plan.dropped), {o.source: o.node for o in self.plan.operands.values()}
        readers, pending, seen = [], [node], set()
        while pending:
            current = pending.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            if current.name in sources:
                readers.append(sources[current.name])
            pending += [user for user in current.users if user.name in dropped]
        return sorted(readers)

    def _row_note(self, name, channel) -> str:
        parameters = dict(self.graph_module.named_parameters())
        weight = parameters.get(str(name))
        if weight is None or weight.dim() < 1 or channel >= weight.shape[0]:
            return ""
        row = weight[channel]
        note = f" Row {channel} of '{name}' has {int((row != 0).sum())} of {row.numel()} entries nonzero"
        mask = self.masks.get(str(name))
        if mask is not None:
            note += f" ({int(mask[channel].sum())} unmasked)"
        return note + "."

    # -- tables and exports (fxmin/audit/exports.py) ------------------------------------------------------
    def layer_rows(self) -> list:
        """Per layer (node that owns parameters): name, type, shape before -> after, removed, blocked-by."""
        return exports.layer_rows(self)

    def group_rows(self) -> list:
        return exports.group_rows(self)

    def table(self, tablefmt: str = "simple") -> str:
        """Per-layer and per-group tables as text."""
        return exports.table(self, tablefmt)

    def __str__(self) -> str:
        return self.table()

    def to_json(self, indent: int | None = 2) -> str:
        """Node-link JSON (``networkx.node_link_graph`` reads it back) plus ``layers`` rows."""
        return exports.to_json(self, indent)

    def to_graphml(self, path) -> None:
        exports.to_graphml(self, path)

    def to_dot(self) -> str:
        """Graphviz DOT text: one box per group, colored by the fraction kept."""
        return exports.to_dot(self)

    def to_svg(self, path=None) -> str:
        """Render the DOT graph with graphviz's ``dot`` (must be installed); return the SVG text."""
        return exports.to_svg(self, path)


def dependency_graph(model: torch.nn.Module, masks: Mapping | None = None, example_inputs=None, *, tracer=None,
                     leaf_modules: Iterable = (), concrete_args=None, barriers: Iterable = ()) -> DependencyGraph:
    """Analyse ``model`` with ``masks`` without rewriting it: the channel dependency graph.

    Takes :func:`fxmin.minimize`'s arguments for tracing and analysis (nothing is rewritten, so
    there is nothing to verify).

    >>> import torch, fxmin
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> audit = fxmin.dependency_graph(net, {"0.weight": torch.ones(8, 4)})
    >>> sorted(audit.graph.nodes)[:2]
    ['0', '2']
    """
    from ..minimize import prepare

    graph_module, used_masks, example_inputs, *_ = prepare(model, masks, example_inputs, tracer=tracer,
                                                           leaf_modules=leaf_modules, concrete_args=concrete_args)
    analysis = analyze_graph(graph_module, barriers)
    return DependencyGraph(analysis, make_plan(analysis), used_masks, example_inputs)
