"""The user's training code stays the user's: Squeeze-Release driven by a Lightning Trainer and by a
DistributedDataParallel loop over two gloo processes (the examples' own callbacks, on synthetic data)."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _gloo_group(rank, world, directory):
    """This process as rank ``rank`` of a gloo group of ``world`` (one torch thread), for the block."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank_callbacks(make_callbacks, rank, world):
    """An example's ``make_callbacks`` on this rank's shard of the synthetic data: ``(x, train, evaluate)``."""
    x, y = data(400)
    vx, vy = data(200, seed=1)
    train, evaluate = make_callbacks(x[rank::world], y[rank::world], vx[rank::world], vy[rank::world],
                                     skip_rows=CLASSIFIER, lasso=1e-3, lr=1e-2, batch=25)
    return x, train, evaluate


def _two_ranks(target, directory, what: str) -> list:
    """``target(rank, 2, directory)`` in two spawned processes, each saving ``rank{r}.pt``: the two records."""
    context = mp.start_processes(target, args=(2, str(directory)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two {what} ranks did not finish in 240 s (a rank waiting on the other: they diverged?)")
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


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
    from examples.ddp_mnist import make_callbacks

    with _gloo_group(rank, world, directory):
        x, train, evaluate = _rank_callbacks(make_callbacks, rank, world)
        net = dense_mlp(train)
        result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3,
                                       amount=0.5, criterion=fxmin.unit_scaled_magnitude, tolerance=5.0,
                                       patience=3, checkpoint_dir=f"{directory}/cycles", progress=False)
        torch.save({"state": result.module.state_dict(), "dense": fxmin.count_parameters(net),
                    "history": [(r.params, r.accuracy) for r in result.history], "best": result.best_cycle},
                   f"{directory}/rank{rank}.pt")


def test_ddp_over_two_gloo_processes_agrees_on_every_cycle_and_shrinks(tmp_path):
    ranks = _two_ranks(_ddp_rank, tmp_path, "DDP")
    assert ranks[0]["history"] == ranks[1]["history"]  # the same accuracy, decisions and sizes on both ranks
    assert ranks[0]["best"] == ranks[1]["best"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    params = [p for p, _ in ranks[0]["history"]]
    assert params[0] == ranks[0]["dense"] and min(params) < params[0]
    assert sorted(os.listdir(tmp_path / "cycles")) == ["cycle_001.pt", "cycle_002.pt", "cycle_003.pt"]


# ------------------------------------------------------------------------------------------ FSDP2
def _fsdp_rank(rank, world, directory):
    from examples.fsdp_mnist import make_callbacks
    from fxmin.cycle import gather_full_model, sharded
    from tests.helpers import assert_equivalent, masked_copy

    with _gloo_group(rank, world, directory):
        x, train, evaluate = _rank_callbacks(make_callbacks, rank, world)
        squeezed, minimized = [], []

        def recording(model, step):  # what the cycle hands to train and gets back, untouched
            if isinstance(step, fxmin.TrainStep) and step.phase == "recover":
                minimized.append(copy.deepcopy(model))  # minimize's output, the zeros still held
            before = copy.deepcopy(model.state_dict())
            train(model, step)
            if isinstance(step, fxmin.TrainStep) and step.phase == "squeeze":  # fxmin's own hold not yet removed
                weights = dict(model.named_parameters())
                squeezed.append((copy.deepcopy(model), step.masks,
                                 all(bool((weights[n][~m] == 0).all()) for n, m in step.masks.items()),
                                 any(not torch.equal(before[k], v) for k, v in model.state_dict().items())))

        one_process = _sharded_steps_against_one_process(rank, world)
        batch_norm = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.BatchNorm1d(8))
        with sharded(batch_norm) as copy_:  # statistics of this rank's own batch, per rank under FSDP2
            copy_.train()(data(16, seed=10 + rank)[0])
        net = dense_mlp(train)
        result = fxmin.squeeze_release(net, train=recording, evaluate=evaluate, example_inputs=(x[:16],), cycles=2,
                                       amount=0.5, criterion=fxmin.unit_scaled_magnitude, tolerance=5.0, patience=3,
                                       release_zeros=False, progress=False)
        errors = []
        with sharded(net) as copy_:
            try:
                fxmin.hold_masks(copy_, fxmin.global_magnitude(net, 0.5)).__enter__()
            except fxmin.InputError as error:
                errors.append(str(error))
            try:
                gather_full_model(copy_, result.module)
            except fxmin.InputError as error:
                errors.append(str(error))
        worst = [assert_equivalent(masked_copy(model, masks), small, (x[:16],), tolerance=1e-6)
                 for (model, masks, _, _), small in zip(squeezed, minimized)] if rank == 0 else []
        torch.save({"state": result.module.state_dict(), "dense": fxmin.count_parameters(net),
                    "history": [(r.params, r.accuracy) for r in result.history], "best": result.best_cycle,
                    "held": [held for _, _, held, _ in squeezed], "trained": [moved for _, _, _, moved in squeezed],
                    "cycles": len(minimized), "worst": worst, "errors": errors, "one_process": one_process,
                    "running_mean": batch_norm[1].running_mean.clone()}, f"{directory}/rank{rank}.pt")


def _sharded_steps_against_one_process(rank, world):
    """Largest difference between three sharded SGD-with-momentum steps (cross entropy on this rank's half
    of a batch + group lasso, masks held) and the same steps taken by one process on the whole batch."""
    from torch.nn import functional as F

    from examples.fsdp_mnist import shard_layers

    x, y = data(32, seed=2)
    alone = mlp()
    masks = fxmin.global_magnitude(alone, 0.5)
    plain = copy.deepcopy(alone)

    def steps(net, xs, ys):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        with fxmin.hold_masks(net, masks, optimizer):
            for _ in range(3):
                optimizer.zero_grad()
                loss = F.cross_entropy(net(xs), ys) + 0.1 * fxmin.group_lasso(net, skip_rows=CLASSIFIER)
                loss.backward()
                optimizer.step()

    steps(alone, x, y)
    with fxmin.cycle.sharded(plain, shard_layers) as net:
        steps(net, x[rank::world], y[rank::world])
    return max(float((a - b).abs().max()) for a, b in zip(plain.state_dict().values(), alone.state_dict().values()))


def test_fsdp2_over_two_gloo_processes_trains_shards_minimizes_the_full_model_and_agrees(tmp_path):
    """The example's FSDP2 callbacks under the cycle: every squeeze trains sharded copies and writes the
    trained weights back with the masks held (by the optimizer, on the shards); training sharded takes
    the steps one process takes on the whole batch (lasso and masks included); each minimization sees
    the full model and computes the masked model's function (float64, rank 0); the ranks end bitwise equal."""
    ranks = _two_ranks(_fsdp_rank, tmp_path, "FSDP2")
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["best"] == ranks[1]["best"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    params = [p for p, _ in ranks[0]["history"]]
    assert params[0] == ranks[0]["dense"] and min(params) < params[0]
    for rank in ranks:
        assert rank["cycles"] == 2 and rank["held"] == [True, True] and rank["trained"] == [True, True]
    assert len(ranks[0]["worst"]) == 2 and max(ranks[0]["worst"]) <= 1e-6
    assert all(rank["one_process"] <= 1e-6 for rank in ranks)  # sharded steps = one process's, to rounding
    means = [rank["running_mean"] for rank in ranks]  # written back from rank 0 on both ranks
    assert torch.equal(means[0], means[1]) and bool(means[0].abs().sum() > 0)
    no_optimizer, not_a_copy = ranks[0]["errors"]
    assert "sharded (FSDP2)" in no_optimizer and "pass it, hold_masks(model, masks, optimizer)" in no_optimizer
    assert "is not a copy of" in not_a_copy


def test_sharding_without_a_process_group_says_to_start_one():
    with pytest.raises(fxmin.InputError, match="init_process_group"):
        fxmin.cycle.shard_copy(torch.nn.Linear(4, 4))
