"""Small helpers over ``torch.fx`` graphs that the engine and the rules share (a base module)."""
from __future__ import annotations

import torch
import torch.fx


def tensor_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The shape recorded for ``node`` by shape propagation, or None when it is not a tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def free_name(root: torch.fx.GraphModule, name: str, taken=()) -> str:
    """``name``, or ``name_2``, ``name_3``, ...: the first attribute name that neither ``root`` (nor its
    graph) nor ``taken`` uses."""
    used = {n.target for n in root.graph.nodes if n.op in ("get_attr", "call_module")} | set(taken)
    candidate, suffix = name, 1
    while candidate in used or hasattr(root, candidate):
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate
