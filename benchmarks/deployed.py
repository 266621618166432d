"""What the Squeeze-Release results deploy: bytes and CPU latency of each method's final model next to
the dense model it came from (design, squeeze-release.md: "report also bytes and measured latency").

For each seed of the reported runs (their raw results name the checkpoint folders) the models are
rebuilt: the dense architecture, ours and control (b) from their checkpoints (``final_module``: the
finished weights, or for runs older than fxmin's finishing checkpoints the chosen cycle's weights
before finishing; the architecture, hence bytes and latency, is the same), control (c) from the shape
its raw entry records. (c') is ours' architecture (same costs); (a) keeps 1.3-1.5x of the weights and
was not checkpointed, so it is left out. Every row is a measured ratio against the dense model of the
same seed, all models called in turn (A, B, C, D, A, ...) in one process.

- tensors KiB: the state_dict's tensors (float32 parameters plus buffers: ours' int64 index of
  selected input pixels, the CompensatedLayerNorms' index buffers and constants); file KiB:
  ``torch.save(module.state_dict())``, what a deployment ships (the tensors plus a few hundred
  bytes of zip records per tensor, which weigh on models this small);
- MACs per sample: ``fxmin.flops``; latency: wall-clock median of ``--runs`` calls (no gradients,
  ``--threads`` torch threads) after warm-up, eager, and with ``--compile`` also ``torch.compile``
  (inductor, ``dynamic=False``, compiled once per batch size).

    .venv/bin/python -m benchmarks.deployed --compile --write docs/results.md      # make deployed
    .venv/bin/python -m benchmarks.deployed --convnext --mnist runs/mnist/results-seeds-*-*.json --write docs/results.md
    .venv/bin/python -m benchmarks.deployed --mnist --convnext OUT_DIR/results-tiny-sr.json   # a GPU run's files

Each experiment has its own section of docs/results.md (``--mnist`` or ``--convnext`` with no file
skips one and leaves its section alone). A raw results file whose checkpoint folder is not on this
machine (a device run) is read with the ``finish-<loop>.pt`` beside it (experiments/convnext_tiny_gpu.sh
brings those back).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import statistics
import sys

import torch
from tabulate import tabulate

import fxmin
from benchmarks.markdown import replace_section
from benchmarks.result_speed import interleaved_medians, prepare_call
from experiments.results import final_module

MNIST_RAW = "runs/mnist-final3/results-seeds-*-*.json"
# the reported runs of each seed (the --mac-power explorations are measured in a section of their own)
CONVNEXT_RAW = [f"docs/raw-results/convnext-w0.25-seed?-{methods}.json" for methods in ("sr", "sr-c", "c", "b-a", "r")]
LABELS = {"dense": "dense", "squeeze-release": "Squeeze-Release (ours)", "no-release": "(b) cycles without release",
          "small": "(c) small dense model from scratch"}


def tensor_bytes(module) -> int:
    """The bytes of the state_dict's tensors alone (parameters and buffers, no container)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def weight_bytes(module) -> int:
    """The bytes of ``torch.save(module.state_dict())``: the tensors plus the file's per-tensor records."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _raw(patterns):
    files = sorted({f for pattern in patterns for f in glob.glob(pattern)})
    if not files:
        raise SystemExit(f"no raw results match {patterns}: run the experiments first (see docs/results.md)")
    loaded = []
    for name in files:
        with open(name) as handle:
            loaded.append((name, json.load(handle)))
    return loaded


def mnist_models(patterns):
    """seed -> {method: module}, from the raw results of experiments/mnist_lenet300.py and its checkpoints."""
    from experiments.mnist_lenet300 import MLP, LeNet300
    seeds, notes = {}, set()
    for path, saved in _raw(patterns):
        for run in saved["runs"]:
            models = seeds.setdefault(run["seed"], {"dense": LeNet300()})
            for key, method in (("squeeze-release", "squeeze-release"), ("no-release", "no-release")):
                if key in run:
                    folder = os.path.join(saved["args"]["checkpoints"], f"{key}-seed{run['seed']}")
                    models[method], weights = final_module(folder, run[key]["cycle"], run[key]["params"])
                    notes.add(weights)
            if "small-dense" in run:
                models["small"] = MLP(tuple(run["small-dense"]["hidden"]))
                if fxmin.count_parameters(models["small"]) != run["small-dense"]["params"]:
                    raise SystemExit(f"{path}: (c) rebuilt as {run['small-dense']['layers']} has "
                                     f"{fxmin.count_parameters(models['small']):,} parameters, the results "
                                     f"{run['small-dense']['params']:,}")
    return seeds, (lambda batch: (torch.rand(batch, 784),)), notes


def convnext_models(patterns):
    """seed -> {method: module}, from the raw results of experiments/convnext_fashion.py and its checkpoints."""
    from experiments.convnext_fashion import build
    seeds, notes = {}, set()
    for path, saved in _raw(patterns):
        args = argparse.Namespace(**saved["args"])
        models = seeds.setdefault(args.seed, {"dense": build(args)})
        for method, entry in saved["methods"].items():
            power = saved["args"].get("mac_power") or 0
            if power and method in ("squeeze-release", "no-release"):  # --mac-power: a variant of its own
                key = f"{method}-mac{power:g}"
                LABELS.setdefault(key, f"{LABELS[method]}, MAC-priced (power {power:g})")
            else:
                key = method
            if method in ("squeeze-release", "no-release"):
                folder = os.path.join(args.checkpoints, method)
                beside = os.path.join(os.path.dirname(path), f"finish-{method}.pt")  # a device run's OUT_DIR
                if not os.path.isdir(folder) and os.path.exists(beside):
                    folder = beside
                models[key], weights = final_module(folder, entry["best_cycle"], entry["params"])
                notes.add(weights)
            elif method == "width-scratch":
                models["small"] = build(args, entry["width"] * args.width)
                if fxmin.count_parameters(models["small"]) != entry["params"]:
                    raise SystemExit(f"{path}: (c) rebuilt at width {entry['width']} x {args.width} has "
                                     f"{fxmin.count_parameters(models['small']):,} parameters, the results {entry['params']:,}")
    return seeds, (lambda batch: (torch.rand(batch, 1, 28, 28),)), notes


def reminimize(seeds, make_inputs) -> None:
    """Every model but the dense and (c) ones, minimized again without masks (verified: the same function
    in float64 and float32): what the current fxmin makes of the weights a run produced."""
    for seed, models in seeds.items():
        for name, module in list(models.items()):
            if name in ("dense", "small"):
                continue
            result = fxmin.minimize(module, {}, example_inputs=make_inputs(2))
            print(f"  seed {seed} {name}: re-minimized {result.report.params_before:,} -> "
                  f"{result.report.params_after:,} parameters (max float64 error {result.report.max_error:.1e})",
                  file=sys.stderr, flush=True)
            models[name] = result.module


def measure(seeds, make_inputs, batches, modes, warmup, runs):
    rows, ratios = [], {}
    for seed in sorted(seeds):
        names = [m for m in LABELS if m in seeds[seed]]
        models = [seeds[seed][m].eval() for m in names]
        params = [fxmin.count_parameters(m) for m in models]
        sizes = [weight_bytes(m) for m in models]
        raw = [tensor_bytes(m) for m in models]
        macs = [fxmin.flops(m, make_inputs(1)).macs for m in models]
        latency = {}
        for batch in batches:
            inputs = make_inputs(batch)
            for mode in modes:
                torch._dynamo.reset()
                calls = [prepare_call(m, inputs, mode == "inductor")[0] for m in models]
                latency[batch, mode] = interleaved_medians(calls, warmup, runs if batch == 1 else max(5, runs // 3))
        for i, name in enumerate(names):
            row = [seed, LABELS[name], f"{params[i]:,}", f"{params[0] / params[i]:.1f}x", f"{raw[i] / 1024:,.1f}",
                   f"{raw[0] / raw[i]:.1f}x", f"{sizes[i] / 1024:,.1f}", f"{sizes[0] / sizes[i]:.1f}x",
                   f"{macs[i] / 1e3:,.1f}", f"{macs[0] / macs[i]:.1f}x"]
            for key, times in latency.items():
                row += [f"{times[i] * 1e3:.3f}", f"{times[0] / times[i]:.2f}x"]
                ratios.setdefault((name, key), []).append(times[0] / times[i])
            ratios.setdefault((name, "bytes"), []).append(sizes[0] / sizes[i])
            ratios.setdefault((name, "tensor bytes"), []).append(raw[0] / raw[i])
            rows.append(row)
            print("  " + " | ".join(map(str, row)), file=sys.stderr, flush=True)
    headers = ["seed", "method", "params", "fewer", "tensors KiB", "smaller", "file KiB", "smaller", "kMACs / sample",
               "fewer MACs"]
    for batch, mode in latency:
        headers += [f"{mode} batch {batch} ms", "speed-up"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ratios, list(latency)


def spread(values):
    return f"{statistics.mean(values):.2f}x ± {statistics.stdev(values):.2f}x" if len(values) > 1 else f"{values[0]:.2f}x"


def summary(ratios, keys):
    rows = []
    for name in LABELS:
        if name == "dense" or (name, "bytes") not in ratios:
            continue
        rows.append([LABELS[name], spread(ratios[name, "tensor bytes"]), spread(ratios[name, "bytes"])] +
                    [spread(ratios[name, key]) for key in keys] + [len(ratios[name, "bytes"])])
    headers = ["method", "smaller (tensors)", "smaller (file)"] + [f"speed-up, {mode} batch {batch}" for batch, mode in keys] + ["seeds"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", nargs="*", default=[MNIST_RAW], help="raw results of experiments/mnist_lenet300.py")
    parser.add_argument("--convnext", nargs="*", default=CONVNEXT_RAW, help="raw results of experiments/convnext_fashion.py")
    parser.add_argument("--mnist-batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--convnext-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--compile", action="store_true", help="also torch.compile (inductor)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=51, help="timed calls at batch 1 (a third of it, at least 5, at larger batches)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", metavar="RESULTS_MD", help="write the section into this file (docs/results.md)")
    parser.add_argument("--reminimize", action="store_true",
                        help="pass ours and (b) through this fxmin's minimize (no masks: the same function, verified) "
                             "before measuring: what fxmin deploys today from the same weights")
    parser.add_argument("--section", default="", help="a tag for sections of their own (e.g. mac-priced), so "
                                                      "that a run on other raw files leaves the reported ones alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = ["eager", "inductor"] if args.compile else ["eager"]
    import platform
    command = "python -m benchmarks.deployed " + " ".join(argv if argv is not None else sys.argv[1:])
    for key, title, loader, patterns, batches in (
            ("mnist", "LeNet-300-100 on MNIST", mnist_models, args.mnist, args.mnist_batches),
            ("convnext", "ConvNeXt (width 0.25, depths 1 1 3 1) on Fashion-MNIST", convnext_models, args.convnext,
             args.convnext_batches)):
        if not patterns:
            continue
        print(title, file=sys.stderr, flush=True)
        seeds, make_inputs, weights = loader(patterns)
        if args.reminimize:
            reminimize(seeds, make_inputs)
        table, ratios, keys = measure(seeds, make_inputs, batches, modes, args.warmup, args.runs)
        tag = f" {args.section}" if args.section else ""
        text = (f"## Deployed size and latency: {title} (benchmarks/deployed.py{',' + tag if tag else ''})\n\n"
                f"- command: `{command.strip()}`\n- machine: {platform.machine()}, {os.cpu_count()} CPUs (shared "
                f"with other jobs), torch {torch.__version__}, {args.threads} torch thread(s), {args.warmup} warm-up "
                f"calls, {args.runs} timed calls at batch 1\n- raw results: {', '.join(f'`{p}`' for p in patterns)}; "
                f"the weights of ours and (b) as loaded: {' and '.join(sorted(weights))}"
                f"{'; ours and (b) re-minimized by this fxmin before measuring (--reminimize)' if args.reminimize else ''}\n\n"
                "Ratios: the dense model of the same seed over the method (bytes, MACs, median latency), measured "
                "side by side in one process. (c') has ours' architecture and costs; (a) was not checkpointed.\n\n"
                f"{summary(ratios, keys)}\n\nPer seed:\n\n{table}\n")
        print(text)
        if args.write:
            replace_section(args.write, f"deployed.py {key}{tag}", text)
            print(f"wrote the 'deployed.py {key}{tag}' section of {args.write}")

if __name__ == "__main__":
    main()
