"""Squeeze-Release with the user's own DistributedDataParallel loop (CPU, gloo).

    .venv/bin/torchrun --nproc_per_node 2 -m examples.ddp_mnist --quick

fxmin owns no data loop: ``train(model, step)`` below wraps whatever module fxmin hands it in a fresh
DDP (the module changes size every cycle), shards the data by rank and trains. Every rank runs the
same cycle (pruning, minimization and the seeded release are deterministic, and DDP keeps the weights
identical); only rank 0 writes checkpoints and shows the progress bar.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import fxmin
from examples.distributed_mnist import accuracy_over_ranks, options, squeeze_release_on_every_rank
from examples.mnist_data import load_mnist


def make_callbacks(x, y, vx, vy, *, skip_rows=("fc3.weight",), lasso=1e-4, lr=1e-3, batch=64):
    """``train(model, step)`` and ``evaluate(model)`` for this rank's shards (x, y) and (vx, vy).

    ``train`` wraps the module fxmin hands over in a fresh DDP each call (its size changes every cycle)
    and runs the same number of steps on every rank. ``evaluate`` sums the counts over all ranks, so every
    rank sees the same accuracy and takes the same accept/miss decision: ranks that decided differently
    would run different cycles and hang in DDP's next all-reduce."""
    rank = dist.get_rank()

    def train(model, step):
        epochs = step.epochs if isinstance(step, fxmin.TrainStep) else step
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(1000 * rank + getattr(step, "cycle", 0))
        ddp.train()
        for _ in range(max(1, round(epochs))):
            order = torch.randperm(len(x), generator=generator)
            for i in range(0, len(order) - batch + 1, batch):  # equal step counts on every rank
                index = order[i:i + batch]
                optimizer.zero_grad()
                loss = F.cross_entropy(ddp(x[index]), y[index])
                loss = loss + lasso * fxmin.group_lasso(model, skip_rows=skip_rows)
                loss.backward()
                optimizer.step()

    return train, lambda model: accuracy_over_ranks(model, vx, vy)


def main():
    args = options("runs/ddp_mnist").parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    (x, y), (vx, vy), _ = load_mnist()
    if args.quick:
        x, y, vx, vy, args.cycles, args.dense_epochs = x[:4000], y[:4000], vx[:2000], vy[:2000], 2, 1
    train, evaluate = make_callbacks(x[rank::world], y[rank::world], vx[rank::world], vy[rank::world])
    squeeze_release_on_every_rank(train, evaluate, vx, args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
