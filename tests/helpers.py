"""The one shared check (minimize, verify in float64 independently, compare parameter counts); the one
maker of random masks is ``fxmin.zoo.random_masks`` (imported here, where the tests have always found it)."""
from __future__ import annotations

import copy

import torch

import fxmin
from fxmin.zoo import random_masks  # noqa: F401


def masked_copy(model: torch.nn.Module, masks: dict | None) -> torch.nn.Module:
    """The reference function, built without fxmin: a copy with W * mask applied, in eval mode."""
    # torch.nn.utils.prune keeps `weight` as a non-leaf tensor that deepcopy refuses: copy a
    # detached clone of it (the pre-forward hook recomputes it from weight_orig * weight_mask).
    memo = {id(t): t.detach().clone() for m in model.modules() for t in vars(m).values()
            if isinstance(t, torch.Tensor) and not t.is_leaf}
    reference = copy.deepcopy(model, memo).eval()
    if masks:
        parameters = dict(reference.named_parameters())
        with torch.no_grad():
            for name, mask in masks.items():
                parameters[name].mul_(mask.to(parameters[name].dtype))
    return reference


class SigmoidNet(torch.nn.Module):
    """fc1 -> sigmoid -> fc2 -> relu -> fc3: a unit of fc1 with no input is const(b) before the sigmoid and
    const(sigmoid(b)) after it, folded into fc2's bias (what a wrong sigmoid rule gets wrong)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act = torch.nn.Linear(6, 5), torch.nn.Sigmoid()
        self.fc2, self.fc3 = torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.act(self.fc1(x)))))


class NoRuleModel(torch.nn.Module):
    """A Linear, then ``torch.logcumsumexp``: an op fxmin has no rule for (a MissingRuleError, or a barrier)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.logcumsumexp(self.fc(x), dim=1)


def random_inputs_like(example_inputs: tuple, count: int = 3, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in example_inputs)
            for _ in range(count)]


def assert_equivalent(reference: torch.nn.Module, result: torch.nn.Module, example_inputs: tuple,
                      tolerance: float = 1e-5) -> float:
    """Compare in float64 on the example and random inputs; return the max relative error.

    The result's weights are the model's float32 values (folded biases rounded to float32), so
    float64 agreement is to float32 rounding of the folded constants.
    """
    reference64 = copy.deepcopy(reference).double().eval()
    result64 = copy.deepcopy(result).double().eval()
    worst = 0.0
    inputs = [tuple(x.double() for x in example_inputs)] + random_inputs_like(example_inputs)
    with torch.no_grad():
        for batch in inputs:
            expected, actual = reference64(*batch), result64(*batch)
            assert actual.shape == expected.shape, f"output shape changed: {tuple(expected.shape)} -> {tuple(actual.shape)}"
            scale = max(1.0, float(expected.abs().max()))
            error = float((expected - actual).abs().max()) / scale
            worst = max(worst, error)
    assert worst <= tolerance, f"minimized model diverges: max relative error {worst:.3g} > {tolerance:.1g}"
    return worst


def check_minimize(model: torch.nn.Module, masks: dict | None, example_inputs: tuple, *,
                   expected_params: int | None = None, tolerance: float = 1e-5, **options):
    """Minimize, check equivalence in float64 against an independent masked copy, and the size."""
    result = fxmin.minimize(model, masks, example_inputs, **options)
    assert_equivalent(masked_copy(model, masks), result.module, example_inputs, tolerance)
    params = fxmin.count_parameters(result.module)
    assert params == result.report.params_after
    if expected_params is not None:
        assert params == expected_params, f"expected {expected_params} parameters after minimization, got {params}"
    return result
