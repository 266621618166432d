"""What does the pass cost? trace + analyze + plan + rewrite, and verify, against one forward pass.

Full-size ConvNeXt-Tiny, ResNet-50, ViT-S/16 (224x224, batch 1) and GPT-2 small (128 tokens, batch 1)
from fxmin.zoo, with "trained-like" biases and norm statistics, at 50 % and 90 % random unstructured
sparsity over every Linear/Conv weight. Times are CPU seconds (user + system, one torch thread,
best of ``--repeat``, each model in a fresh process); the figure is each phase's time divided by one forward pass of the same
masked model on the same inputs. Peak memory is the growth of the resident set during the pass
(and during verify) over what the model and masks already held (Linux ``VmHWM`` after
``clear_refs``).

    python -m benchmarks.pass_cost                      # all four models, 50 % and 90 %
    python -m benchmarks.pass_cost --models "ResNet-50 224" --sparsities 0.9 --write docs/benchmarks.md

The scaling half of the question (time per node flat from 4 to 1024 layers) is
``benchmarks/pass_speed.py --depths 4 16 64 256 1024 --width 128``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from tabulate import tabulate

from benchmarks.common import FULL, build, cpu_seconds, parse_common, publish, random_masks, reset_peak_rss, rss_mib

import fxmin
from fxmin.minimize import prepare

PHASES = ("prepare", "analyze", "plan", "rewrite")


def warm_up() -> None:
    """The first trace of a process pays for imports and lazy initialization: not the pass."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fxmin.minimize(net, {"0.weight": torch.rand(8, 4) > 0.5}, (torch.randn(2, 4),))


def forward_seconds(masked: torch.nn.Module, example_inputs: tuple) -> float:
    """Best of 3 CPU seconds of one forward pass, no gradients (after one untimed call)."""
    with torch.no_grad():
        masked(*example_inputs)  # first call pays for lazy initialization
        return cpu_seconds(lambda: masked(*example_inputs), repeat=3)[0]


def measure(name: str, sparsity: float, repeat: int, seed: int) -> dict:
    warm_up()
    factory, inputs, _ = FULL[name]
    model = build(factory, seed)
    masks = random_masks(model, sparsity, seed)
    example_inputs = inputs(1)
    forward = forward_seconds(fxmin.masked_reference(model, masks)[0], example_inputs)

    best = {phase: float("inf") for phase in PHASES}
    for _ in range(repeat):
        baseline = rss_mib()
        peak_ok = reset_peak_rss()
        seconds, graph_module = cpu_seconds(lambda: prepare(model, masks, example_inputs)[0])
        best["prepare"] = min(best["prepare"], seconds)
        seconds, analysis = cpu_seconds(lambda: fxmin.analyze_graph(graph_module))
        best["analyze"] = min(best["analyze"], seconds)
        seconds, plan = cpu_seconds(lambda: fxmin.make_plan(analysis))
        best["plan"] = min(best["plan"], seconds)
        seconds, result = cpu_seconds(lambda: fxmin.rewrite(plan))
        best["rewrite"] = min(best["rewrite"], seconds)
        pass_peak = rss_mib("VmHWM") - baseline if peak_ok else float("nan")

        before_verify = rss_mib()
        reset_peak_rss()
        verify_seconds, report = cpu_seconds(lambda: fxmin.verify(
            graph_module, result, example_inputs, exact_result=fxmin.rewrite(plan, torch.float64), plan=plan))
        verify_peak = rss_mib("VmHWM") - before_verify if peak_ok else float("nan")
    nodes = len(graph_module.graph.nodes)
    return {"nodes": nodes, "forward": forward, **best, "verify": verify_seconds, "pass_peak": pass_peak,
            "verify_peak": verify_peak, "params_before": fxmin.count_parameters(graph_module),
            "params_after": fxmin.count_parameters(result), "error32": report.max_error(torch.float32),
            "error64": report.max_error(torch.float64)}


HEADERS = ["model", "sparsity", "nodes", "forward ms", "pass s (prep+analyze+plan+rewrite)", "pass / forward",
           "verify s", "verify / forward", "pass peak MiB", "verify peak MiB", "parameters"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one model, JSON out
    args = parse_common(parser, argv)
    if args.one:
        print(json.dumps(measure(args.models[0], args.sparsities[0], args.repeat, args.seed)))
        return

    rows = []
    for name in args.models:
        for sparsity in args.sparsities:
            # one process per measurement: peak memory is the process's own, not what an earlier model left
            child = subprocess.run([sys.executable, __file__, "--one", "--models", name, "--sparsities", str(sparsity),
                                    "--repeat", str(args.repeat), "--seed", str(args.seed), "--threads",
                                    str(args.threads)], check=True, stdout=subprocess.PIPE, text=True)
            m = json.loads(child.stdout.strip().splitlines()[-1])
            total = sum(m[p] for p in PHASES)
            rows.append([name, f"{sparsity:.0%}", m["nodes"], f"{m['forward'] * 1e3:.0f}",
                         f"{total:.2f} ({' + '.join(f'{m[p]:.2f}' for p in PHASES)})",
                         f"{total / m['forward']:.0f}x", f"{m['verify']:.2f}", f"{m['verify'] / m['forward']:.0f}x",
                         f"{m['pass_peak']:,.0f}", f"{m['verify_peak']:,.0f}",
                         f"{m['params_before']:,} -> {m['params_after']:,}"])
            print(f"  {name} {sparsity:.0%}: pass {total:.2f} s, verify {m['verify']:.2f} s, forward "
                  f"{m['forward'] * 1e3:.0f} ms (errors f32 {m['error32']:.1e}, f64 {m['error64']:.1e})",
                  file=sys.stderr, flush=True)
    table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
    print(table)
    if args.write:
        notes = (f"CPU seconds, torch.set_num_threads({args.threads}), best of {args.repeat}. \"forward\" is one "
                 "forward pass of the masked model at batch 1, no gradients. verify runs the reference and the "
                 "result (float64 rebuild and the model's float32) on the example and 2 random inputs.")
        publish("Cost of the pass: full-size models, random sparsity", table, argv, "pass_cost.py", notes)


if __name__ == "__main__":
    main()
