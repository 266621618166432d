"""The layers of the package, checked on the source (function-level imports included).

- base (errors, facts, units, graph_helpers, edits, progress, memory, arrays, weights, shards) imports nothing of fxmin but each other;
- the rule API (fxmin.rules.api and its contexts) imports the base only;
- the kit (fxmin.rules.kit) imports the API and the base;
- rule modules import the API, the kit and the base, and fxmin.compensated where a rule installs
  a replacement module from there (CompensatedLayerNorm, SlicedMultiheadAttention); never each other;
- the engine (analysis, choices, plan, rewrite, streamed, verify, minimize, trace, trace_export, canonical_export, masks,
  report) imports the API, never a rule module or the kit;
- compensated imports the base only;
- zoo (the models fxmin is tested on) imports nothing of fxmin but itself: plain PyTorch models;
- cycle, audit, compile and cli use the public API: the ``fxmin`` package, the engine's public
  modules, compensated and each other; nothing of fxmin.rules;
- no import cycles between fxmin modules; every module belongs to one of these layers (or is the
  package's face: ``fxmin``, ``fxmin.__main__``, ``fxmin.legacy_modules``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxmin"
BASE = {"fxmin.errors", "fxmin.facts", "fxmin.units", "fxmin.graph_helpers", "fxmin.edits", "fxmin.progress", "fxmin.memory",
        "fxmin.arrays", "fxmin.weights", "fxmin.shards"}
API = {"fxmin.rules.api", "fxmin.rules.contexts"}
ENGINE = {f"fxmin.{name}" for name in ("analysis", "barriers", "choices", "plan", "rewrite", "streamed", "fact_check", "verify", "result_shards", "minimize", "trace", "shape_only", "trace_export",
                                       "canonical_export", "masks", "report")}
INTEGRATIONS = ("fxmin.cycle", "fxmin.audit", "fxmin.compile", "fxmin.cli")
FACE = {"fxmin", "fxmin.__main__", "fxmin.legacy_modules"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The fxmin modules ``name`` imports anywhere in its source (a package import counts as its __init__)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "fxmin" or t.startswith("fxmin."))
    return {t if t in MODULES else t.rpartition(".")[0] for t in found} - {name}


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_rule_module(name: str) -> bool:
    return name.startswith("fxmin.rules.") and name not in API and not _within(name, ["fxmin.rules.kit"])


def _check(names, allowed) -> list[str]:
    return [f"{name} imports {target}" for name in sorted(names) for target in sorted(IMPORTS[name])
            if not allowed(target)]


def test_base_modules_import_only_each_other():
    assert _check(BASE, lambda t: t in BASE) == []


def test_the_rule_api_imports_only_the_base():
    assert _check(API, lambda t: t in BASE | API) == []


def test_the_kit_imports_only_the_api_and_the_base():
    kit = [n for n in MODULES if _within(n, ["fxmin.rules.kit"])]
    assert kit and _check(kit, lambda t: t in BASE | API or _within(t, ["fxmin.rules.kit"])) == []


def test_rule_modules_import_only_the_api_the_kit_and_the_base():
    rules = [n for n in MODULES if _is_rule_module(n)]
    assert len(rules) >= 10
    allowed = lambda t: t in BASE | API or _within(t, ["fxmin.rules.kit", "fxmin.compensated"])  # noqa: E731
    assert _check(rules, allowed) == []


def test_the_engine_imports_the_rule_api_never_a_rule_module():
    allowed = lambda t: t in BASE | API | ENGINE or _within(t, ["fxmin.compensated"])  # noqa: E731
    assert _check(ENGINE, allowed) == []


def test_compensated_imports_only_the_base():
    compensated = [n for n in MODULES if _within(n, ["fxmin.compensated"])]
    assert _check(compensated, lambda t: t in BASE or _within(t, ["fxmin.compensated"])) == []


def test_integrations_use_the_public_api_only():
    names = [n for n in MODULES if _within(n, INTEGRATIONS)]
    allowed = lambda t: t == "fxmin" or t in BASE | ENGINE or _within(t, ("fxmin.compensated",) + INTEGRATIONS)  # noqa: E731
    assert _check(names, allowed) == []


def test_zoo_models_are_plain_pytorch():
    zoo = [n for n in MODULES if _within(n, ["fxmin.zoo"])]
    assert zoo and _check(zoo, lambda t: _within(t, ["fxmin.zoo"])) == []


def test_every_module_belongs_to_a_layer():
    layered = lambda n: n in BASE | API | ENGINE | FACE or _within(n, ("fxmin.rules", "fxmin.compensated", "fxmin.zoo") + INTEGRATIONS)  # noqa: E731
    assert [name for name in MODULES if not layered(name)] == []


def test_no_import_cycles():
    graph = nx.DiGraph([(name, target) for name, targets in IMPORTS.items() for target in targets
                        if target != "fxmin" and name != "fxmin"])
    assert list(nx.simple_cycles(graph)) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_import_names_a_module_of_the_package(name):
    assert all(target in MODULES for target in IMPORTS[name])
