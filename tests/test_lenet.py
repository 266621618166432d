"""LeNet-300-100 (784-300-100-10, ReLU) under a 98 % global magnitude mask: exact, and as small
as the numpy oracle says.

The weights are seeded and synthetic, shaped like those of a LeNet-300-100 trained on MNIST:
plain default init would not do, because a global threshold over layers of different scales
(PyTorch scales each layer by ``1/sqrt(fan_in)``) empties the first layer entirely and the whole
network collapses to a constant. Here the first layer is centre-heavy (MNIST borders are
black), so pruning empties the border pixels' columns and fxmin drops them at the input; a few
hidden units are nearly silent (their rows empty: ``relu(bias)`` constants folded into the next
bias) and a few are nearly unread (their columns empty: they go, with their rows before).

With seed 0 the 266,610 parameters (5,324 weights kept by the mask) become 36,414 parameters,
7.3x fewer: 784-300-100-10 -> 151-156-76-10 (``test_lenet300_count_is_stable`` pins these
numbers). The result is dense, so it holds more than the 5,324 kept weights: the zeros left
inside the kept rows and columns are what an exact dense model must store.
"""
from __future__ import annotations

import torch
from torch import nn

import fxmin
from examples.lenet300_demo import lenet300  # the demo's synthetic 'trained-looking' weights
from helpers import check_minimize
from oracle import Dense, mlp_param_count

SPARSITY = 0.98


def _minimize_lenet(seed: int):
    model = lenet300(seed)
    masks = fxmin.global_magnitude(model, SPARSITY)
    layers = [Dense((model[i].weight.detach().double() * masks[f"{i}.weight"]).numpy(),
                    model[i].bias.detach().double().numpy(), "relu" if i < 4 else "identity") for i in (0, 2, 4)]
    expected = mlp_param_count(layers)
    images = torch.rand(16, 784)
    result = check_minimize(model, masks, (images,), expected_params=expected)
    return model, masks, result


def test_lenet300_at_98_percent_is_exact_and_minimal():
    for seed in (0, 1):
        model, masks, result = _minimize_lenet(seed)
        report = result.report
        kept_weights = sum(int(m.sum()) for m in masks.values())
        assert report.params_before == 266_610
        assert report.params_after < report.params_before // 5, (
            f"seed {seed}: {report.params_after:,} parameters remain of {report.params_before:,} "
            f"({kept_weights:,} weights kept by the mask)")
        assert report.inputs, "unused border pixels should be dropped at the input"
        out = result.module(torch.rand(3, 784))
        assert out.shape == (3, 10)


def test_lenet300_count_is_stable():
    """The numbers quoted in the module docstring (and in docs): seed 0."""
    _, masks, result = _minimize_lenet(0)
    linears = [m for m in result.module.modules() if isinstance(m, nn.Linear)]
    shapes = [linears[0].in_features] + [m.out_features for m in linears]
    summary = f"{result.report.params_after:,} parameters remain, layers {'-'.join(map(str, shapes))}"
    assert sum(int(m.sum()) for m in masks.values()) == 5_324
    assert (result.report.params_after, shapes) == (36_414, [151, 156, 76, 10]), summary
