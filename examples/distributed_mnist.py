"""What the two distributed examples (``ddp_mnist``, ``fsdp_mnist``) share: their options, the accuracy
summed over every rank's shard, and the Squeeze-Release run that every rank makes, with rank 0's report.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import fxmin
from examples.mnist_data import LeNet300


def options(checkpoints: str) -> argparse.ArgumentParser:
    """The options both examples take; ``checkpoints`` is the default checkpoint folder."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4k training samples, 1 dense epoch, 2 cycles")
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--dense-epochs", type=int, default=4)
    parser.add_argument("--checkpoints", default=checkpoints)
    return parser


def accuracy_over_ranks(model, x, y, device="cpu") -> float:
    """Percent correct over all ranks: each rank counts on its own shard ``(x, y)`` and ``all_reduce`` sums
    the counts, so every rank sees the same accuracy and takes the same accept/miss decision (ranks that
    decided differently would run different cycles and hang in the next collective)."""
    with torch.no_grad():
        counts = torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    counts = counts.to(device)  # NCCL reduces on the GPU
    dist.all_reduce(counts)
    return 100.0 * float(counts[0] / counts[1])


def squeeze_release_on_every_rank(train, evaluate, validation, args):
    """Train a dense LeNet-300-100 with ``train``, then run the cycle on it; rank 0 prints the table and
    whether every rank ended with the same weights."""
    dense = LeNet300()
    train(dense, args.dense_epochs)
    result = fxmin.squeeze_release(dense.eval(), train=train, evaluate=evaluate, example_inputs=(validation[:32],),
                                   calibration_batch=(validation[:256],), cycles=args.cycles, amount=args.amount,
                                   criterion=fxmin.unit_scaled_magnitude, tolerance=1.0, backoff=0.5, patience=2,
                                   checkpoint_dir=args.checkpoints, minimize_options={"trials": 1})
    weights = [p.detach().cpu().clone() for p in result.module.parameters()]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, weights)
    if dist.get_rank() == 0:
        agree = all(len(g) == len(weights) and all(torch.equal(a, b) for a, b in zip(g, weights)) for g in gathered)
        print(result.table())
        print(f"ranks agree on the minimized weights: {agree}")
        print(f"best cycle {result.best_cycle}: {fxmin.count_parameters(result.module):,} parameters "
              f"({result.history[result.best_cycle].compression:.1f}x fewer), checkpoints in {args.checkpoints}/")
    return result
