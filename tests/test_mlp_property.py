"""Property: on random masked MLPs, fxmin is exact and exactly as small as the numpy oracle says.

Random depths (1-5 hidden layers), widths (1-12), activations (including ``f(0) != 0`` ones),
biases present or not (nonzero when present), masks at random densities, and whole dead rows
and columns planted on purpose so that the fixed point cascades both ways.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import example, given, strategies as st
from torch import nn

from helpers import check_minimize
from oracle import Dense, mlp_param_count

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


@st.composite
def mlp_specs(draw):
    hidden = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 12), min_size=hidden + 2, max_size=hidden + 2))
    layers = []
    for i in range(hidden + 1):
        rows, cols = widths[i + 1], widths[i]
        layers.append(dict(
            activation=draw(st.sampled_from(sorted(ACTIVATIONS))) if i < hidden else None,
            bias=draw(st.booleans()),
            density=draw(st.sampled_from([0.05, 0.2, 0.4, 0.7, 1.0])),
            dead_rows=draw(st.lists(st.integers(0, rows - 1), max_size=rows, unique=True)),
            dead_cols=draw(st.lists(st.integers(0, cols - 1), max_size=min(cols, 3), unique=True)),
            zero_bias=draw(st.lists(st.integers(0, rows - 1), max_size=2, unique=True)),
        ))
    return widths, layers, draw(st.integers(0, 2**31 - 1))


def build_mlp(widths, layers, seed):
    """(model, masks, oracle layers): Linear/activation chain with random weights and masks."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    modules, masks, dense = [], {}, []
    for i, spec in enumerate(layers):
        linear = nn.Linear(widths[i], widths[i + 1], bias=spec["bias"])
        with torch.no_grad():
            if linear.bias is not None:
                linear.bias.copy_(torch.from_numpy(rng.normal(0.0, 1.0, widths[i + 1])))
                linear.bias[spec["zero_bias"]] = 0.0
        mask = torch.from_numpy(rng.random(tuple(linear.weight.shape)) < spec["density"])
        mask[spec["dead_rows"], :] = False
        mask[:, spec["dead_cols"]] = False
        masks[f"{len(modules)}.weight"] = mask
        modules.append(linear)
        weight = (linear.weight.detach().double() * mask).numpy()
        bias = linear.bias.detach().double().numpy() if linear.bias is not None else None
        activation = spec["activation"] or "identity"
        dense.append(Dense(weight, bias, activation))
        if spec["activation"] is not None:
            modules.append(ACTIVATIONS[spec["activation"]]())
    return nn.Sequential(*modules), masks, dense


def _layer(activation, bias, density=1.0, dead_rows=(), dead_cols=(), zero_bias=()):
    return dict(activation=activation, bias=bias, density=density, dead_rows=list(dead_rows),
                dead_cols=list(dead_cols), zero_bias=list(zero_bias))


@given(mlp_specs())
# A cascade both ways: hidden unit 0 of layer 1 has no live input (const sigmoid(b) folded into a
# bias-less layer, which gets a bias), and layer 3 reads nothing of layer-2 unit 1.
@example(([3, 4, 4, 4, 2], [_layer("sigmoid", True, dead_rows=[0]), _layer("relu", False, dead_cols=[1]),
                            _layer("gelu", False, dead_cols=[2]), _layer(None, False)], 0))
# Everything dead: the first layer reads nothing; outputs keep their shape and become constants.
@example(([5, 3, 2], [_layer("softplus", True, density=0.0), _layer(None, False)], 1))
def test_mlp_minimization_is_exact_and_minimal(spec):
    widths, layers, seed = spec
    model, masks, dense = build_mlp(widths, layers, seed)
    expected = mlp_param_count(dense)
    result = check_minimize(model, masks, (torch.randn(4, widths[0]),), expected_params=expected)
    assert result.report.params_after <= result.report.params_before


def test_oracle_counts_by_hand():
    """The oracle itself, on a case small enough to count by hand."""
    # 3 inputs -> 3 hidden (sigmoid) -> 2 outputs, no biases.
    # hidden 2 reads nothing: const(sigmoid(0) = 0.5), folded into the output layer, which gets a bias.
    # input 2 feeds only hidden 2 -> unneeded. hidden 1 is read by no output -> unneeded, so
    # input 1 (read only by hidden 1) goes too.
    w1 = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    w2 = np.array([[1.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    # kept: input {0}, hidden {0}; layer 1 = 1x1, layer 2 = 2x1 + created bias 2
    assert mlp_param_count([Dense(w1, None, "sigmoid"), Dense(w2, None)]) == 1 + 2 + 2
    # with relu the constant is relu(0) = 0: nothing to fold, no bias is created
    assert mlp_param_count([Dense(w1, None, "relu"), Dense(w2, None)]) == 1 + 2


def test_exact_on_a_deep_cascade():
    """One dead unit per layer at the top starves a unit in every later layer: the fixed point
    removes a whole diagonal in one run, and the oracle agrees."""
    width, depth = 5, 5
    widths = [width] * (depth + 2)
    layers = [_layer("tanh", True, dead_rows=[0]) if i == 0 else _layer("elu", True, dead_cols=[])
              for i in range(depth)] + [_layer(None, True)]
    model, masks, dense = build_mlp(widths, layers, 7)
    for i in range(1, depth):
        masks[f"{2 * i}.weight"][i, :] = False  # unit i of layer i reads only the dead unit i - 1
        masks[f"{2 * i}.weight"][i, i - 1] = True
        dense[i].weight[:] = (model[2 * i].weight.detach().double() * masks[f"{2 * i}.weight"]).numpy()
    expected = mlp_param_count(dense)
    result = check_minimize(model, masks, (torch.randn(4, width),), expected_params=expected)
    # each hidden layer lost exactly its diagonal unit
    hidden = [m.out_features for m in result.module.modules() if isinstance(m, nn.Linear)][:-1]
    assert hidden == [width - 1] * depth
