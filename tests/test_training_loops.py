"""The user's training code stays the user's: Squeeze-Release driven by a Lightning Trainer and by a
DistributedDataParallel loop over two gloo processes (the examples' own callbacks, on synthetic data)."""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import fxmin
from fxmin.cycle import latest_checkpoint
from tests.test_cycle import data, mlp

CLASSIFIER = ["4.weight"]  # mlp()'s output layer: its rows are the classes, not units to remove


def dense_mlp(train):
    torch.manual_seed(0)
    net = mlp()
    train(net, 4)
    return net.eval()


# ------------------------------------------------------------------------------------- Lightning
def test_lightning_trainer_as_the_training_loop_holds_masks_and_shrinks(tmp_path):
    pytest.importorskip("lightning")
    from examples.lightning_mnist import make_evaluate, make_train

    x, y = data(400)
    lightning_train = make_train(x, y, skip_rows=CLASSIFIER, lr=1e-2, lasso=1e-3, batch=50, accelerator="cpu",
                                 default_root_dir=str(tmp_path))
    zeros_held = []

    def train(model, step):
        lightning_train(model, step)
        if isinstance(step, fxmin.TrainStep) and step.masks is not None:  # Lightning's steps did not revive them
            weights = dict(model.named_parameters())
            zeros_held.append(all(bool((weights[n][~m] == 0).all()) for n, m in step.masks.items()))

    net = dense_mlp(train)
    before = copy.deepcopy(net.state_dict())
    result = fxmin.squeeze_release(net, train=train, evaluate=make_evaluate(x, y), example_inputs=(x[:16],),
                                   cycles=3, amount=0.5, criterion=fxmin.unit_scaled_magnitude, tolerance=5.0,
                                   patience=3, checkpoint_dir=str(tmp_path / "cycles"), progress=False)
    assert zeros_held and all(zeros_held)  # one entry per squeeze
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the input model is untouched
    best = result.history[result.best_cycle]
    assert fxmin.count_parameters(result.module) == best.params < fxmin.count_parameters(net)
    assert best.accuracy >= result.baseline - 5.0
    assert latest_checkpoint(str(tmp_path / "cycles")).endswith("cycle_003.pt")


# ------------------------------------------------------------------------------------------- DDP
def _ddp_rank(rank, world, directory):
    import torch.distributed as dist

    from examples.ddp_mnist import make_callbacks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world)
    try:
        x, y = data(400)
        vx, vy = data(200, seed=1)
        train, evaluate = make_callbacks(x[rank::world], y[rank::world], vx[rank::world], vy[rank::world],
                                         skip_rows=CLASSIFIER, lasso=1e-3, lr=1e-2, batch=25)
        net = dense_mlp(train)
        result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3,
                                       amount=0.5, criterion=fxmin.unit_scaled_magnitude, tolerance=5.0,
                                       patience=3, checkpoint_dir=f"{directory}/cycles", progress=False)
        torch.save({"state": result.module.state_dict(), "dense": fxmin.count_parameters(net),
                    "history": [(r.params, r.accuracy) for r in result.history], "best": result.best_cycle},
                   f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_over_two_gloo_processes_agrees_on_every_cycle_and_shrinks(tmp_path):
    context = mp.start_processes(_ddp_rank, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two DDP ranks did not finish in 240 s (a rank waiting on the other: they diverged?)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"]  # the same accuracy, decisions and sizes on both ranks
    assert ranks[0]["best"] == ranks[1]["best"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    params = [p for p, _ in ranks[0]["history"]]
    assert params[0] == ranks[0]["dense"] and min(params) < params[0]
    assert sorted(os.listdir(tmp_path / "cycles")) == ["cycle_001.pt", "cycle_002.pt", "cycle_003.pt"]
