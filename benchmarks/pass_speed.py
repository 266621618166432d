"""How fast is the pass? trace + analyze + plan + rewrite (no verify) on deep masked MLPs.

The time per graph node must stay flat as the model gets deeper: the pass is linear in the size
of the graph (no quadratic blow-up in the fixed point, the union-find or the rewrite).

    python -m benchmarks.pass_speed                       # depths 4 16 64 256, width 512, 90 % sparsity
    python -m benchmarks.pass_speed --write docs/benchmarks.md
    python -m benchmarks.pass_speed --depths 4 16 --width 256 --dead-rows 0.1 --repeat 3
    python -m benchmarks.pass_speed --depths 4 16 64 256 1024 --width 128 --write docs/benchmarks.md  # up to 1024 layers

At width 512 a 1024-layer MLP has 269 M parameters (~9 GiB of peak memory in the pass); width 128
keeps the 1024-layer run near 17 M parameters, so depth and not width is what grows.

Phases (CPU time of each, best of ``--repeat``; the total wall time is shown too):

- prepare: masked copy of the model, ``torch.fx`` trace, shape propagation (``fxmin.minimize.prepare``)
- analyze: the fixed point (``fxmin.analyze_graph``)
- plan:    facts -> plan, including the replacement layers (``fxmin.make_plan``)
- rewrite: plan -> new GraphModule (``fxmin.rewrite``)

``--dead-rows F`` also plants whole dead rows (a fraction ``F`` of every hidden layer's
outputs), so that the plan and the rewrite have real removals and folds to do.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxmin
from benchmarks.markdown import replace_section
from fxmin.minimize import prepare

PHASES = ("prepare", "analyze", "plan", "rewrite")


def build_mlp(depth: int, width: int, seed: int) -> torch.nn.Sequential:
    """``depth`` Linear(width, width) layers with ReLU between them."""
    torch.manual_seed(seed)
    layers = []
    for index in range(depth):
        layers.append(torch.nn.Linear(width, width))
        if index < depth - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def random_masks(model: torch.nn.Module, sparsity: float, dead_rows: float, seed: int) -> dict:
    """Keep each weight with probability ``1 - sparsity``; optionally zero whole rows of hidden layers.

    NOTE [Own mask draws]: not ``fxmin.zoo.random_masks``, the masks the other benchmarks share. Without
    dead rows the two are equal (``random_masks(model, sparsity, seed, names=<the Linear weights>)``, one
    generator drawn layer by layer); with ``--dead-rows`` each layer's rows come from the same generator
    right after its entries, an order the shared function cannot reproduce, and the ``--dead-rows``
    section of docs/benchmarks.md was measured on these masks.
    """
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for position, (name, module) in enumerate(linears):
        mask = torch.rand(module.weight.shape, generator=generator) >= sparsity
        if dead_rows > 0 and position < len(linears) - 1:  # outputs never shrink: spare the last layer
            rows = torch.randperm(module.out_features, generator=generator)[: int(dead_rows * module.out_features)]
            mask[rows] = False
        masks[f"{name}.weight"] = mask
    return masks


def time_pass(model, masks, example_inputs, repeat: int) -> dict:
    """Best-of-``repeat`` CPU seconds per phase and wall seconds in all, plus graph size and parameter counts.

    CPU time (``time.process_time``, user + system, one torch thread) is what the table compares:
    on a shared machine it is far steadier than wall time, which is reported next to it.
    """
    best = {phase: float("inf") for phase in PHASES}
    best["wall"] = float("inf")
    for _ in range(repeat):
        gc.collect()
        marks = [(time.perf_counter(), time.process_time())]
        graph_module, _, inputs, *_ = prepare(model, masks, example_inputs)
        marks.append((time.perf_counter(), time.process_time()))
        analysis = fxmin.analyze_graph(graph_module)
        marks.append((time.perf_counter(), time.process_time()))
        plan = fxmin.make_plan(analysis)
        marks.append((time.perf_counter(), time.process_time()))
        result = fxmin.rewrite(plan)
        marks.append((time.perf_counter(), time.process_time()))
        for phase, (before, after) in zip(PHASES, zip(marks, marks[1:])):
            best[phase] = min(best[phase], after[1] - before[1])
        best["wall"] = min(best["wall"], marks[-1][0] - marks[0][0])
    nodes = len(graph_module.graph.nodes)
    return {"nodes": nodes, **best, "params_before": fxmin.count_parameters(graph_module),
            "params_after": fxmin.count_parameters(result)}


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run(depths, width: int, sparsity: float, dead_rows: float, repeat: int, seed: int) -> list:
    warm = build_mlp(2, 8, seed)  # first calls pay for imports and lazy initialization: not the pass
    time_pass(warm, random_masks(warm, sparsity, dead_rows, seed), (torch.randn(2, 8),), 1)
    rows = []
    for depth in depths:
        model = build_mlp(depth, width, seed)
        masks = random_masks(model, sparsity, dead_rows, seed)
        example_inputs = (torch.randn(8, width, generator=torch.Generator().manual_seed(seed)),)
        timing = time_pass(model, masks, example_inputs, repeat)
        total = sum(timing[phase] for phase in PHASES)
        rows.append([depth, timing["nodes"], *(f"{timing[phase] * 1e3:.0f}" for phase in PHASES),
                     f"{total * 1e3:.0f}", f"{total / timing['nodes'] * 1e3:.2f}", f"{timing['wall'] * 1e3:.0f}",
                     f"{peak_memory_mb():,.0f}", f"{timing['params_before']:,} -> {timing['params_after']:,}"])
        print(f"  depth {depth}: {timing['nodes']} nodes, {total:.2f} s CPU", file=sys.stderr, flush=True)
        del model, masks
    return rows


HEADERS = ["layers", "nodes", *(f"{phase} ms" for phase in PHASES), "total ms", "ms / node", "wall ms",
           "peak RSS MiB", "parameters"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, "
            f"torch.get_num_threads()={torch.get_num_threads()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, fxmin {fxmin.__version__}")


def section(command: str, table: str, title: str) -> str:
    return "\n".join([
        f"## {title}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        "",
        table,
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights masked at random")
    parser.add_argument("--dead-rows", type=float, default=0.0, help="fraction of hidden units planted dead")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs per depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is comparable)")
    parser.add_argument("--write", type=Path, metavar="PATH",
                        help="also write the table as a section of this markdown file (e.g. docs/benchmarks.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = run(args.depths, args.width, args.sparsity, args.dead_rows, args.repeat, args.seed)
    table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
    per_node = [float(row[HEADERS.index("ms / node")]) for row in rows]
    if len(per_node) > 1:
        table += (f"\n\nCPU ms per node from {rows[0][0]} to {rows[-1][0]} layers: {per_node[0]:.2f} -> "
                  f"{per_node[-1]:.2f} (largest / smallest over all depths: {max(per_node) / min(per_node):.2f}).")
    print(table)
    if args.write is not None:
        title = (f"Pass speed: MLP width {args.width}, {args.sparsity:.0%} random sparsity"
                 + (f", {args.dead_rows:.0%} dead rows" if args.dead_rows else ""))
        command = "python -m benchmarks.pass_speed " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
        replace_section(args.write, title, section(command.strip(), table, title), heading="# Benchmarks")
        print(f"wrote section '{title}' to {args.write}")


if __name__ == "__main__":
    main()
