"""CompensatedLayerNorm of this checkout against the one of an earlier git revision, in one process, on CPU.

A CLN's forward is swapped for the revision's by changing the class of a copy of the same module (same
buffers, same parameters), so each row times the same computation written two ways, called in turn
(old, new, old, new, ...; wall-clock medians). Two tables:

- the CLN shapes of benchmarks/cln_paths.py, with random and with all-zero constants, on both paths;
- the reported minimized ConvNeXt models (docs/raw-results/convnext-w0.25-seed?-sr*.json and their
  checkpoints) against their dense model at batch 1 and 64, eager: "ours / dense" is the dense model's
  time over ours (> 1: ours is faster), with the revision's CLN and with this checkout's.

    python -m benchmarks.cln_revisions --against 180465d~1 --write
"""
from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate

from benchmarks.cln_paths import DEFAULT_CASES, make_norm
from benchmarks.common import parse_common, publish
from benchmarks.result_speed import interleaved_medians

import fxmin

ROOT = Path(__file__).resolve().parent.parent
CONVNEXT = ["docs/raw-results/convnext-w0.25-seed?-sr.json", "docs/raw-results/convnext-w0.25-seed?-sr-c.json"]


def revision_class(revision: str):
    """``CompensatedLayerNorm`` as the fxmin package defines it at ``revision``: the package's files at
    that revision, imported under another name (so its forward helpers are the revision's too)."""
    folder = Path(tempfile.mkdtemp())
    try:
        archive = subprocess.run(["git", "archive", revision, "fxmin"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise SystemExit(f"cannot read fxmin at revision {revision!r} (git archive failed: "
                         f"{getattr(error, 'stderr', error)}); pass a revision of this repository") from None
    name = f"fxmin_at_{abs(hash((revision, str(folder))))}"
    (folder / "fxmin").rename(folder / name)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name).CompensatedLayerNorm  # the package exports it at every revision
    finally:
        sys.path.remove(str(folder))


def as_revision(module: torch.nn.Module, cls) -> torch.nn.Module:
    """A copy of ``module`` whose CLNs run ``cls.forward`` (and whose structure ``cls`` reads again)."""
    module = copy.deepcopy(module)
    for child in [module] + list(module.modules()):
        if isinstance(child, fxmin.CompensatedLayerNorm):
            child.__class__ = cls
            child._read_structure()
    return module


def case_rows(old_cls, warmup, runs, seed):
    rows = []
    for constants in ("random", "zeros"):
        for width, kept, emitted, positions in DEFAULT_CASES:
            norm = make_norm(width, kept, emitted, seed)
            if constants == "zeros":
                norm = fxmin.CompensatedLayerNorm(width, norm.kept, None, norm.outputs, 1e-6, norm.weight.detach(),
                                                  norm.bias.detach()).eval()
            x = torch.randn(positions, kept, generator=torch.Generator().manual_seed(seed))
            row = [constants, width, kept, emitted, positions]
            for padded in (True, False):
                new = copy.deepcopy(norm)
                new._padded = padded
                old = as_revision(new, old_cls)
                old._padded = padded
                with torch.no_grad():
                    torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)
                    times = interleaved_medians([lambda: old(x), lambda: new(x)], warmup,
                                                runs if positions * width <= 10_000 else max(11, runs // 5))
                row += [f"{times[0] * 1e6:,.1f}", f"{times[1] * 1e6:,.1f}", f"{times[0] / times[1]:.2f}x"]
            rows.append(row)
            print("  " + " | ".join(map(str, row)), file=sys.stderr, flush=True)
    headers = ["constants", "D", "K", "emitted", "positions", "padded: revision us", "padded: now us", "faster",
               "closed: revision us", "closed: now us", "faster"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def model_rows(old_cls, warmup, runs, patterns):
    from benchmarks.deployed import convnext_models
    seeds, make_inputs, _ = convnext_models([str(ROOT / p) for p in patterns])
    rows = []
    for seed in sorted(seeds):
        dense, new = seeds[seed]["dense"].eval(), seeds[seed]["squeeze-release"].eval()
        old = as_revision(new, old_cls)
        for batch in (1, 64):
            x = make_inputs(batch)
            with torch.no_grad():
                torch.testing.assert_close(new(*x), old(*x), rtol=1e-4, atol=1e-4)
                times = interleaved_medians([lambda: dense(*x), lambda: old(*x), lambda: new(*x)], warmup,
                                            runs if batch == 1 else max(11, runs // 5))
            rows.append([seed, batch, f"{times[0] * 1e3:.3f}", f"{times[1] * 1e3:.3f}", f"{times[0] / times[1]:.2f}x",
                         f"{times[2] * 1e3:.3f}", f"{times[0] / times[2]:.2f}x", f"{times[1] / times[2]:.2f}x"])
            print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    headers = ["seed", "batch", "dense ms", "ours, revision's CLN ms", "ours / dense", "ours, CLN now ms",
               "ours / dense", "now vs revision"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git revision whose CLN forward is the baseline")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=201, help="timed calls (a fifth, at least 11, on large inputs)")
    parser.add_argument("--no-models", action="store_true", help="only the CLN cases (no ConvNeXt checkpoints needed)")
    args = parse_common(parser, argv)
    old_cls = revision_class(args.against)
    table = "Single CLNs:\n\n" + case_rows(old_cls, args.warmup, args.runs, args.seed)
    if not args.no_models:
        table += "\n\nMinimized ConvNeXt (width 0.25) against its dense model, eager:\n\n" + model_rows(
            old_cls, args.warmup, args.runs, CONVNEXT)
    print(table)
    if args.write:
        notes = (f"CLN forward of this checkout against revision `{args.against}`: the same modules, the class "
                 f"swapped, called in turn in one process; wall-clock medians, torch.set_num_threads({args.threads}), "
                 f"{args.warmup} warm-up calls, {args.runs} timed calls (a fifth, at least 11, on large inputs), on a "
                 "shared 2-core machine. \"faster\" is the revision's time over now's.")
        publish("CompensatedLayerNorm: this checkout vs an earlier revision, CPU", table, argv,
                "cln_revisions.py", notes)


if __name__ == "__main__":
    main()
