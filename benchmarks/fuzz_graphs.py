"""Random-graph fuzzer: does fxmin stay exact-or-loud, and remove what the oracle proves removable?

Case ``s`` is the description drawn by ``tests/fuzz_descriptions.describe(RandomDraw(s))`` (a random DAG of
Linear/Conv/norm/attention/residual/cat/split ops with planted dead structure); ``tests/fuzz_case.run_case``
minimizes it and judges the result against the masked model in float64 and against the oracle of
``tests/fuzz_oracle.py`` (see docs/reliability.md). Reproduce one case with ``--start s --cases 1 -v``.

    nice -n 10 python -m benchmarks.fuzz_graphs --cases 10000 --jobs 2 --write
    python -m benchmarks.fuzz_graphs --merge run1.jsonl run2.jsonl --write   # runs logged with --log
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fuzzer's modules import each other as top-level modules

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from fuzz_case import run_case  # noqa: E402
from fuzz_descriptions import KINDS, RandomDraw, describe  # noqa: E402
from fuzz_oracle import LIMITS  # noqa: E402
from benchmarks.markdown import replace_section  # noqa: E402
from benchmarks.pass_speed import section  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
TITLE = "Random graphs: exact or loud, and removal against the oracle"
FINDINGS = ("wrong", "crashed", "keeps-more", "removes-more", "perturbation")


def one(seed: int) -> dict:
    torch.set_num_threads(1)
    outcome = run_case(describe(RandomDraw(seed)))
    return {"seed": seed, **outcome.__dict__}


def finding(record: dict) -> str | None:
    """The kind of finding a case is, or None for a clean case."""
    if record["status"] in ("wrong", "crashed"):
        return record["status"]
    if record["status"] == "loud" and record["kind"] != "gqa":
        return "loud"
    if record["removal"] in ("keeps-more", "removes-more"):
        return record["removal"]
    if record["perturbation"] not in ("", "ok"):
        return "perturbation"
    return None


def table(records: list) -> str:
    rows = []
    for kind in (*KINDS, "all"):
        mine = [r for r in records if kind in ("all", r["kind"])]
        if not mine:
            continue
        count = collections.Counter(r["status"] for r in mine)
        removal = collections.Counter(r["removal"] for r in mine if r["status"] == "exact")
        loud = collections.Counter(r["error"].split(":")[0] for r in mine if r["status"] == "loud")
        perturbed = sum(1 for r in mine if r["status"] == "exact" and r["perturbation"] == "ok")
        rows.append([kind, len(mine), count["exact"], count["loud"] and f"{count['loud']} ({', '.join(f'{k} {v}' for k, v in loud.items())})",
                     count["wrong"], count["crashed"], removal["match"], removal["limits"], removal["keeps-more"],
                     removal["removes-more"], perturbed])
    return tabulate(rows, headers=["kind", "cases", "exact", "loud (error)", "wrong", "crashed", "removal = oracle",
                                   "= oracle up to named limits", "keeps more", "removes more",
                                   "perturbation check ok"], tablefmt="github", disable_numparse=True)


def notes(records: list, seconds: float | None) -> str:
    fired = collections.Counter(limit for r in records for limit in r["limits"])
    took = f" in {seconds / 60:.1f} min" if seconds is not None else ""
    lines = [f"{len(records):,} cases{took}. Named limits behind the 'up to named limits' cases "
             "(a case can show several): " + ", ".join(f"`{name}` {fired[name]}" for name in LIMITS if fired[name]) + "."]
    by_kind = collections.defaultdict(list)
    for r in records:
        kind = finding(r)
        if kind:
            by_kind[kind].append(r)
    if not by_kind:
        lines.append("\nNo findings.")
    for kind, found in sorted(by_kind.items()):
        lines.append(f"\n{kind} ({len(found)}), first seeds:")
        for r in found[:6]:
            found_differences = [d for d in r["differences"] if "named limit" not in d]
            detail = r["error"] or "; ".join(found_differences[:2]) or r["perturbation"]
            lines.append(f"- seed {r['seed']} ({r['kind']}): {detail}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0, help="seed of the first case")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--minutes", type=float, default=None, help="stop starting cases after this long")
    parser.add_argument("--log", type=Path, help="write every case's outcome here (JSON lines)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/reliability.md")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every finding as it comes")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="LOG",
                        help="run nothing: tabulate the cases of these --log files (several runs, other seeds)")
    args = parser.parse_args(argv)
    if args.merge:
        records = sorted((json.loads(line) for log in args.merge for line in log.read_text().splitlines() if line),
                         key=lambda record: record["seed"])
        seeds = [r["seed"] for r in records]
        if len(set(seeds)) != len(seeds):
            raise SystemExit("the logs share seeds: merge runs of disjoint seeds")
        publish(records, None, args.write, argv)
        return
    start = time.perf_counter()
    records = []
    log = args.log.open("w") if args.log else None
    seeds = range(args.start, args.start + args.cases)
    with multiprocessing.Pool(args.jobs) as pool:
        for record in pool.imap(one, seeds, chunksize=4):
            records.append(record)
            if log:
                log.write(json.dumps(record, default=list) + "\n")
            if args.verbose and finding(record):
                print(json.dumps(record, default=list), file=sys.stderr, flush=True)
            if len(records) % 500 == 0:
                print(f"{len(records)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if args.minutes is not None and time.perf_counter() - start > 60 * args.minutes:
                pool.terminate()
                break
    publish(records, time.perf_counter() - start, args.write, argv)


def publish(records: list, seconds: float | None, write: bool, argv) -> None:
    text = table(records) + "\n\n" + notes(records, seconds)
    print(text)
    if write:
        command = "nice -n 10 python -m benchmarks.fuzz_graphs " + " ".join(argv if argv is not None else sys.argv[1:])
        replace_section(DOC, "fuzz_graphs.py", section(command, text, TITLE), heading="# Reliability")
        print(f"wrote section '{TITLE}' to {DOC}")


if __name__ == "__main__":
    main()
