"""What minimization did: parameter counts, per-layer shapes before -> after, errors measured."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tabulate import tabulate

from .weights import weights_of


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_nonzero(module: torch.nn.Module) -> int:
    """Nonzero entries of the parameters as the pass reads them (masked: NOTE [Weights on demand])."""
    weights = weights_of(module)
    return sum(weights.count_nonzero(name) for name, _ in module.named_parameters())


@dataclass(frozen=True)
class LayerChange:
    name: str
    kind: str
    shape_before: tuple
    shape_after: tuple
    folded_from: tuple = ()


@dataclass
class Report:
    """Summary of one minimization. ``print(report.table())`` shows it."""

    params_before: int
    params_after: int
    nonzero_before: int
    layers: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # (name, size before, size after)
    verification: object = None  # VerifyReport, or None when verify=False
    frontend: str = "fx"  # the front end that made the graph: "fx" (torch.fx) or "export" (torch.export)

    @property
    def compression(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def max_error(self) -> float:
        """Largest float64 error seen in verification (nan when not verified)."""
        return self.verification.max_error(torch.float64) if self.verification is not None else float("nan")

    def max_error_in(self, dtype: torch.dtype) -> float:
        return self.verification.max_error(dtype) if self.verification is not None else float("nan")

    def tolerance_in(self, dtype: torch.dtype) -> float:
        """The relative tolerance verification held ``dtype`` to (nan when not verified in it)."""
        return self.verification.tolerance(dtype) if self.verification is not None else float("nan")

    def rows(self) -> list:
        rows = [(c.name, c.kind, shape_text(c.shape_before), shape_text(c.shape_after),
                 "yes" if c.folded_from else "") for c in self.layers]
        rows += [(f"input '{name}'", "index_select", before, after, "") for name, before, after in self.inputs]
        return rows

    def table(self, tablefmt: str = "simple") -> str:
        body = tabulate(self.rows(), headers=["parameter", "layer", "before", "after", "constants folded"],
                        tablefmt=tablefmt)
        summary = [
            f"parameters: {self.params_before:,} -> {self.params_after:,} ({self.compression:.2f}x fewer; "
            f"{self.nonzero_before:,} nonzero before)",
            f"front end: {'torch.export' if self.frontend == 'export' else 'torch.fx'}",
        ]
        if self.verification is not None:
            summary += self.verification.lines()
        else:
            summary.append("not verified (minimize(..., verify=False))")
        return body + "\n" + "\n".join(summary)

    def __str__(self) -> str:
        return self.table()


def shape_text(shape) -> str:
    """``(3, 4)`` -> ``'3x4'``; an empty shape -> ``'-'``."""
    return "x".join(str(s) for s in shape) if shape else "-"



def _dropped(plan, reference, result) -> list:
    """The parameters of the modules and attributes that only unread nodes used (NOTE [Constant operands])."""
    dropped = set(plan.dropped)
    targets = {n.target: n.op for n in reference.graph.nodes if n.name in dropped and n.op in ("call_module", "get_attr")}
    live = {n.target for n in result.graph.nodes if n.op in ("call_module", "get_attr")}
    remaining = dict(result.named_parameters())
    changes = []
    for target, op in sorted(targets.items()):
        if target in live:
            continue
        if op == "call_module":
            named = [(f"{target}.{name}", p) for name, p in reference.get_submodule(target).named_parameters()]
        else:
            path, _, name = target.rpartition(".")
            value = getattr(reference.get_submodule(path), name)
            named = [(target, value)] if isinstance(value, torch.nn.Parameter) else []
        changes += [LayerChange(name, "removed: read by nothing", tuple(p.shape), ())
                    for name, p in named if name not in remaining]
    return changes


def build_report(plan, reference, result, verification) -> Report:
    layers = []
    for module_edit in plan.modules.values():
        for edit in module_edit.params:
            layers.append(LayerChange(edit.name, module_edit.module_type, edit.shape_before, edit.shape_after, edit.folded_from))
    for attr in plan.attrs.values():
        edit = attr.edit
        layers.append(LayerChange(edit.name, "attribute", edit.shape_before, edit.shape_after, edit.folded_from))
    for operand in plan.operands.values():  # NOTE [Constant operands]
        layers.append(LayerChange(operand.target, "constant operand", (), tuple(operand.value.shape), (operand.source,)))
    layers += _dropped(plan, reference, result)
    inputs = [(name, plan.analysis.facts[plan.analysis.node(name)].size, len(select.index))
              for name, select in plan.inputs.items()]
    return Report(count_parameters(reference), count_parameters(result), count_nonzero(reference), layers, inputs,
                  verification)
