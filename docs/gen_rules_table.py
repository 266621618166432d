"""Regenerate the rule tables in docs/exactness.md from ``fxmin.REGISTRY``.

    python docs/gen_rules_table.py           # rewrite the generated part of docs/exactness.md
    python docs/gen_rules_table.py --check   # exit 1 if it is out of date or a rule is undescribed

The table is a projection of the registry: the targets come from it, and the three prose columns
from each rule's ``Rule.doc`` (exact when, what it removes or folds, what it keeps conservatively),
written next to the rule. A rule registered without one is listed with its docstring and flagged,
so a new rule cannot go unnoticed.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # document this checkout's fxmin, not an installed one
import fxmin  # noqa: E402

DOC = Path(__file__).with_name("exactness.md")
BEGIN, END = "<!-- BEGIN GENERATED: python docs/gen_rules_table.py -->", "<!-- END GENERATED -->"

# rule name -> (exact when, what it removes or folds, what it keeps conservatively)


def rule_objects() -> dict:
    """Rule name -> the first rule of that name that has a ``doc`` (else the first of that name)."""
    rules = {}
    for rule in fxmin.REGISTRY.rules():
        if rule.name not in rules or (rule.doc and not rules[rule.name].doc):
            rules[rule.name] = rule
    return rules


def _short(target: str) -> str:
    for prefix in ("torch.nn.modules.", "torch.nn.functional.", "torch._C._nn.", "torch._C._VariableFunctions."):
        if target.startswith(prefix):
            target = target[len(prefix):]
            break
    return target


def generate() -> tuple[str, list]:
    targets = defaultdict(list)
    for kind, target, name in fxmin.REGISTRY.table():
        targets[name].append(f"`{_short(target)}`")
    rules = rule_objects()
    undescribed = sorted(name for name in targets if not rules[name].doc)
    lines = [BEGIN, "", f"{len(targets)} rules over {sum(len(t) for t in targets.values())} registered targets "
             f"(fxmin {fxmin.__version__}).", "",
             "| rule | exact when | removes / folds | keeps (conservatively) |", "|---|---|---|---|"]
    for name in sorted(targets):
        when, removes, keeps = rules[name].doc or (
            "**undescribed** — docstring: " + " ".join((rules[name].exact or "(none)").split()), "?", "?")
        lines.append(f"| `{name}` | {when} | {removes} | {keeps} |")
    lines += ["", "### Targets of each rule", ""]
    for name in sorted(targets):
        lines.append(f"- **{name}** ({len(targets[name])}): {', '.join(sorted(set(targets[name])))}")
    lines += ["", END]
    return "\n".join(lines), undescribed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/exactness.md is up to date")
    args = parser.parse_args(argv)
    generated, undescribed = generate()
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + generated + tail
    if undescribed:
        print(f"rules without a Rule.doc: {', '.join(undescribed)}", file=sys.stderr)
    if args.check:
        if new != text or undescribed:
            print(f"{DOC} is out of date: run python docs/gen_rules_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
