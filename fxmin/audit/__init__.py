"""The audit: the channel dependency graph of a masked model (``graph``), its exports (tables, JSON,
GraphML, DOT/SVG: ``exports``) and multiply-accumulates per node (``flops``).

It uses the pass through its public functions only; see ``docs/audit.md``.
"""
from .flops import FlopReport, flops, mac_costs
from .graph import DependencyGraph, dependency_graph

__all__ = ["DependencyGraph", "FlopReport", "dependency_graph", "flops", "mac_costs"]
