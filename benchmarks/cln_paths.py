"""CompensatedLayerNorm's two forward paths side by side: the padded path (the constants appended, the
native kernel over all D channels) against the closed form (statistics of the kept channels plus the
constants' sums), NOTE [CLN forward paths] in fxmin/compensated/forward_paths.py, on CPU in float32.

Each row: one CLN (width D, kept K, emitted channels, positions = the rows it normalizes), both paths
called in turn (A, B, A, B, ...), wall-clock medians; "closed / padded" > 1 means the padded path is
faster. The error columns are the max |difference| of each path from the same CLN in float64. The
path CLN takes is "padded" while D <= fxmin.compensated.layer_norm.PADDED_WIDTH x K.

    python -m benchmarks.cln_paths --write
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
from tabulate import tabulate

from benchmarks.common import parse_common, publish
from benchmarks.result_speed import interleaved_medians

import fxmin

# (D, K, emitted, positions): the LayerNorms of a minimized ConvNeXt (reduced width, seed 1 of
# docs/results.md: stem, downsampling and block norms at batch 1 and 64), then transformer-like widths
DEFAULT_CASES = [(24, 4, 24, 196), (48, 28, 16, 49), (96, 49, 28, 9), (192, 27, 32, 1),
                 (24, 4, 24, 64 * 196), (48, 28, 16, 64 * 49), (96, 49, 28, 64 * 9), (192, 27, 32, 64),
                 (768, 700, 768, 1024), (768, 500, 768, 1024), (768, 384, 384, 1024), (768, 250, 768, 1024),
                 (768, 100, 300, 1024)]


def make_norm(width, kept_count, emitted, seed):
    generator = torch.Generator().manual_seed(seed)
    kept = sorted(torch.randperm(width, generator=generator)[:kept_count].tolist())
    outputs = sorted(torch.randperm(width, generator=generator)[:emitted].tolist())
    removed = width - kept_count
    constants = (torch.randn(removed, generator=generator) * 0.05).tolist()
    return fxmin.CompensatedLayerNorm(width, kept, constants, outputs, 1e-6,
                                      torch.randn(emitted, generator=generator),
                                      torch.randn(emitted, generator=generator)).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=101, help="timed calls (a fifth, at least 11, above 10k elements)")
    args = parse_common(parser, argv)
    rows = []
    for width, kept, emitted, positions in DEFAULT_CASES:
        norm = make_norm(width, kept, emitted, args.seed)
        padded, closed = copy.deepcopy(norm), copy.deepcopy(norm)
        padded._padded, closed._padded = True, False
        x = torch.randn(positions, kept, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            reference = norm.double()(x.double())
            errors = [float((path(x).double() - reference).abs().max()) for path in (padded, closed)]
        runs = args.runs if positions * width <= 10_000 else max(11, args.runs // 5)
        padded_s, closed_s = interleaved_medians([lambda: padded(x), lambda: closed(x)], args.warmup, runs)
        rows.append([width, kept, f"{width / kept:.2f}", emitted, positions, f"{padded_s * 1e6:,.1f}",
                     f"{closed_s * 1e6:,.1f}", f"{closed_s / padded_s:.2f}x", f"{errors[0]:.1e}", f"{errors[1]:.1e}",
                     "padded" if width <= fxmin.compensated.layer_norm.PADDED_WIDTH * kept else "closed"])
        print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    headers = ["D", "K", "D / K", "emitted", "positions", "padded us", "closed us", "closed / padded",
               "padded err", "closed err", "CLN takes"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    print(table)
    if args.write:
        notes = (f"Wall-clock medians, torch.set_num_threads({args.threads}), {args.warmup} warm-up calls, "
                 f"{args.runs} timed calls (a fifth, at least 11, above 10k elements), the two paths called in turn "
                 "on a shared 2-core machine. The first eight rows are the shapes of the CLNs of a minimized "
                 "reduced-width ConvNeXt (docs/results.md, seed 1) at batch 1 and 64; errors are against the "
                 "same CLN in float64.")
        publish("CompensatedLayerNorm: padded path vs closed form, CPU", table, argv, "cln_paths.py", notes)


if __name__ == "__main__":
    main()
