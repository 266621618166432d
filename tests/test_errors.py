"""Every error of issue 2 says what went wrong, where, and how to get out of it."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxmin
from helpers import SigmoidNet, check_minimize


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


# -- masks ----------------------------------------------------------------------------------


def test_mask_for_unknown_parameter_names_it_and_suggests_close_names():
    with pytest.raises(fxmin.MaskError) as caught:
        fxmin.minimize(Net(), {"fc1.weigth": torch.ones(5, 6)}, (torch.randn(2, 6),))
    message = str(caught.value)
    assert "'fc1.weigth'" in message
    assert "Did you mean" in message and "'fc1.weight'" in message


def test_mask_of_wrong_shape_names_both_shapes():
    with pytest.raises(fxmin.MaskError) as caught:
        fxmin.minimize(Net(), {"fc2.weight": torch.ones(5, 2)}, (torch.randn(2, 6),))
    message = str(caught.value)
    assert "'fc2.weight'" in message and "(5, 2)" in message and "(2, 5)" in message


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0])
def test_mask_that_is_not_zero_one_is_refused(bad):
    mask = torch.ones(5, 6)
    mask[1, 2] = bad
    with pytest.raises(fxmin.MaskError) as caught:
        fxmin.minimize(Net(), {"fc1.weight": mask}, (torch.randn(2, 6),))
    message = str(caught.value)
    assert "'fc1.weight'" in message and "0/1" in message and repr(bad) in message


def test_mask_errors_are_value_errors_and_fxmin_errors():
    with pytest.raises(ValueError):
        fxmin.minimize(Net(), {"nope": torch.ones(1)}, (torch.randn(2, 6),))
    assert issubclass(fxmin.MaskError, fxmin.FxminError)


# -- tracing ---------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:  # control flow on data: FX cannot trace it
            h = torch.relu(h)
        return self.fc2(h)


def test_untraceable_model_says_what_fx_said_and_the_ways_out():
    with pytest.raises(fxmin.TraceError) as caught:
        fxmin.minimize(DataDependent(), None, (torch.randn(2, 6),))
    message = str(caught.value)
    assert "DataDependent" in message
    assert "symbolically traced variables cannot be used as inputs to control flow" in message  # FX's words
    for way_out in ("leaf_modules", "concrete_args", "tracer"):
        assert way_out in message
    assert isinstance(caught.value.__cause__, Exception)  # chained from FX's error


# -- missing rules and barriers -------------------------------------------------------------------


class WithSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 2)
        self.head = nn.Sequential(nn.Softmin(dim=1))

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        return self.fc2(self.head(self.fc1(h)))


def _softmax_masks():
    masks = {"fc0.weight": torch.ones(5, 6, dtype=torch.bool), "fc1.weight": torch.ones(4, 5, dtype=torch.bool)}
    masks["fc0.weight"][0] = False  # away from the softmax: still folded
    masks["fc1.weight"][1] = False  # feeds the softmax: must stay
    return masks


def test_op_without_rule_raises_missing_rule_error_naming_node_module_type_and_line():
    with pytest.raises(fxmin.MissingRuleError) as caught:
        fxmin.minimize(WithSoftmax(), _softmax_masks(), (torch.randn(3, 6),))
    error = caught.value
    message = str(error)
    assert error.node_name == "head_0"
    assert "'head_0'" in message
    assert "module 'head.0'" in message and "torch.nn.modules.activation.Softmin" in message
    assert "test_errors.py" in message and "self.head(self.fc1(h))" in message  # the user's source line
    assert "barriers=" in message and "rule" in message


def test_functional_op_without_rule_names_the_function_and_line():
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc2(torch.logcumsumexp(self.fc1(x), dim=1))

    with pytest.raises(fxmin.MissingRuleError) as caught:
        fxmin.minimize(Cumulative(), None, (torch.randn(3, 6),))
    message = str(caught.value)
    assert caught.value.node_name == "logcumsumexp"
    assert "logcumsumexp" in message and "torch.logcumsumexp(self.fc1(x), dim=1)" in message
    assert re.search(r"test_errors\.py\", line \d+", message)


@pytest.mark.parametrize("barrier", ["head", "head.0", "head_0", nn.Softmin])
def test_barriers_keep_channels_around_an_op_without_rule(barrier):
    torch.manual_seed(0)
    # fc0 4x6+4 = 28 (unit 0 folded); fc1 4x4+4 = 20 (all 4 outputs kept for the softmax); fc2 2x4+2 = 10
    check_minimize(WithSoftmax(), _softmax_masks(), (torch.randn(3, 6),), expected_params=58, barriers=[barrier])


# -- example inputs ------------------------------------------------------------------------------


def test_conv_first_model_without_example_inputs_asks_for_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(model, None)
    message = str(caught.value)
    assert "example_inputs" in message and "required" in message


def test_linear_first_model_infers_example_inputs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[3] = False
    result = fxmin.minimize(model, {"1.weight": mask})
    assert result.example_inputs[0].shape[1:] == (6,)
    assert fxmin.count_parameters(result.module) == 4 * 6 + 4 + 2 * 4 + 2
    assert result.report.verification.ok


def test_wrong_number_of_example_inputs():
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(Net(), None, (torch.randn(2, 6), torch.randn(2, 6)))
    assert "1 input" in str(caught.value) and "2 example input" in str(caught.value)


def test_example_inputs_of_wrong_shape():
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(Net(), None, (torch.randn(2, 7),))
    assert "(2, 7)" in str(caught.value)


# -- equivalence errors ------------------------------------------------------------------------------


def _wrong_sigmoid_forward(ctx):
    """Deliberately wrong: claims sigmoid(c) == c for constant channels."""
    x = ctx.arg(0, "input")
    return ctx.fact(x), ctx.units(x)


def test_equivalence_error_names_the_first_divergent_node(monkeypatch):
    torch.manual_seed(2)
    model = SigmoidNet()
    masks = {"fc1.weight": torch.ones(5, 6, dtype=torch.bool)}
    masks["fc1.weight"][2] = False  # const(b) -> wrongly folded as b instead of sigmoid(b)
    good = fxmin.REGISTRY.modules[nn.Sigmoid]
    wrong = fxmin.Rule("wrong sigmoid", _wrong_sigmoid_forward, good.backward, good.plan)
    monkeypatch.setitem(fxmin.REGISTRY.modules, nn.Sigmoid, wrong)
    with pytest.raises(fxmin.EquivalenceError) as caught:
        fxmin.minimize(model, masks, (torch.randn(4, 6),))
    error = caught.value
    assert error.node == "fc2"  # sigmoid's kept channels agree; fc2 is where the wrong fold shows
    assert "'fc2'" in str(error) and "barriers" in str(error)
    assert error.report is not None and not error.report.ok
    assert isinstance(error, fxmin.FxminError)
    # verify=False returns the wrong module without complaint: verification is what caught it
    wrong_result = fxmin.minimize(model, masks, (torch.randn(4, 6),), verify=False)
    x = torch.randn(3, 6)
    assert not torch.allclose(wrong_result.module(x), fxmin.masked_reference(model, masks)[0](x))
    monkeypatch.undo()
    assert fxmin.REGISTRY.modules[nn.Sigmoid] is good
    check_minimize(model, masks, (torch.randn(4, 6),), expected_params=4 * 6 + 4 + 4 * 4 + 4 + 2 * 4 + 2)


def test_equivalence_error_from_a_wrong_rule_in_a_private_registry():
    """A private Registry copy with a wrong rule; the analysis uses it, verification rejects it."""
    import copy

    from fxmin.analysis import analyze_graph
    from fxmin.minimize import prepare
    from fxmin.plan import make_plan
    from fxmin.rewrite import rewrite

    torch.manual_seed(3)
    model = SigmoidNet()
    masks = {"fc1.weight": torch.ones(5, 6, dtype=torch.bool)}
    masks["fc1.weight"][2] = False
    registry = copy.copy(fxmin.REGISTRY)
    registry.modules = dict(registry.modules)
    registry.register(fxmin.Rule("wrong sigmoid", _wrong_sigmoid_forward, None, None), modules=[nn.Sigmoid], override=True)
    assert fxmin.REGISTRY.modules[nn.Sigmoid].name != "wrong sigmoid"
    graph_module, _, inputs, *_ = prepare(model, masks, (torch.randn(4, 6),))
    plan = make_plan(analyze_graph(graph_module, registry=registry))
    with pytest.raises(fxmin.EquivalenceError) as caught:
        fxmin.verify(graph_module, rewrite(plan), inputs, exact_result=rewrite(plan, torch.float64), plan=plan)
    assert caught.value.node == "fc2"


# -- in-place ops ----------------------------------------------------------------------------------


class InPlaceModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 2), nn.Linear(5, 2)

    def forward(self, x):
        h = self.fc1(x)
        r = self.act(h)  # overwrites h...
        return self.fc2(h) + self.fc3(r)  # ...which is read afterwards


class InPlaceMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.fc1(x)
        g = torch.sigmoid(h)
        h.mul_(2.0)
        return self.fc2(g + h)


@pytest.mark.parametrize("model_type", [InPlaceModule, InPlaceMethod])
def test_in_place_op_overwriting_a_value_read_later_is_refused(model_type):
    with pytest.raises(fxmin.FxminError) as caught:
        fxmin.minimize(model_type(), None, (torch.randn(2, 6),))
    message = str(caught.value)
    assert "in place" in message and "fc1" in message
    assert "inplace=False" in message or "out-of-place" in message


def test_in_place_op_whose_input_is_not_read_again_is_fine():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 2))
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[4] = False
    check_minimize(model, {"0.weight": mask}, (torch.randn(2, 6),), expected_params=4 * 6 + 4 + 2 * 4 + 2)
