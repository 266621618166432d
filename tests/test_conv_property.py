"""Property: on random masked Conv/BatchNorm/pool/flatten/Linear chains, fxmin is exact and
exactly as small as the numpy oracle says.

Convs with and without zero padding (a nonzero constant channel into a padded conv must stay, a
zero one goes), BatchNorm in eval with random statistics and planted ``gamma == 0`` (the channel
becomes ``const(beta)``), activations with ``f(0) != 0``, max pooling, and a flatten into Linear
layers (a channel goes only when its whole block of features is unread). Inputs are 6x6 so a
case runs in milliseconds.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import example, given, strategies as st
from torch import nn

from helpers import check_minimize
from oracle import Conv, Dense, conv_param_count
from test_mlp_property import ACTIVATIONS

SIZE = 6


@st.composite
def conv_specs(draw):
    channels = [draw(st.integers(1, 4))]
    spatial = SIZE
    stages = []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 6))
        padding = draw(st.integers(0, 1))
        kernel = draw(st.integers(1, min(3, spatial + 2 * padding)))
        spatial = spatial + 2 * padding - kernel + 1
        pool = spatial >= 2 and draw(st.booleans())
        spatial = spatial // 2 if pool else spatial
        stages.append(dict(
            out=out, kernel=kernel, padding=padding, pool=pool,
            bias=draw(st.booleans()),
            batch_norm=draw(st.booleans()),
            activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
            density=draw(st.sampled_from([0.15, 0.4, 0.7, 1.0])),
            dead_filters=draw(st.lists(st.integers(0, out - 1), max_size=max(1, out // 2), unique=True)),
            dead_inputs=draw(st.lists(st.integers(0, channels[-1] - 1), max_size=2, unique=True)),
            zero_gamma=draw(st.lists(st.integers(0, out - 1), max_size=2, unique=True)),
            zero_beta=draw(st.lists(st.integers(0, out - 1), max_size=2, unique=True)),
        ))
        channels.append(out)
    dense = []
    if draw(st.booleans()):
        widths = [channels[-1] * spatial * spatial] + draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
        for i in range(len(widths) - 1):
            dense.append(dict(
                out=widths[i + 1],
                activation=draw(st.sampled_from(sorted(ACTIVATIONS))) if i < len(widths) - 2 else None,
                bias=draw(st.booleans()),
                density=draw(st.sampled_from([0.1, 0.3, 0.6, 1.0])),
                dead_rows=draw(st.lists(st.integers(0, widths[i + 1] - 1), max_size=2, unique=True)),
            ))
    return channels[0], stages, dense, draw(st.integers(0, 2**31 - 1))


def spatial_size(stages) -> int:
    spatial = SIZE
    for spec in stages:
        spatial = spatial + 2 * spec["padding"] - spec["kernel"] + 1
        spatial = spatial // 2 if spec["pool"] else spatial
    return spatial


def build_chain(in_channels, stages, dense, seed):
    """(model, masks, oracle convs, oracle dense layers)."""
    spatial = spatial_size(stages)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    modules, masks, oracle_convs, oracle_dense = [], {}, [], []
    channels = in_channels

    def masked(name, parameter, mask):
        masks[name] = mask
        return (parameter.detach().double() * mask).numpy()

    for spec in stages:
        conv = nn.Conv2d(channels, spec["out"], spec["kernel"], padding=spec["padding"], bias=spec["bias"])
        mask = torch.from_numpy(rng.random(tuple(conv.weight.shape)) < spec["density"])
        mask[spec["dead_filters"]] = False
        mask[:, spec["dead_inputs"]] = False
        index = len(modules)
        modules.append(conv)
        with torch.no_grad():
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(rng.normal(0.0, 1.0, spec["out"])))
        weight = masked(f"{index}.weight", conv.weight, mask)
        bias = conv.bias.detach().double().numpy() if conv.bias is not None else None
        batch_norm = None
        if spec["batch_norm"]:
            norm = nn.BatchNorm2d(spec["out"])
            with torch.no_grad():
                norm.weight.copy_(torch.from_numpy(rng.normal(1.0, 0.5, spec["out"])))
                norm.bias.copy_(torch.from_numpy(rng.normal(0.0, 1.0, spec["out"])))
                norm.bias[spec["zero_beta"]] = 0.0
                norm.running_mean.copy_(torch.from_numpy(rng.normal(0.0, 1.0, spec["out"])))
                norm.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, spec["out"])))
            gamma_mask = torch.ones(spec["out"], dtype=torch.bool)
            gamma_mask[spec["zero_gamma"]] = False  # a pruned BN scale: the channel becomes const(beta)
            gamma = masked(f"{len(modules)}.weight", norm.weight, gamma_mask)
            batch_norm = (gamma, norm.bias.detach().double().numpy(), norm.running_mean.double().numpy(),
                          norm.running_var.double().numpy(), norm.eps)
            modules.append(norm)
        modules.append(ACTIVATIONS[spec["activation"]]())
        if spec["pool"]:
            modules.append(nn.MaxPool2d(2))
        oracle_convs.append(Conv(weight, bias, spec["padding"], batch_norm, spec["activation"], spec["pool"]))
        channels = spec["out"]
    features = channels * spatial * spatial
    if dense:
        modules.append(nn.Flatten())
    for spec in dense:
        linear = nn.Linear(features, spec["out"], bias=spec["bias"])
        with torch.no_grad():
            if linear.bias is not None:
                linear.bias.copy_(torch.from_numpy(rng.normal(0.0, 1.0, spec["out"])))
        mask = torch.from_numpy(rng.random(tuple(linear.weight.shape)) < spec["density"])
        mask[spec["dead_rows"]] = False
        weight = masked(f"{len(modules)}.weight", linear.weight, mask)
        modules.append(linear)
        bias = linear.bias.detach().double().numpy() if linear.bias is not None else None
        oracle_dense.append(Dense(weight, bias, spec["activation"] or "identity"))
        if spec["activation"] is not None:
            modules.append(ACTIVATIONS[spec["activation"]]())
        features = spec["out"]
    return nn.Sequential(*modules), masks, oracle_convs, oracle_dense


def _stage(out, kernel, padding, activation, *, bias=False, batch_norm=False, pool=False, density=1.0,
           dead_filters=(), dead_inputs=(), zero_gamma=(), zero_beta=()):
    return dict(out=out, kernel=kernel, padding=padding, pool=pool, bias=bias, batch_norm=batch_norm,
                activation=activation, density=density, dead_filters=list(dead_filters),
                dead_inputs=list(dead_inputs), zero_gamma=list(zero_gamma), zero_beta=list(zero_beta))


@given(conv_specs())
# A dead filter through sigmoid is const(0.5): into a zero-padded 3x3 conv it must stay.
@example((2, [_stage(3, 3, 0, "sigmoid", dead_filters=[1]), _stage(2, 3, 1, "relu")], [], 0))
# The same without padding: folded into the next conv, which gets a bias.
@example((2, [_stage(3, 3, 0, "sigmoid", dead_filters=[1]), _stage(2, 3, 0, "relu")], [], 0))
# A bias-less conv followed by BatchNorm: the fold shifts the BN's running mean, no bias is created.
@example((2, [_stage(3, 3, 0, "sigmoid", dead_filters=[1]), _stage(2, 3, 0, "relu", batch_norm=True)], [], 0))
# BN gamma == 0 with beta == 0 then relu: const(0), removed even before a padded conv; a BN
# gamma == 0 with beta != 0 is kept there.
@example((2, [_stage(4, 3, 0, "relu", batch_norm=True, zero_gamma=[0, 1], zero_beta=[0]), _stage(2, 3, 1, "tanh")],
          [], 3))
# Flatten into Linear: a dead filter's whole feature block goes, folded into the Linear's bias.
@example((1, [_stage(3, 3, 0, "softplus", dead_filters=[2], pool=True)],
          [dict(out=4, activation="relu", bias=False, density=1.0, dead_rows=[1]),
           dict(out=2, activation=None, bias=False, density=1.0, dead_rows=[])], 5))
def test_conv_chain_minimization_is_exact_and_minimal(spec):
    in_channels, stages, dense, seed = spec
    model, masks, convs, layers = build_chain(in_channels, stages, dense, seed)
    expected = conv_param_count(convs, spatial_size(stages) ** 2, layers)
    x = torch.randn(2, in_channels, SIZE, SIZE)
    check_minimize(model, masks, (x,), expected_params=expected)


def test_padding_keeps_a_nonzero_constant_channel():
    """Hand-checked: 2 -> 3 -> 2 channels, filter 1 of the first conv is dead and its sigmoid is
    0.5 everywhere. A zero-padded 3x3 conv cannot fold it (its border pixels see fewer taps), so
    the channel stays; without padding it is folded into a newly created bias."""
    for padding, filters_left, bias_params in ((1, 3, 0), (0, 2, 2)):
        stages = [_stage(3, 3, 0, "sigmoid", dead_filters=[1]), _stage(2, 3, padding, "relu")]
        model, masks, convs, layers = build_chain(2, stages, [], 0)
        expected = filters_left * 2 * 9 + 2 * filters_left * 9 + bias_params
        assert conv_param_count(convs, spatial_size(stages) ** 2, layers) == expected
        result = check_minimize(model, masks, (torch.randn(2, 2, SIZE, SIZE),), expected_params=expected)
        assert result.module.get_submodule("0").out_channels == filters_left


def test_a_dead_conv_keeps_one_channel():
    """Regression: torch has no zero-channel convs (an error without outputs, a wrong shape
    without inputs), so a conv stage whose channels all go keeps channel 0 and computes it.

    Every filter of the first conv is masked away: its channels are ``const(relu(b))``, folded
    into the second conv's bias. Before the fix fxmin built ``Conv2d(0, 0, 3)`` and failed."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    masks = {"0.weight": torch.zeros(3, 2, 3, 3, dtype=torch.bool)}
    convs = [Conv(np.zeros((3, 2, 3, 3)), model[0].bias.detach().double().numpy(), 0, None, "relu"),
             Conv(model[2].weight.detach().double().numpy(), model[2].bias.detach().double().numpy(), 0, None,
                  "identity")]
    expected = (1 * 1 * 9 + 1) + (2 * 1 * 9 + 2)  # one channel in, one through, two out (outputs never shrink)
    assert conv_param_count(convs, 4, []) == expected
    result = check_minimize(model, masks, (torch.randn(2, 2, SIZE, SIZE),), expected_params=expected)
    assert result.module.get_submodule("0").in_channels == 1
