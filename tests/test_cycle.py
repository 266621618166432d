"""Pruning helpers, held masks, release and the Squeeze-Release loop on a tiny MLP (seconds)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxmin
from fxmin.cycle import latest_checkpoint, load_checkpoint
from tests.helpers import assert_equivalent, masked_copy


def mlp(seed=0, sizes=(20, 32, 16, 3)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def data(n=400, seed=0):
    """A synthetic 3-class problem on 20 features, 8 of them informative."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(8, 3, generator=g)
    y = (x[:, :8] @ w).argmax(1)
    return x, y


def pruned_count(masks):
    return sum(int((~m).sum()) for m in masks.values())


# ------------------------------------------------------------------------------- prune helpers
def test_global_amount_is_exact_and_ranks_across_layers():
    net = mlp()
    with torch.no_grad():
        net[2].weight.abs_().add_(10)  # layer 2 is large: a global ranking spares it
    masks = fxmin.global_magnitude(net, 0.3)
    total = sum(p.numel() for p in fxmin.prunable(net).values())
    assert set(masks) == {"0.weight", "2.weight", "4.weight"}  # Linear weights only, no biases
    assert pruned_count(masks) == round(0.3 * total)
    assert int((~masks["2.weight"]).sum()) == 0


def test_layer_amount_is_exact_per_tensor_and_prior_masks_stay():
    net = mlp()
    masks = fxmin.layer_magnitude(net, 0.5)
    for name, parameter in fxmin.prunable(net).items():
        assert int((~masks[name]).sum()) == round(0.5 * parameter.numel())
    again = fxmin.layer_magnitude(net, 0.5, masks=masks)  # half of what is left
    for name, parameter in fxmin.prunable(net).items():
        left = parameter.numel() - round(0.5 * parameter.numel())
        assert int((~again[name]).sum()) == round(0.5 * parameter.numel()) + round(0.5 * left)
        assert not (again[name] & ~masks[name]).any()


def test_criterion_is_pluggable_and_options_select_parameters():
    net = mlp()
    # prune the *largest* weights: the opposite of magnitude
    masks = fxmin.global_magnitude(net, 0.1, criterion=lambda name, p: -p.abs())
    weights = torch.cat([p.detach().abs().flatten() for p in fxmin.prunable(net).values()])
    pruned = torch.cat([p.detach().abs()[~masks[n]] for n, p in fxmin.prunable(net).items()])
    assert pruned.min() >= weights.kthvalue(int(0.9 * weights.numel())).values
    with_biases = fxmin.global_magnitude(net, 0.1, biases=True, exclude=["4.weight"])
    assert "0.bias" in with_biases and "4.weight" not in with_biases
    structured = fxmin.global_magnitude(net, 0.5, criterion=fxmin.unit_scaled_magnitude)
    assert pruned_count(structured) == round(0.5 * weights.numel())


def test_pruning_does_not_mutate_the_model():
    net = mlp()
    before = copy.deepcopy(net.state_dict())
    fxmin.global_magnitude(net, 0.7)
    fxmin.layer_magnitude(net, 0.7)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_amount_is_a_clear_error():
    with pytest.raises(fxmin.MaskError, match="fraction"):
        fxmin.global_magnitude(mlp(), 1.5)


def _lasso_by_hand(net, weighting, skip=()):
    groups = []  # (norm, entries) of every row and column of every weight
    for name, w in fxmin.prunable(net).items():
        flat = w.detach().double().flatten(2) if w.dim() > 2 else w.detach().double().unsqueeze(-1)
        if name not in skip:
            groups += [(flat[i].norm(), flat[i].numel()) for i in range(flat.shape[0])]
        groups += [(flat[:, j].norm(), flat[:, j].numel()) for j in range(flat.shape[1])]
    power = {"none": 0.0, "sqrt": 0.5, "size": 1.0}[weighting]
    mean = sum(n ** power for _, n in groups) / len(groups)
    return sum(norm * n ** power / mean for norm, n in groups)


@pytest.mark.parametrize("weighting", ["none", "sqrt", "size"])
def test_group_lasso_sums_weighted_row_and_column_norms(weighting):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    net = net.double()
    got = fxmin.group_lasso(net, skip_rows=["3.weight"], weighting=weighting)
    assert torch.allclose(got, _lasso_by_hand(net, weighting, skip={"3.weight"}), rtol=1e-9)


@pytest.mark.parametrize("weighting", ["none", "sqrt", "size"])
def test_group_lasso_skips_layers_with_no_units_left(weighting):
    """A minimized model can keep a layer whose units all died (a residual block's MLP): a (0, d) or
    (d, 0) weight has no groups, and the other layers' penalty is unchanged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 4), nn.Linear(4, 3)).double()
    alone = nn.Sequential(nn.Linear(4, 3)).double()
    alone[0].load_state_dict(net[2].state_dict())
    got = fxmin.group_lasso(net, weighting=weighting)
    assert torch.allclose(got, fxmin.group_lasso(alone, weighting=weighting), rtol=1e-12)
    got.backward()
    assert net[2].weight.grad is not None


def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_mac_scaled_divides_the_criterion_by_each_weights_macs_per_entry(scope, power):
    net, x = conv_net(), torch.randn(2, 1, 8, 8)
    positions = {"0.weight": 64, "2.weight": 16, "5.weight": 1}  # per image, counted by hand
    sizes = {name: p.numel() for name, p in fxmin.prunable(net).items()}
    mean = sum(positions[n] ** power * sizes[n] for n in sizes) / sum(sizes.values())

    def by_hand(name, parameter):
        return fxmin.unit_scaled_magnitude(name, parameter) / (positions[name] ** power / mean)

    prune = fxmin.global_magnitude if scope == "global" else fxmin.layer_magnitude
    got = prune(net, 0.4, criterion=fxmin.MacScaled(example_inputs=(x,), power=power))
    expected = prune(net, 0.4, criterion=by_hand)
    assert all(torch.equal(got[n], expected[n]) for n in sizes)
    plain = prune(net, 0.4, criterion=fxmin.unit_scaled_magnitude)
    if power == 0.0:
        assert all(torch.equal(got[n], plain[n]) for n in sizes)
    elif scope == "global":  # priced per MAC, the 8x8 conv loses more and the Linear less
        assert int((~got["0.weight"]).sum()) > int((~plain["0.weight"]).sum())
        assert int((~got["5.weight"]).sum()) < int((~plain["5.weight"]).sum())


def test_mac_scaled_needs_a_model_and_inputs():
    criterion = fxmin.MacScaled(example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(fxmin.InputError, match="pass it as criterion= to global_magnitude"):
        criterion("0.weight", torch.ones(3, 3))
    with pytest.raises(fxmin.InputError, match="needs example_inputs"):
        fxmin.MacScaled(example_inputs=None)
    with pytest.raises(fxmin.InputError, match="power must be at least 0"):
        fxmin.MacScaled(example_inputs=torch.randn(1, 1, 8, 8), power=-1)
    bound = criterion.bind(conv_net())  # a plain criterion, for any other pruner
    assert bound("2.weight", conv_net()[2].weight).shape == (6, 6, 3, 3)


def _lasso_with_costs(net, weighting, costs):
    groups = []
    for name, w in fxmin.prunable(net).items():
        flat = w.detach().double().flatten(2) if w.dim() > 2 else w.detach().double().unsqueeze(-1)
        price = costs.get(name, 1.0)
        groups += [(flat[i].norm(), flat[i].numel(), price) for i in range(flat.shape[0])]
        groups += [(flat[:, j].norm(), flat[:, j].numel(), price) for j in range(flat.shape[1])]
    power = {"none": 0.0, "size": 1.0}[weighting]
    mean = sum(n ** power * c for _, n, c in groups) / len(groups)
    return sum(norm * n ** power * c / mean for norm, n, c in groups)


@pytest.mark.parametrize("weighting", ["none", "size"])
def test_group_lasso_with_costs_presses_each_tensor_by_its_price(weighting):
    net = conv_net().double()
    costs = fxmin.mac_costs(net, torch.randn(1, 1, 8, 8, dtype=torch.float64))
    got = fxmin.group_lasso(net, weighting=weighting, costs=costs)
    assert torch.allclose(got, _lasso_with_costs(net, weighting, costs), rtol=1e-9)
    partial = {"0.weight": 3.0}  # names it lacks cost 1
    assert torch.allclose(fxmin.group_lasso(net, weighting=weighting, costs=partial),
                          _lasso_with_costs(net, weighting, partial), rtol=1e-9)
    with pytest.raises(fxmin.InputError, match=r"costs name \['fc.weight'\], not parameters of Sequential"):
        fxmin.group_lasso(net, weighting=weighting, costs={"fc.weight": 2.0})


def test_group_lasso_bad_weighting_is_a_clear_error():
    with pytest.raises(fxmin.InputError, match="weighting must be 'none', 'sqrt' or 'size'"):
        fxmin.group_lasso(mlp(), weighting="cost")


def test_held_masks_keep_zeros_with_momentum_and_weight_decay():
    net = mlp()
    x, y = data(64)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):  # build momentum before masking: it would revive weights
        optimizer.zero_grad(); nn.functional.cross_entropy(net(x), y).backward(); optimizer.step()
    masks = fxmin.global_magnitude(net, 0.6)
    with fxmin.hold_masks(net, masks):  # no optimizer given: the forward hook and grad hook suffice
        for _ in range(5):
            optimizer.zero_grad(); nn.functional.cross_entropy(net(x), y).backward(); optimizer.step()
    parameters = dict(net.named_parameters())
    for name, mask in masks.items():
        assert (parameters[name][~mask] == 0).all()
        assert (parameters[name][mask] != 0).all()
    # hooks are gone after the block: training moves the zeros again
    optimizer.zero_grad(); nn.functional.cross_entropy(net(x), y).backward(); optimizer.step()
    assert (parameters["0.weight"][~masks["0.weight"]] != 0).any()


# ------------------------------------------------------------------------------------ release
def test_release_calibrates_sigma_below_tolerance_and_copies():
    net = mlp()
    masks = fxmin.global_magnitude(net, 0.5)
    net = masked_copy(net, masks)
    before = copy.deepcopy(net.state_dict())
    x, _ = data(128)
    out = fxmin.release(net, x, alpha=0.5, tolerance=1e-3, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # input untouched
    assert out.change < 1e-3
    with torch.no_grad():
        change = float((out.module(x) - net(x)).norm() / net(x).norm())
    assert change == pytest.approx(out.change, rel=1e-4)
    parameters = dict(out.module.named_parameters())
    for name, mask in masks.items():
        assert out.zeros[name] == int((~mask).sum())
        assert 0 < out.sigmas[name] <= 0.5 * float(net.get_parameter(name).detach()[mask].std())
        assert (parameters[name] != 0).all()
    # a looser tolerance keeps a larger sigma
    loose = fxmin.release(net, x, alpha=0.5, tolerance=1.0, generator=torch.Generator().manual_seed(0))
    assert loose.sigmas["0.weight"] == pytest.approx(0.5 * float(net[0].weight.detach()[masks["0.weight"]].std()), rel=1e-5)


# ------------------------------------------------------------------------- minimize, twice
def test_a_minimized_module_minimizes_again_with_new_parameter_names():
    net = mlp()
    masks = fxmin.global_magnitude(net, 0.5)
    masks["0.weight"][:, :6] = False  # drop 6 inputs: minimize adds an input selection
    masks["0.weight"][:10] = False  # and 10 hidden units
    x = data(8)[0]
    first = fxmin.minimize(net, masks, (x,)).module
    assert fxmin.count_parameters(first) < fxmin.count_parameters(net)
    second_masks = fxmin.global_magnitude(first, 0.5)
    second_masks["0.weight"][:, :3] = False
    second = fxmin.minimize(first, second_masks, (x,)).module
    selections = [n for n in second.graph.nodes if n.target is torch.index_select]
    assert len(selections) == 1  # the new input selection composes with the first one
    assert fxmin.count_parameters(second) < fxmin.count_parameters(first)
    assert_equivalent(masked_copy(first, second_masks), second, (x,))


# ------------------------------------------------------------------------------------ the loop
def fit(model, x, y, steps, batch=None):
    """``steps`` Adam steps (lr 1e-2) on cross entropy: on all of ``(x, y)``, or on ``batch`` rows drawn
    from torch's global RNG at each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,)) if batch else slice(None)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def make_callbacks(x, y, crash_at=None):
    calls = []

    def train(model, step):
        calls.append((step.phase, step.cycle))
        if crash_at is not None and step.cycle == crash_at:
            raise RuntimeError("simulated crash")
        fit(model, x, y, step.epochs * 10)

    def evaluate(model):
        return {"accuracy": accuracy(model, x, y), "loss": 0.0}

    return train, evaluate, calls


def trained_mlp(x, y):
    net = mlp()
    train, _, _ = make_callbacks(x, y)
    train(net, fxmin.TrainStep("dense", 0, 10))
    return net.eval()


def test_squeeze_release_shrinks_checkpoints_and_resumes(tmp_path):
    x, y = data(300)
    net = trained_mlp(x, y)
    before = copy.deepcopy(net.state_dict())
    train, evaluate, calls = make_callbacks(x, y, crash_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3, amount=0.5,
                              criterion=fxmin.unit_scaled_magnitude, tolerance=0.2, patience=3,
                              checkpoint_dir=str(tmp_path), progress=False)
    assert latest_checkpoint(str(tmp_path)).endswith("cycle_001.pt")  # cycle 1 survived the crash
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

    train, evaluate, calls = make_callbacks(x, y)
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3,
                                   amount=0.5, criterion=fxmin.unit_scaled_magnitude, tolerance=0.2, patience=3,
                                   checkpoint_dir=str(tmp_path), resume=True,
                                   progress=False)
    assert calls[0] == ("squeeze", 2)  # continued at cycle 2, not from scratch
    assert [r.cycle for r in result.history] == [0, 1, 2, 3]
    assert latest_checkpoint(str(tmp_path)).endswith("cycle_003.pt")
    params = [r.params for r in result.history]
    assert params[-1] < params[1] < params[0] == fxmin.count_parameters(net)
    for record in result.history[1:]:
        assert record.compression == pytest.approx(params[0] / record.params)
        assert record.time_s > 0 and record.sigma > 0 and record.released > 0 and "loss" in record.metrics
    best = result.history[result.best_cycle]
    assert best.accuracy >= result.baseline - 0.2
    assert fxmin.count_parameters(result.module) == best.params
    assert result.scores() == (best.accuracy, best.metrics)  # no finishing: as measured in its cycle
    assert "compression" in result.table() and "best" in result.table()
    state = load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert state["cycle"] == 3 and len(state["history"]) == 4
    with torch.no_grad():  # the checkpointed module runs
        assert state["module"](x[:4]).shape == (4, 3)


def test_cycles_without_release_keep_zeros_and_stop_below_tolerance():
    x, y = data(300)
    net = trained_mlp(x, y)
    train, evaluate, calls = make_callbacks(x, y)
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=6,
                                   amount=0.9, tolerance=0.0, release_zeros=False, progress=False,
                                   baseline=1.01)  # nothing can reach it: stops after the first cycle
    assert [r.cycle for r in result.history] == [0, 1] and result.stopped
    assert result.best_cycle == 0 and result.history[1].sigma == 0.0
    assert ("recover", 1) in calls


def finish_callbacks(x, y, finished_scores):
    """train marks a model finished; evaluate gives 0.6 before and the next of ``finished_scores`` after."""
    calls, scores = [], list(finished_scores)

    def train(model, step):
        calls.append((step.phase, step.cycle))
        if step.phase == "finish":
            model.finished_score = scores.pop(0)
        else:
            assert not hasattr(model, "finished_score")  # finishing never leaks into the cycles

    def evaluate(model):
        return getattr(model, "finished_score", 0.6)

    return train, evaluate, calls


@pytest.mark.parametrize("scores, chosen", [([0.95], 0), ([0.8, 0.97], 1)])
def test_finish_trains_the_smallest_candidates_until_one_is_within_tolerance(scores, chosen, tmp_path):
    x, y = data(200)
    net = trained_mlp(x, y)
    train, evaluate, calls = finish_callbacks(x, y, scores)
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3,
                                   amount=0.5, criterion=fxmin.unit_scaled_magnitude, baseline=1.0, tolerance=0.5,
                                   finish_epochs=2, finish_tolerance=0.1, finish_candidates=3, finish_spacing=1.0,
                                   progress=False, checkpoint_dir=str(tmp_path))
    finishes = [c for c in calls if c[0] == "finish"]
    assert len(result.finished) == len(finishes) == chosen + 1
    records = result.finished
    assert [r.accepted for r in records] == [False] * chosen + [True]
    by_size = sorted(result.history[1:], key=lambda r: (r.params, -r.accuracy))
    assert [r.cycle for r in records] == [r.cycle for r in by_size[:chosen + 1]]  # smallest first
    assert result.best_cycle == records[-1].cycle and records[-1].accuracy == scores[-1]
    assert fxmin.count_parameters(result.module) == records[-1].params == result.history[result.best_cycle].params
    assert result.module.finished_score == scores[-1] and not result.stopped
    assert result.scores() == (scores[-1], {})  # the returned model's accuracy after finishing
    assert "before" in result.finish_table() and "best" in result.finish_table()
    state = load_checkpoint(latest_checkpoint(str(tmp_path)))  # the pool: up to 4 x 3 smallest accepted
    assert sorted(c for c, _ in state["candidates"]) == sorted(r.cycle for r in by_size[:12])


def test_finish_without_a_passing_candidate_returns_the_most_accurate_and_says_so():
    x, y = data(200)
    net = trained_mlp(x, y)
    train, evaluate, calls = finish_callbacks(x, y, [0.7, 0.85])
    with pytest.warns(UserWarning, match="no candidate within 0.1"):
        result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3,
                                       amount=0.5, baseline=1.0, tolerance=0.5, finish_epochs=1,
                                       finish_tolerance=0.1, finish_candidates=2, progress=False)
    assert [r.accepted for r in result.finished] == [False, False]
    assert result.best_cycle == result.finished[1].cycle and result.module.finished_score == 0.85
    assert result.scores()[0] == 0.85
    assert "no candidate" in result.stopped
    with pytest.raises(fxmin.InputError, match="finish_candidates must be at least 1"):
        fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), finish_epochs=1,
                              finish_candidates=0, progress=False)


def noisy_finish_callbacks(x, y, crash_in_finish=None):
    """Real training whose minibatches are drawn from torch's global RNG (so a resume that does not
    restore it diverges); ``crash_in_finish``: raise in that finishing training (1 = the first)."""
    calls = []

    def train(model, step):
        calls.append((step.phase, step.cycle))
        if step.phase == "finish" and sum(c[0] == "finish" for c in calls) == crash_in_finish:
            raise RuntimeError("simulated crash")
        fit(model, x, y, int(step.epochs * 5), batch=64)

    return train, lambda model: accuracy(model, x, y), calls


def test_a_crash_while_finishing_loses_only_that_candidate_and_resume_gives_the_uninterrupted_result(tmp_path):
    x, y = data(300)
    net = trained_mlp(x, y)
    # nothing reaches 1.01 - 0.0: all three candidates are finished, the most accurate is returned
    options = dict(example_inputs=(x[:16],), cycles=3, amount=0.5, criterion=fxmin.unit_scaled_magnitude,
                   baseline=1.01, tolerance=0.5, finish_epochs=2, finish_tolerance=0.0, finish_candidates=3,
                   finish_spacing=1.0, progress=False)
    train, evaluate, _ = noisy_finish_callbacks(x, y)
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="no candidate"):
        whole = fxmin.squeeze_release(net, train=train, evaluate=evaluate, checkpoint_dir=str(tmp_path / "whole"),
                                      **options)
    assert len(whole.finished) == 3

    folder = str(tmp_path / "crashed")
    train, evaluate, _ = noisy_finish_callbacks(x, y, crash_in_finish=2)
    torch.manual_seed(7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fxmin.squeeze_release(net, train=train, evaluate=evaluate, checkpoint_dir=folder, **options)
    saved = load_checkpoint(fxmin.cycle.finish_checkpoint(folder))
    assert [e["cycle"] for e in saved["entries"]] == [whole.finished[0].cycle] and saved["chosen"] is None
    assert fxmin.cycle.load_finished(folder) is None  # the phase did not end

    train, evaluate, calls = noisy_finish_callbacks(x, y)
    with pytest.warns(UserWarning, match="no candidate"):
        resumed = fxmin.squeeze_release(net, train=train, evaluate=evaluate, checkpoint_dir=folder, resume=True,
                                        **options)
    assert calls == [("finish", r.cycle) for r in whole.finished[1:]]  # the first candidate was not trained again
    assert [(r.cycle, r.params, r.accuracy) for r in resumed.finished] == \
        [(r.cycle, r.params, r.accuracy) for r in whole.finished]
    assert resumed.best_cycle == whole.best_cycle and resumed.stopped == whole.stopped
    for (name, a), (_, b) in zip(resumed.module.state_dict().items(), whole.module.state_dict().items()):
        assert torch.equal(a, b), name  # the same weights as the run that never crashed

    # the phase is over: the checkpoint names the chosen model, and a resume returns it without training
    saved = load_checkpoint(fxmin.cycle.finish_checkpoint(folder))
    assert saved["chosen"] == whole.best_cycle and len(saved["entries"]) == 3
    cycle, chosen = fxmin.cycle.load_finished(folder)
    assert cycle == whole.best_cycle
    assert all(torch.equal(a, b) for a, b in zip(chosen.state_dict().values(), whole.module.state_dict().values()))
    train, evaluate, calls = noisy_finish_callbacks(x, y)
    with pytest.warns(UserWarning, match="no candidate"):
        again = fxmin.squeeze_release(net, train=train, evaluate=evaluate, checkpoint_dir=folder, resume=True,
                                      **options)
    assert calls == [] and again.best_cycle == whole.best_cycle
    # a looser finish_tolerance on resume re-judges the finished candidates: the first now passes, untrained
    passing = whole.finished[0].accuracy
    train, evaluate, calls = noisy_finish_callbacks(x, y)
    loose = fxmin.squeeze_release(net, train=train, evaluate=evaluate, checkpoint_dir=folder, resume=True,
                                  **{**options, "finish_tolerance": 1.01 - passing})
    assert calls == [] and loose.best_cycle == whole.finished[0].cycle and loose.finished[0].accepted
    # other finish_epochs: the saved candidates were trained for another budget, so they are trained again
    train, evaluate, calls = noisy_finish_callbacks(x, y)
    with pytest.warns(UserWarning, match="no candidate"):
        fxmin.squeeze_release(net, train=train, evaluate=evaluate, checkpoint_dir=folder, resume=True,
                              **{**options, "finish_epochs": 1})
    assert calls == [("finish", r.cycle) for r in whole.finished]


def test_finish_candidates_are_spaced_in_size():
    x, y = data(200)
    net = trained_mlp(x, y)
    train, evaluate, calls = finish_callbacks(x, y, [0.0] * 6)
    with pytest.warns(UserWarning):
        result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=6,
                                       amount=0.3, baseline=1.0, tolerance=0.5, finish_epochs=1, finish_tolerance=0.1,
                                       finish_candidates=6, finish_spacing=1.1, progress=False)
    sizes = [r.params for r in result.finished]
    assert len(sizes) >= 2 and sizes[0] == min(r.params for r in result.history[1:])
    assert all(b >= 1.1 * a for a, b in zip(sizes, sizes[1:]))  # each clearly larger than the last
    assert len(sizes) < len(result.history) - 1  # near twins were passed over (all 6 cycles were accepted)


def test_finish_spacing_is_chosen_from_all_small_candidates_not_as_the_loop_goes():
    """A model crowded out of a spaced list by a later, smaller twin must still be available."""
    from fxmin.cycle.finishing import CycleRecord, _pool, _spaced
    sizes = [10_000, 6_604, 5_544, 5_295, 5_216, 4_650] + [4_450, 4_404] * 10  # then it lingers
    history = [CycleRecord(c, p, 1.0, 0.9 + 0.001 * c, 0.5, 0.0, 0, 0.0, True) for c, p in enumerate(sizes)]
    pool = []
    for cycle in range(1, len(sizes)):
        pool = _pool(pool + [(cycle, None)], history, 1.1, 12)
    chosen = [history[c].params for c, _ in _spaced(pool, history, 1.1, 3)]
    assert chosen[0] in (4_404, 4_450) and chosen[1:] == [5_216, 6_604]  # the twins fill one band only
    assert len({history[c].params for c, _ in pool}) == len(pool)


def test_min_amount_stops_a_loop_that_backs_off_to_nothing():
    x, y = data(200)
    net = trained_mlp(x, y)
    train, evaluate, calls = make_callbacks(x, y)
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=10,
                                   amount=0.5, baseline=2.0, tolerance=0.0, backoff=0.5, patience=10,
                                   min_amount=0.1, progress=False)  # every cycle misses: 0.5, 0.25, 0.125
    assert len(result.history) == 4 and "below min_amount" in result.stopped


def test_time_budget_starts_no_cycle_that_would_overrun_it_and_resume_goes_on(tmp_path):
    import time

    x, y = data(200)
    net = trained_mlp(x, y)
    train, evaluate, calls = make_callbacks(x, y)

    def slow_train(model, step):  # every training call takes at least 0.3 s: a cycle (two calls) >= 0.6 s
        time.sleep(0.3)
        train(model, step)

    options = dict(train=slow_train, evaluate=evaluate, example_inputs=(x[:16],), cycles=5, amount=0.3,
                   tolerance=1.0, progress=False, checkpoint_dir=str(tmp_path))
    # cycle 1 starts (nothing measured yet); cycle 2 would end near 1.2 s, past the 1 s budget
    result = fxmin.squeeze_release(net, time_budget=1.0, **options)
    assert [r.cycle for r in result.history] == [0, 1]
    assert result.stopped.startswith("cycle 2: time budget of 1 s reached")
    resumed = fxmin.squeeze_release(net, time_budget=100, resume=True, **options)
    assert [r.cycle for r in resumed.history] == [0, 1, 2, 3, 4, 5] and not resumed.stopped
    with pytest.raises(fxmin.InputError, match="time_budget must be a positive number of seconds"):
        fxmin.squeeze_release(net, time_budget=0, **options)


def test_finish_pool_tolerance_admits_near_misses_that_pass_once_finished():
    """A cycle the search rejected (0.6 < 1.0 - 0.3) but within the pool tolerance is finished first:
    it is the smallest, and the loop went on from the last accepted model, never from it."""
    x, y = data(200)
    net = trained_mlp(x, y)
    calls, finished_scores = [], [0.95]

    def train(model, step):
        calls.append((step.phase, step.cycle))
        if step.phase == "finish":
            model.finished_score = finished_scores.pop(0)

    def evaluate(model):  # cycle 1 is accepted (0.8), every later cycle a near miss (0.6)
        return getattr(model, "finished_score", 0.8 if len(calls) <= 2 else 0.6)

    kwargs = dict(train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3, amount=0.5,
                  criterion=fxmin.unit_scaled_magnitude, baseline=1.0, tolerance=0.3, finish_epochs=1,
                  finish_tolerance=0.1, finish_spacing=1.0, progress=False)
    result = fxmin.squeeze_release(net, finish_pool_tolerance=0.45, backoff=0.5, patience=3, **kwargs)
    assert [r.accepted for r in result.history[1:]] == [True, False, False]
    smallest_miss = min(result.history[2:], key=lambda r: (r.params, -r.accuracy))
    assert smallest_miss.params < result.history[1].params
    assert result.finished[0].cycle == smallest_miss.cycle and result.finished[0].accepted
    assert result.best_cycle == smallest_miss.cycle and result.module.finished_score == 0.95
    assert fxmin.count_parameters(result.module) == smallest_miss.params
    assert "best (over tol. in the search)" in result.table()
    # without it only the accepted cycle is a candidate
    calls.clear()
    finished_scores[:] = [0.95]
    plain = fxmin.squeeze_release(net, backoff=0.5, patience=3, **kwargs)
    assert [r.cycle for r in plain.finished] == [1]
    with pytest.raises(fxmin.InputError, match="finish_pool_tolerance .* must be at least tolerance"):
        fxmin.squeeze_release(net, finish_pool_tolerance=0.1, **kwargs)


def test_finish_evaluate_judges_the_finishing_phase_against_its_own_baseline(tmp_path):
    """The search runs on evaluate's split; the finishing decision, its baseline and the reported
    score come from finish_evaluate (held-out data the search never saw)."""
    x, y = data(200)
    net = trained_mlp(x, y).train()
    seen = []

    def train(model, step):
        if step.phase == "finish":
            model.finished = True

    def evaluate(model):
        seen.append("search")
        return 0.9

    def held_out(model):  # the input model scores 0.8 here; a finished candidate 0.75 (within 0.1)
        seen.append("held-out")
        if not getattr(model, "finished", False):
            return {"accuracy": 0.8 if fxmin.count_parameters(model) == fxmin.count_parameters(net) else 0.5}
        return {"accuracy": 0.75, "split": "held-out"}

    kwargs = dict(train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=2, amount=0.5,
                  criterion=fxmin.unit_scaled_magnitude, tolerance=0.05, finish_epochs=1, finish_tolerance=0.1,
                  progress=False)
    result = fxmin.squeeze_release(net, finish_evaluate=held_out, checkpoint_dir=str(tmp_path), **kwargs)
    assert result.baseline == 0.9 and result.finish_baseline == 0.8
    assert result.finished[0].before == 0.5 and result.finished[0].accuracy == 0.75 and result.finished[0].accepted
    assert result.scores() == (0.75, {"split": "held-out"})
    assert seen.count("held-out") == 1 + 2 * len(result.finished)  # the baseline, each candidate before/after
    assert not hasattr(net, "finished") and net.training  # the input model is untouched
    assert load_checkpoint(latest_checkpoint(str(tmp_path)))["finish_baseline"] == 0.8
    # judged by the search's evaluate, 0.75 would be 0.15 below its 0.9 baseline: a warning, no pass
    with pytest.warns(UserWarning, match="no candidate within 0.1"):
        plain = fxmin.squeeze_release(net, finish_evaluate=None, **{**kwargs, "evaluate": lambda m: (
            0.75 if getattr(m, "finished", False) else 0.9)})
    assert plain.finish_baseline == 0.9 and not any(f.accepted for f in plain.finished)


def test_squeeze_release_prices_a_mac_scaled_criterion_on_each_cycles_model():
    """The model changes every cycle (minimized, sometimes renamed): a MacScaled criterion is bound to
    the model each cycle prunes, never to the one it started from."""
    x, y = data()
    net, pruned = trained_mlp(x, y), []

    class Recording(fxmin.MacScaled):
        def bind(self, model):
            pruned.append((fxmin.count_parameters(model), sorted(fxmin.prunable(model))))
            return super().bind(model)

    train, evaluate, _ = make_callbacks(x, y)
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:8],), cycles=2,
                                   amount=0.5, tolerance=1.0, criterion=Recording(example_inputs=(x[:8],)),
                                   progress=False)
    assert len(result.history) == 3 and len(pruned) == 2
    assert pruned[0] == (fxmin.count_parameters(net), sorted(fxmin.prunable(net)))
    assert pruned[1][0] == result.history[1].params < pruned[0][0]  # the first cycle's minimized model
    # the history counts each cycle's MACs on example_inputs, as fxmin.flops does
    assert result.history[0].macs == fxmin.flops(net, (x[:8],)).macs
    assert result.history[result.best_cycle].macs == fxmin.flops(result.module, (x[:8],)).macs
    assert result.history[result.best_cycle].macs < result.history[0].macs
    assert "| MACs " in result.table() and f"{result.history[0].macs:,}" in result.table()
