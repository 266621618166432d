"""verify="quick": the model's dtype end to end plus the analysis's constants checked in the reference's run
(NOTE [Verification levels] in fxmin/verify.py, NOTE [Constants checked in a run] in fxmin/fact_check.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxmin
from fxmin.facts import ValueFact
from fxmin.rules.kit import pointwise_forward
from fxmin.verify import TOLERANCES
from fxmin.zoo import planted
from fxmin.zoo.catalog import MODELS
from fxmin.zoo.masks import random_masks
from helpers import SigmoidNet


def _sigmoid_net(seed: int = 2):
    """fc1's unit 2 has no input: const(b) before the sigmoid, const(sigmoid(b)) after it, folded into fc2."""
    torch.manual_seed(seed)
    model = SigmoidNet()
    masks = {"fc1.weight": torch.ones(5, 6, dtype=torch.bool)}
    masks["fc1.weight"][2] = False
    return model, masks, (torch.randn(4, 6),)


def _sigmoid_off_by(delta: float):
    """A sigmoid rule whose constants are ``delta`` off what the op computes."""
    def forward(ctx):
        fact, units = pointwise_forward(ctx)
        value = np.where(fact.const, fact.value + delta, 0.0)
        return ValueFact.constants(fact.axis, fact.const, value), units
    good = fxmin.REGISTRY.modules[nn.Sigmoid]
    return fxmin.Rule("sigmoid off by a constant", forward, good.backward, good.plan)


def test_quick_runs_the_model_dtype_only_and_checks_the_folded_constant():
    model, masks, inputs = _sigmoid_net()
    report = fxmin.minimize(model, masks, inputs, verify="quick").report
    verification = report.verification
    assert verification.ok and verification.level == "quick"
    assert verification.dtypes == [torch.float32]
    assert [c.inputs for c in verification.comparisons] == ["example"]
    # fc1's output and the sigmoid's each hold one constant channel: unit 2
    assert (verification.constants.nodes, verification.constants.channels) == (2, 1 + 1)
    assert report.params_after == 4 * 6 + 4 + 4 * 4 + 4 + 2 * 4 + 2
    text = "\n".join(verification.lines())
    assert "on 1 input set (the example inputs)" in text and "not compared in float64" in text
    assert "constants 2 channels at 2 nodes" in text


def test_quick_with_random_sets_when_asked():
    model, masks, inputs = _sigmoid_net()
    verification = fxmin.minimize(model, masks, inputs, verify="quick", trials=2).report.verification
    assert [c.inputs for c in verification.comparisons] == ["example", "random #1", "random #2"]
    assert (verification.constants.nodes, verification.constants.channels) == (2, 2)  # in each run, counted once


def test_full_stays_the_default():
    model, masks, inputs = _sigmoid_net()
    verification = fxmin.minimize(model, masks, inputs).report.verification
    assert verification.level == "full" and verification.constants is None
    assert verification.dtypes == [torch.float64, torch.float32] and len(verification.comparisons) == 6


def test_a_wrong_constant_is_caught_where_it_arises_even_when_the_outputs_hide_it(monkeypatch):
    """fc2 reads the wrong constant through a column scaled to 1e-9: the outputs move by far less than
    float32's tolerance, but the sigmoid's value is checked against the constant the analysis took."""
    model, masks, inputs = _sigmoid_net()
    with torch.no_grad():
        model.fc2.weight[:, 2] *= 1e-9
    monkeypatch.setitem(fxmin.REGISTRY.modules, nn.Sigmoid, _sigmoid_off_by(0.25))
    with pytest.raises(fxmin.EquivalenceError) as caught:
        fxmin.minimize(model, masks, inputs, verify="quick")
    error = caught.value
    assert error.node == "act"
    assert "node 'act'" in str(error) and "channel 2 was taken for the constant" in str(error)
    assert "barriers=['act']" in str(error)
    assert not error.report.constants.ok
    # the end-to-end float32 comparison alone passed
    assert all(c.ok for c in error.report.comparisons)


def test_quick_does_not_see_an_error_under_the_dtype_tolerance_and_full_does(monkeypatch):
    """What the report says quick leaves unseen: a constant 1e-6 off passes the float32 checks and fails float64."""
    model, masks, inputs = _sigmoid_net()
    monkeypatch.setitem(fxmin.REGISTRY.modules, nn.Sigmoid, _sigmoid_off_by(1e-6))
    quick = fxmin.minimize(model, masks, inputs, verify="quick").report.verification
    assert quick.ok and 0 < quick.constants.max_relative_error < 1e-4
    with pytest.raises(fxmin.EquivalenceError) as caught:
        fxmin.minimize(model, masks, inputs, verify="full")
    assert caught.value.report.failures()[0].dtype == torch.float64


def test_a_wrong_result_fails_the_end_to_end_comparison():
    """A result that computes something else (a weight changed after the rewrite): quick raises and
    names the first divergent node."""
    model, masks, inputs = _sigmoid_net()
    result = fxmin.minimize(model, masks, inputs, verify=False)
    with torch.no_grad():
        result.module.fc3.weight.add_(0.5)
    with pytest.raises(fxmin.EquivalenceError) as caught:
        fxmin.verify(result.reference, result.module, inputs, level="quick", plan=result.plan)
    assert caught.value.node == "fc3"
    assert caught.value.report.failures()[0].dtype == torch.float32


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quick_passes_on_every_zoo_model(name):
    factory, example_inputs = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    masks = random_masks(model, 0.5, seed=0)
    full = fxmin.minimize(model, masks, example_inputs(), verify="full")
    quick = fxmin.minimize(model, masks, example_inputs(), verify="quick")
    assert quick.report.verification.ok
    assert quick.report.params_after == full.report.params_after
    x = example_inputs()
    with torch.no_grad():
        assert torch.equal(quick.module(*x), full.module(*x))  # the same result; only the check differs


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("make", [planted.planted_resnet18, planted.planted_mobilenet_v2, planted.planted_efficientnet])
def test_quick_checks_the_planted_constants(make, frontend):
    model, masks, inputs, _ = make()
    verification = fxmin.minimize(model, masks, inputs, frontend=frontend, verify="quick").report.verification
    assert verification.ok and verification.constants.channels >= 1


def test_quick_on_a_bfloat16_model():
    model, masks, inputs = _sigmoid_net()
    model, inputs = model.to(torch.bfloat16), tuple(x.to(torch.bfloat16) for x in inputs)
    verification = fxmin.minimize(model, masks, inputs, verify="quick").report.verification
    assert verification.ok and verification.dtypes == [torch.bfloat16]
    assert verification.tolerance(torch.bfloat16) == TOLERANCES[torch.bfloat16]


@pytest.mark.parametrize("verify, trials, expected", [
    ("fast", None, "verify must be True, False or a level ('full', 'quick'), got 'fast'"),
    (None, None, "verify must be True, False or a level"),
    ("quick", -1, "trials must be a whole number of random input sets (0 or more), got -1"),
    ("full", True, "got True"),
])
def test_bad_verification_options_fail_before_the_pass(verify, trials, expected, monkeypatch):
    model, masks, inputs = _sigmoid_net()
    import sys
    monkeypatch.setattr(sys.modules["fxmin.minimize"], "prepare", lambda *a, **k: pytest.fail("the pass started"))
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(model, masks, inputs, verify=verify, trials=trials)
    assert expected in str(caught.value)


def test_constants_of_a_channel_axis_split_over_heads():
    """NOTE [Heads]: channel c of a (batch, heads, tokens, head_dim) tensor is at (heads, head_dim) digits
    (c // 5, c % 5); the check reads each claimed channel there, and names the one that does not hold."""
    from fxmin.fact_check import ConstantCheck, observer

    value = torch.randn(2, 3, 4, 5)
    const = np.zeros(15, bool)
    const[[0, 7, 14]] = True
    expected = np.zeros(15)
    expected[7], expected[14] = 1.5, -2.0
    value[:, 0, :, 0], value[:, 1, :, 2], value[:, 2, :, 4] = 0.0, 1.5, -2.0  # channels 0, 7, 14
    fact = ValueFact(1, 15, const, expected, inner=((3, 5),))
    node = torch.fx.Graph().placeholder("heads")
    check = ConstantCheck(1e-4)
    observer({node: fact}, check)(node, value)
    assert check.ok and (check.nodes, check.channels, check.max_relative_error) == (1, 3, 0.0)
    value[1, 1, 3, 2] = 1.25  # channel 7 at one position
    observer({node: fact}, check)(node, value)
    assert len(check.failures) == 1 and check.failures[0][0] is node
    assert "channel 7 was taken for the constant 1.5" in check.failures[0][1] and "0.25 away" in check.failures[0][1]
    check = ConstantCheck(1e-4)
    observer({node: fact}, check)(node, value.transpose(1, 2))  # (2, 4, 3, 5): not the fact's tensor
    assert "the analysis followed 15 channels on axis 1" in check.failures[0][1]


@pytest.mark.parametrize("name", ["convnext", "gpt"])
def test_quick_through_torch_export(name):
    """The export front end's graph is the one the constants are checked in (its facts, its node names)."""
    factory, example_inputs = MODELS[name]
    torch.manual_seed(1)
    model = factory().eval()
    masks = random_masks(model, 0.5, seed=1)
    quick = fxmin.minimize(model, masks, example_inputs(), frontend="export", verify="quick")
    assert quick.frontend == "export" and quick.report.verification.ok
    assert quick.report.verification.constants is not None
    full = fxmin.minimize(model, masks, example_inputs(), frontend="export")
    assert quick.report.params_after == full.report.params_after
