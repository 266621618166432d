"""Tables and exports of a channel dependency graph (:class:`fxmin.audit.graph.DependencyGraph`):
per-layer and per-group rows, text tables, node-link JSON, GraphML, DOT and SVG."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict

import networkx as nx
import numpy as np
import torch
import torch.fx
from tabulate import tabulate

from ..errors import FxminError
from ..report import shape_text as _shape

# -----------------------------------------------------------------------------------
def layer_rows(audit) -> list:
    """Per layer (node that owns parameters): name, type, shape before -> after, removed, blocked-by."""
    edits = {edit.name: edit for edit in audit.plan.param_edits()}
    dropped = set(audit.plan.dropped)
    rows = []
    for node in audit.graph_module.graph.nodes:
        weight_name, kind = layer_weight(audit, node)
        if weight_name is None:
            continue
        if node.name in dropped:  # NOTE [Constant operands]: the whole layer leaves
            before = tuple(_get(audit.graph_module, weight_name).shape)
            units = audit.analysis.units.get(node)
            rows.append({"layer": weight_name.rpartition(".")[0] or node.name, "type": kind, "before": _shape(before),
                         "after": "-", "removed": len(units) if units is not None else 0,
                         "blocked_by": ""})
            continue
        before = tuple(audit.graph_module.get_parameter(weight_name).shape) if weight_name in dict(
            audit.graph_module.named_parameters()) else tuple(_get(audit.graph_module, weight_name).shape)
        edit = edits.get(weight_name)
        after = edit.shape_after if edit is not None else before
        units = audit.analysis.units.get(node)
        removed = int((~audit.analysis.present_units[units]).sum()) if units is not None else 0
        blocked = defaultdict(int)
        if units is not None:
            for unit in units[audit.analysis.present_units[units]].tolist():
                if audit._blocked(unit):
                    blocked[audit._reason(unit)[2]] += 1
        rows.append({"layer": weight_name.rpartition(".")[0] or node.name, "type": kind,
                     "before": _shape(before), "after": _shape(after), "removed": removed,
                     "blocked_by": "; ".join(f"{why} ({count})" for why, count in blocked.items())})
    return rows

def layer_weight(audit, node):
    if node.op == "call_module":
        module = audit.graph_module.get_submodule(node.target)
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"{node.target}.weight" if node.target else "weight", type(module).__name__
        return None, None
    if node.op == "call_function":
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
            return weight.target, getattr(node.target, "__name__", str(node.target))
    return None, None

def group_rows(audit) -> list:
    return [{"group": name, "kind": g["kind"], "size": g["size"], "kept": g["kept"], "removed": g["removed"],
             "constant": g["constant"], "blocked": g["blocked"], "writers": g["writers"]}
            for name, g in audit.groups.items()]

def table(audit, tablefmt: str = "simple") -> str:
    """Per-layer and per-group tables as text."""
    layers = tabulate([list(r.values()) for r in audit.layer_rows()],
                      headers=["layer", "type", "weight before", "after", "channels removed", "blocked by"],
                      tablefmt=tablefmt)
    groups = tabulate([list(r.values()) for r in audit.group_rows()],
                      headers=["channel group", "kind", "size", "kept", "removed", "constant", "blocked", "writers"],
                      tablefmt=tablefmt)
    return f"{layers}\n\n{groups}"

# ----------------------------------------------------------------------------------
def to_json(audit, indent: int | None = 2) -> str:
    """Node-link JSON (``networkx.node_link_graph`` reads it back) plus ``layers`` rows."""
    data = nx.node_link_data(audit.graph, edges="links")
    data["layers"] = audit.layer_rows()
    return json.dumps(data, indent=indent, default=_jsonable)

def to_graphml(audit, path) -> None:
    nx.write_graphml(audit.graph, str(path))

def to_dot(audit) -> str:
    """Graphviz DOT text: one box per group, colored by the fraction kept."""
    lines = ["digraph fxmin {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for name, data in audit.graph.nodes(data=True):
        if data["kind"] == "output":
            lines.append(f"  {_quote(name)} [label=\"output\", shape=ellipse, fillcolor=\"#dddddd\"];")
            continue
        fraction = data["kept"] / data["size"] if data["size"] else 1.0
        color = "#%02x%02x%02x" % (255, int(150 + 105 * fraction), int(150 + 105 * fraction))
        label = f"{name}\\n{data['kind']}: {data['kept']}/{data['size']} kept"
        if data["blocked"]:
            label += f"\\n{data['blocked']} blocked"
        lines.append(f"  {_quote(name)} [label={_quote(label, escaped=True)}, fillcolor=\"{color}\"];")
    for a, b, data in audit.graph.edges(data=True):
        lines.append(f"  {_quote(a)} -> {_quote(b)} [tooltip={_quote(data['via'])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"

def to_svg(audit, path=None) -> str:
    """Render the DOT graph with graphviz's ``dot`` (must be installed); return the SVG text."""
    dot = shutil.which("dot")
    if dot is None:
        raise FxminError("rendering SVG needs graphviz's 'dot' program (apt-get install graphviz); "
                         "to_dot() gives the text without it")
    svg = subprocess.run([dot, "-Tsvg"], input=audit.to_dot(), capture_output=True, text=True, check=True).stdout
    if path is not None:
        with open(path, "w") as handle:
            handle.write(svg)
    return svg


def _get(root, target):
    module_path, _, name = target.rpartition(".")
    return getattr(root.get_submodule(module_path), name)


def _quote(text: str, escaped: bool = False) -> str:
    text = str(text).replace('"', '\\"')
    return f'"{text}"' if escaped else '"' + text.replace("\\n", "\\\\n") + '"'


def _jsonable(value):
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return str(value)
