"""The bool questions the pass asks of weights, in torch and in numpy on the same memory (NOTE [Bool work in
numpy] in fxmin/arrays.py), and what numpy's matrix-vector products cost in CPU time next to torch's.

One float32 weight of GPT-2's MLP shape (3072 x 768) and a bool mask of it (random, 90 % kept; and all
kept, for ``all``); CPU seconds (user + system of this process, so threads other than the caller's count),
best of ``--repeat`` runs of ``--calls`` calls each, torch with ``--threads`` threads (1 by default).

    python -m benchmarks.bool_kernels [--repeat 5] [--calls 20] [--write]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tabulate import tabulate

from benchmarks.common import cpu_seconds, parse_common, publish

TITLE = "Bool work on weights: torch against numpy"


def _seconds(function, repeat: int, calls: int) -> float:
    return cpu_seconds(lambda: [function() for _ in range(calls)], repeat)[0] / calls


def cases(seed: int) -> list:
    """``(question, in torch, in numpy)``: the same answer each way, on one GPT-2 MLP weight and its mask."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3072, 768, generator=generator)
    mask = torch.rand(3072, 768, generator=generator) > 0.1
    kept = torch.ones(3072, 768, dtype=torch.bool)
    columns = torch.sort(torch.randperm(768, generator=generator)[:384]).values
    w, m, k, c = weight.numpy(), mask.numpy(), kept.numpy(), columns.numpy()
    cases = [
        ("where the weight is nonzero (`!= 0`)", lambda: weight != 0, lambda: w != 0),
        ("nonzero under the mask (`(w != 0) & mask`)", lambda: (weight != 0).logical_and_(mask),
         lambda: np.logical_and(w != 0, m)),
        ("count of nonzero entries", lambda: torch.count_nonzero(mask), lambda: np.count_nonzero(m)),
        ("does the mask keep everything (`all`, all kept)", lambda: kept.all(), lambda: k.all()),
        ("rows read by anything (`any` over columns)", lambda: mask.any(dim=1), lambda: m.any(axis=1)),
        ("half the columns of the mask (`index_select` / `take`)", lambda: mask.index_select(1, columns),
         lambda: np.take(m, c, axis=1)),
    ]
    return cases


def rows(repeat: int, calls: int, seed: int) -> list:
    out = []
    for what, in_torch, in_numpy in cases(seed):
        torch_s, numpy_s = _seconds(in_torch, repeat, calls), _seconds(in_numpy, repeat, calls)
        out.append([what, f"{torch_s * 1e3:.3f}", f"{numpy_s * 1e3:.3f}", f"{torch_s / numpy_s:.1f}"])
    w = cases(seed)[0][2]()  # a (3072, 768) bool array, the other work of the thread below
    matrix = np.random.default_rng(seed).standard_normal((768, 1536))
    vector = np.random.default_rng(seed + 1).standard_normal(1536)
    # as in the analysis: a product, then other work of this thread (here negating a bool pattern)
    in_numpy = _seconds(lambda: (matrix @ vector, ~w), repeat, calls)
    in_torch = _seconds(lambda: ((torch.from_numpy(matrix) @ torch.from_numpy(vector)).numpy(), ~w), repeat, calls)
    out.append(["a float64 matrix @ vector (768 x 1536), then other work: product in torch / in numpy",
                f"{in_torch * 1e3:.3f}", f"{in_numpy * 1e3:.3f}", f"{in_torch / in_numpy:.1f}"])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parse_common(parser, argv)
    table = tabulate(rows(args.repeat, args.calls, args.seed),
                     headers=["question", "torch ms", "numpy ms", "torch / numpy"], tablefmt="github")
    print(table)
    if args.write:
        publish(TITLE, table, argv, "bool_kernels.py", notes=(
            "CPU milliseconds per call, best of the runs. The last row times a product followed by other work of "
            "the calling thread, as the analysis does: numpy's product runs on OpenBLAS's threads, which ignore "
            "torch.set_num_threads and keep spinning while the caller works on; that CPU time counts here."))


if __name__ == "__main__":
    main()
