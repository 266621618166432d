"""Is the result exact? Max float32 and float64 error of minimized vs masked over fxmin.zoo.MODELS.

Every model of the zoo's test catalog (small instances of each family) and the full-width models of
the other benchmarks (ResNet-50, ConvNeXt-Tiny, ViT-S/16 at 64x64, a 4x512 GPT), with "trained-like" biases,
norm scales/shifts and running statistics (so dead channels carry constants that must be folded),
under three masks over the Linear/Conv weights: 50 % and 90 % random unstructured, and "planted"
(half of the output rows of every Linear/Conv all zero: whole channels die and fold).

Errors: ``fxmin.verify`` on the example inputs and 4 random inputs of the same shape; float64 is the
float64 rebuild of the minimized model (``fxmin.rewrite(plan, torch.float64)``) against the masked
model in float64, float32 is the minimized float32 module against the masked float32 model. "rel"
divides by ``max(1, max |reference output|)``.

    python -m benchmarks.exactness_sweep
    python -m benchmarks.exactness_sweep --models resnet18 gpt --write
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from tabulate import tabulate

from benchmarks.common import MODEST, build, planted_masks, parse_common, publish, random_masks

import fxmin
from fxmin import zoo

MASKS = {
    "random 50%": lambda model, seed: random_masks(model, 0.5, seed),
    "random 90%": lambda model, seed: random_masks(model, 0.9, seed),
    "planted 50% rows": lambda model, seed: planted_masks(model, 0.5, (), seed),
}


#: the zoo's test catalog, then the full-width models of the other benchmarks at 64x64 / 64 tokens
CATALOG = {**zoo.MODELS, **{name: (factory, inputs) for name, (factory, inputs, _) in MODEST.items()}}


def sweep_one(name: str, kind: str, seed: int, trials: int) -> list:
    factory, inputs = CATALOG[name]
    model = build(factory, seed)
    masks = MASKS[kind](model, seed)
    example_inputs = inputs()
    start = time.perf_counter()
    try:
        result = fxmin.minimize(model, masks, example_inputs, verify=False)
        report = fxmin.verify(result.reference, result.module, example_inputs,
                              exact_result=fxmin.rewrite(result.plan, torch.float64), plan=result.plan,
                              trials=trials, seed=seed, raise_on_failure=False)
    except fxmin.FxminError as error:
        return [name, kind, "", "", "", "", "", f"error: {type(error).__name__}: {str(error)[:80]}"]
    cells = [name, kind, f"{result.report.params_before:,} -> {result.report.params_after:,}"]
    for dtype in (torch.float32, torch.float64):
        comparisons = [c for c in report.comparisons if c.dtype == dtype]
        worst = max(comparisons, key=lambda c: c.max_error)
        cells += [f"{worst.max_error:.1e}", f"{max(c.max_error / c.scale for c in comparisons):.1e}"]
    cells.append(("ok" if report.ok else "FAIL") + f" ({time.perf_counter() - start:.1f} s)")
    return cells


HEADERS = ["model", "mask", "parameters", "float32 max abs", "float32 max rel", "float64 max abs", "float64 max rel",
           "verify"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CATALOG), choices=list(CATALOG))
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    parser.add_argument("--trials", type=int, default=4, help="random input sets beside the example")
    args = parse_common(parser, argv)

    rows = []
    for name in args.models:
        for kind in args.masks:
            rows.append(sweep_one(name, kind, args.seed, args.trials))
            print("  " + " | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
    worst32 = max((float(r[3]) for r in rows if r[3]), default=float("nan"))
    worst64 = max((float(r[5]) for r in rows if r[5]), default=float("nan"))
    failures = sum(1 for r in rows if not r[-1].startswith("ok"))
    summary = (f"{len(rows)} model x mask runs; worst float32 error {worst32:.1e}, worst float64 error "
               f"{worst64:.1e}; {failures} not ok.")
    print(table + "\n\n" + summary)
    if args.write:
        notes = (summary + f" torch.set_num_threads({args.threads}); example inputs and {args.trials} random "
                 "input sets per run. The models are the zoo's small test instances (fxmin.zoo.MODELS), then the "
                 "full-width ResNet-50, ConvNeXt-Tiny, ViT-S/16 (64x64 inputs) and a 4-layer 512-wide GPT.")
        publish("Exactness sweep: the model zoo, minimized vs masked", table, argv, "exactness_sweep.py", notes)


if __name__ == "__main__":
    main()
