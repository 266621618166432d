"""Which ATen ops the canonical export graphs of fxmin's zoo and of current Hugging Face families
contain, and which have a rule: the inventory in docs/export-ops.md.

    python benchmarks/export_ops.py                 # print the table (zoo, and HF when transformers 5.x is there)
    python benchmarks/export_ops.py --write         # write docs/export-ops.md

Each model is exported (``torch.export.export``, non-strict) and brought to fxmin's canonical form
(``fxmin.trace_export.canonical_graph``); each ``call_function`` target is counted once per model.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from fxmin.rules import REGISTRY  # noqa: E402
from fxmin.trace_export import canonical_graph  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def zoo_programs():
    from fxmin.zoo import MODELS

    for name, (factory, example_inputs) in MODELS.items():
        torch.manual_seed(0)
        yield f"zoo:{name}", lambda f=factory, i=example_inputs: torch.export.export(f().eval(), i())


def hf_programs():
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: the Hugging Face families are skipped", file=sys.stderr)
        return
    if int(transformers.__version__.split(".")[0]) < 5:
        print(f"transformers {transformers.__version__}: the Hugging Face families need 5.x; skipped", file=sys.stderr)
        return
    from hf_families import families

    for name, build in families().items():
        def export(build=build):
            model, inputs = build()
            return torch.export.export(model, (), inputs, strict=False)

        yield f"hf:{name}", export


def inventory(sources) -> tuple[dict, dict]:
    """(op -> set of model names, model name -> error text for models that did not export)."""
    ops, failed = defaultdict(set), {}
    for name, export in sources:
        try:
            graph_module = canonical_graph(export())
        except Exception as error:  # reported in the table, not hidden
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_function":
                ops[node.target].add(name)
        print(f"{name}: {len({n.target for n in graph_module.graph.nodes if n.op == 'call_function'})} ops",
              file=sys.stderr)
    return ops, failed


def table(ops: dict, failed: dict) -> str:
    rows = []
    for op in sorted(ops, key=str):
        rule = REGISTRY.lookup_function(op)
        models = sorted(ops[op])
        rows.append((f"`{op}`", rule.name if rule is not None else "**none**", len(models), ", ".join(models)))
    text = tabulate(rows, headers=["op", "rule", "models", "which"], tablefmt="github")
    if failed:
        text += "\n\nNot exported: " + "; ".join(f"{name} ({error})" for name, error in sorted(failed.items()))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write docs/export-ops.md")
    parser.add_argument("--no-hf", action="store_true", help="the zoo only")
    args = parser.parse_args(argv)
    sources = list(zoo_programs()) + ([] if args.no_hf else list(hf_programs()))
    ops, failed = inventory(sources)
    body = table(ops, failed)
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    missing = sorted(str(op) for op in ops if REGISTRY.lookup_function(op) is None)
    page = (f"# ATen ops in the canonical export graphs\n\nWritten by `python benchmarks/export_ops.py --write` "
            f"(torch {torch.__version__.split('+')[0]}, transformers {hf_version}): each op of the "
            "canonical graph (docs/export.md) of fxmin's zoo models (`zoo:`) and of tiny random configs of Hugging "
            "Face families (`hf:`, `benchmarks/hf_families.py`), and the rule fxmin has for it.\n\n"
            f"{len(ops)} ops, {len(missing)} without a rule.\n\n{body}\n")
    if args.write:
        (ROOT / "docs" / "export-ops.md").write_text(page)
        print(f"wrote docs/export-ops.md ({len(ops)} ops, {len(missing)} without a rule)")
    else:
        print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
