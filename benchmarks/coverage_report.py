"""Renders the rows of benchmarks/coverage.py (JSON lines) as docs/coverage.md.

    python -m benchmarks.coverage_report runs/coverage/shard-*.jsonl --write docs/coverage.md --command "make coverage"
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.coverage import OUTCOMES, TOLERANCE

NOT_ATTEMPTED = ("not-exportable", "no-model", "skipped")


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("torchvision", "timm", "transformers"):
        try:
            parts.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:  # noqa: BLE001 - absent here
            parts.append(f"no {name}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = "?"
    return ", ".join(parts) + f"; fxmin at commit {commit or '?'}"


def summary(rows: list[dict]) -> str:
    groups = defaultdict(Counter)
    for row in rows:
        groups[(row["catalogue"], row["frontend"])][row["outcome"]] += 1
    table = []
    for (catalogue, frontend), counts in groups.items():
        attempted = sum(counts.values()) - sum(counts[o] for o in NOT_ATTEMPTED)
        share = f"{100 * counts['exact-shrunk'] / attempted:.0f} %" if attempted else "-"
        table.append([catalogue, frontend, sum(counts.values())] + [counts[o] or "" for o in OUTCOMES] + [share])
    return tabulate(table, ["catalogue", "front end", "models", *OUTCOMES, "exact-shrunk of attempted"],
                    tablefmt="github")


def ranked(rows: list[dict], outcome: str, key, header: str) -> str:
    """One table per front end: the ``key`` of rows with ``outcome``, by how many models it blocks."""
    parts = []
    for frontend in sorted({row["frontend"] for row in rows}):
        blocked = defaultdict(list)
        for row in rows:
            if row["frontend"] == frontend and row["outcome"] == outcome:
                blocked[key(row)].append(f"{row['catalogue']}/{row['model']}")
        if not blocked:
            parts.append(f"{frontend}: none.")
            continue
        table = [[what, len(models), ", ".join(models[:6]) + (f" and {len(models) - 6} more" if len(models) > 6 else "")]
                 for what, models in sorted(blocked.items(), key=lambda item: (-len(item[1]), item[0]))]
        parts.append(f"**{frontend}**\n\n" + tabulate(table, [header, "models", "which"], tablefmt="github"))
    return "\n\n".join(parts)


def missing(rows: list[dict]) -> str:
    """Per front end: every op without a rule, by how many refused models contain it (the whole wall, not its
    first brick), over the refused rows that list their ops."""
    parts = []
    for frontend in sorted({row["frontend"] for row in rows}):
        listed = [row for row in rows if row["frontend"] == frontend and row.get("missing") is not None]
        refused = sum(1 for row in rows if row["frontend"] == frontend and row["outcome"] == "refused")
        if not listed:
            parts.append(f"{frontend}: no refused model lists its ops.")
            continue
        holders = defaultdict(list)
        for row in listed:
            for op in row["missing"]:
                holders[op].append(f"{row['catalogue']}/{row['model']}")
        alone = Counter(row["missing"][0] for row in listed if len(row["missing"]) == 1)
        table = [[op, len(models), alone[op] or "", ", ".join(models[:4]) + (f" and {len(models) - 4} more" if len(models) > 4 else "")]
                 for op, models in sorted(holders.items(), key=lambda item: (-len(item[1]), item[0]))]
        parts.append(f"**{frontend}** ({len(listed)} of {refused} refused models list their ops)\n\n"
                     + tabulate(table, ["op", "models containing it", "models it alone blocks", "which"], tablefmt="github"))
    return "\n\n".join(parts)


def _cell(text, width: int = 140) -> str:
    text = str(text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def per_model(rows: list[dict]) -> str:
    table = []
    for row in rows:
        what = row.get("op") or row.get("detail") or ""
        if row["outcome"] == "refused" and row.get("way_out"):
            what += f"; way out: {row['way_out']}"
        if row["outcome"] == "crashed" and row.get("where"):
            what += f" [at {row['where']}]"
        if row["outcome"].startswith("exact"):
            what = f"max error {row['max_error']:.1e}"
        before, after = row.get("params_before"), row.get("params_after")
        table.append([row["catalogue"], row["model"], row["frontend"], row["outcome"], row.get("input", ""),
                      f"{before:,}" if before is not None else "", f"{after:,}" if after is not None else "",
                      f"{row['seconds']:.1f}" if row.get("seconds") is not None else "", _cell(what)])
    return tabulate(table, ["catalogue", "model", "front end", "outcome", "input", "params before", "params after",
                            "pass s", "op / detail"], tablefmt="github", disable_numparse=True)


def render(rows: list[dict], command: str, notes: dict, remark: str = "") -> str:
    not_exportable = sorted({f"{row['catalogue']}/{row['model']}" for row in rows if row["outcome"] == "not-exportable"})
    lines = [
        "# Coverage: models nobody here wrote",
        "",
        f"Produced by `{command}` ({_versions()}); `make coverage` runs it in `.venv-catalogue`.",
        "",
        *([remark, ""] if remark else []),
        "Every model gets random weights (nothing downloads), the smallest input it accepts, and planted dead "
        "structure (`plant` in benchmarks/coverage.py: a random mask keeping half of every weight of two or more "
        "dims, about one output row and one input column in eight of every Linear/conv weight dead, 1-D parameters "
        "and BatchNorm statistics moved off their initial values). Each front end minimizes it; what it returns is "
        "run in float64 against a float64 copy of the model with the masks multiplied in by hand, on fresh random "
        f"inputs (code that shares nothing with fxmin's verification), and passes when max error <= {TOLERANCE:g} x "
        "max(1, max |reference output|) (folded constants are stored in float32).",
        "",
        "Outcomes: **exact-shrunk** (fewer parameters, passes), **exact-same** (passes, nothing removed), **refused** "
        "(an fxmin error: the op it names), **crashed** (an exception that is not an fxmin error: a bug), **wrong** "
        "(the float64 check fails), **not-exportable** (torch.export itself fails: not fxmin's), **timeout**, "
        "**killed** (the worker got SIGKILL: on this shared machine, the kernel's out-of-memory killer), "
        "**no-model** (the catalogue could not build it at any of the input sizes tried), **skipped** (more "
        "parameters than the sweep's `--max-params`).",
        "",
    ]
    for catalogue, note in sorted(notes.items()):
        lines += [f"- The {catalogue} catalogue is not in this run: {note}.", ""]
    lines += ["## Summary", "", summary(rows), "",
              "## Refused ops, by how many models they block", "",
              "The first op without a rule that fxmin named for each model (a model may lack more): the to-do list "
              "for rule writers.", "", ranked(rows, "refused", lambda row: row.get("op") or "?", "op"), "",
              "## Every op without a rule", "",
              "All the ops of each refused model's graph that fxmin's registry has no rule for (`missing_ops` in "
              "benchmarks/coverage.py; module types, `Tensor.` methods, ATen ops, functions); a rule for an op that "
              "alone blocks a model lets that model through to the analysis.", "", missing(rows), "",
              "## Crashes (exceptions that are not fxmin errors)", "",
              ranked(rows, "crashed", lambda row: _cell(row.get("detail"), 100) + (f" [at {row['where']}]" if row.get("where") else ""), "cause"),
              "",
              "## Not exportable by torch.export", "", ", ".join(not_exportable) or "none.", "",
              "## Every model", "", per_model(rows), ""]
    return "\n".join(lines)


def write(results: list[Path], destination: Path, command: str, remark: str = "") -> None:
    """Render the rows of every file of ``results`` (the shards of one sweep) into ``destination``."""
    rows = [json.loads(line) for path in results for line in Path(path).read_text().splitlines() if line.strip()]
    notes = {row["catalogue"]: row["note"] for row in rows if "note" in row}
    latest = {(row["catalogue"], row["model"], row["frontend"]): row for row in rows if "note" not in row}  # resumed
    Path(destination).write_text(render(list(latest.values()), command, notes, remark))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON-lines files of benchmarks/coverage.py")
    parser.add_argument("--write", type=Path, required=True)
    parser.add_argument("--command", required=True, help="the sweep's command, stated at the top of the page")
    parser.add_argument("--remark", default="", help="a paragraph under it (e.g. that the sweep was cut short)")
    args = parser.parse_args()
    write(args.results, args.write, args.command, args.remark)
