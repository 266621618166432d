"""How fast is the result? Latency of the masked dense model against the minimized one, CPU, batch 1
and 64, eager and ``torch.compile`` (inductor), next to the ideal ratio counted by ``fxmin.flops``.

Masks that actually shrink the model: random unstructured masks almost never zero a whole row, so
they change nothing a dense kernel sees. Here every Linear/Conv but the classifier has half of its
output rows (filters) planted all zero (``common.planted_masks``), on models with "trained-like"
nonzero biases and norm statistics. Each layer draws its own rows, so residual-stream channels
(written by several layers that disagree) stay, and the hidden channels inside blocks go: the
ideal speed-up is what fxmin could remove, ``flops(masked).macs / flops(minimized).macs``.

The figure is achieved speed-up (median masked latency / median minimized latency) divided by the
ideal. Latency: wall-clock median of ``--runs`` calls after ``--warmup`` calls, no gradients, one
torch thread, the masked and the minimized model called in turn (so a change of load on the shared
machine hits both alike); compiled variants are compiled once per batch size (``dynamic=False``), and the first
call's time (compile included) is listed.

    python -m benchmarks.result_speed                         # ResNet-50 64x64, ViT-S/16 64x64, GPT 4x512
    python -m benchmarks.result_speed --models "ResNet-50 64x64" --no-compile
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from tabulate import tabulate

from benchmarks.common import MODEST, apply_masks, build, planted_masks, parse_common, publish

import fxmin

DEFAULT_MODELS = ["ResNet-50 64x64", "ViT-S/16 64x64", "GPT 4x512, 64 tokens"]


def prepare_call(module, inputs: tuple, compiled: bool):
    """``(call, seconds of the first call)``: the module (compiled once for these shapes) bound to ``inputs``."""
    if compiled:
        module = torch.compile(module, backend="inductor", dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        module(*inputs)
    return (lambda: module(*inputs)), time.perf_counter() - start


def interleaved_medians(calls: list, warmup: int, runs: int) -> list:
    """Median wall seconds of each call, timed in turn (A, B, A, B, ...) so that a change of load on a
    shared machine hits both alike."""
    times = [[] for _ in calls]
    with torch.no_grad():
        for _ in range(warmup):
            for call in calls:
                call()
        for _ in range(runs):
            for call, record in zip(calls, times):
                start = time.perf_counter()
                call()
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def measure(name: str, seed: int, batches, modes, warmup: int, runs: dict) -> list:
    factory, make_inputs, classifier = MODEST[name]
    model = build(factory, seed)
    masks = planted_masks(model, 0.5, classifier, seed)
    masked = apply_masks(model, masks)
    result = fxmin.minimize(model, masks, make_inputs(1))
    minimized = result.module.eval()
    before, after = fxmin.flops(masked, make_inputs(1)), fxmin.flops(minimized, make_inputs(1))
    ideal = before.speedup(after)
    rows = []
    for batch in batches:
        inputs = make_inputs(batch)
        with torch.no_grad():
            drift = float((masked(*inputs) - minimized(*inputs)).abs().max())
        for mode in modes:
            compiled = mode == "inductor"
            torch._dynamo.reset()
            dense_call, dense_first = prepare_call(masked, inputs, compiled)
            small_call, small_first = prepare_call(minimized, inputs, compiled)
            dense, small = interleaved_medians([dense_call, small_call], warmup, runs[batch])
            achieved = dense / small
            rows.append([name, batch, mode, f"{result.report.params_before:,} -> {result.report.params_after:,}",
                         f"{before.macs * batch / 1e6:,.0f} -> {after.macs * batch / 1e6:,.0f}",
                         f"{dense * 1e3:.1f}", f"{small * 1e3:.1f}", f"{achieved:.2f}x", f"{ideal:.2f}x",
                         f"{achieved / ideal:.2f}",
                         f"{dense_first:.1f} / {small_first:.1f}" if compiled else "", f"{drift:.0e}"])
            print("  " + " | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    return rows


HEADERS = ["model", "batch", "mode", "parameters", "MMACs", "masked ms", "minimized ms", "speed-up", "ideal",
           "achieved / ideal", "first call s (compile)", "max |diff|"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODEST))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=21, help="timed calls at batch 1 (a third of it at larger batches)")
    args = parse_common(parser, argv)
    modes = ["eager"] if args.no_compile else ["eager", "inductor"]
    runs = {batch: args.runs if batch == 1 else max(3, args.runs // 3) for batch in args.batches}

    rows = []
    for name in args.models:
        rows += measure(name, args.seed, args.batches, modes, args.warmup, runs)
    table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
    print(table)
    if args.write:
        notes = (f"Wall-clock medians, torch.set_num_threads({args.threads}), {args.warmup} warm-up calls, "
                 f"{runs} timed calls per batch size; masks: half the output rows of every Linear/Conv but the "
                 "classifier planted all zero, per layer at random; 'ideal' = fxmin.flops MACs before / after; "
                 "'max |diff|' is masked vs minimized output in float32 on the timed batch. The machine is "
                 "shared (2 cores, other jobs running): medians, not means, masked and minimized called in "
                 "turn. The first-call time includes inductor's compile and depends on its on-disk cache "
                 "(warm for a model compiled by an earlier run).")
        publish("Speed of the result: masked dense vs minimized, CPU", table, argv, "result_speed.py", notes)


if __name__ == "__main__":
    main()
