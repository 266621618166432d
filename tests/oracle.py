"""An independent oracle for the size of the minimal exact model of simple chains.

Plain numpy over the masked weights; it shares no code with fxmin. It states the optimum the
contract asks for (``docs/concepts.md``) for two families of chains:

- :func:`mlp_param_count`: ``Linear -> act -> Linear -> ... -> Linear``;
- :func:`conv_param_count`: ``[Conv2d -> BatchNorm2d? -> act -> MaxPool2d?]* -> (flatten -> Linear
  -> act -> ... -> Linear)?``.

A *unit* (feature or channel) is **constant** when every nonzero masked weight into it comes
from a constant unit (model inputs are never constant; a BatchNorm channel with ``gamma == 0`` is
``const(beta)``), and **removed** when it is constant or nobody kept reads it with a nonzero
weight. Both rules feed each other, so the oracle iterates them until nothing changes. Outputs
never shrink. Input features that no kept unit reads are dropped (fxmin drops them with an
``index_select``).

Four rules decide the count beyond that fixed point; each mirrors fxmin's documented behaviour:

- *Bias creation.* A removed constant unit ``j`` is folded into its reader: ``b += W[:, j] c_j``.
  A layer without a bias gets one iff that fold adds a nonzero amount to some kept row
  (``fxmin/rules/linear.py`` ``_new_weights``); a fold of zeros (dead ReLU units) creates none,
  and a bias-less conv followed by an eval BatchNorm gets none either: the fold shifts the BN's
  running mean (a buffer) instead (NOTE [BatchNorm absorbs]).
- *Zero padding.* Border pixels of a zero-padded conv see fewer taps, so a nonzero constant
  channel read (through a nonzero tap) by a kept filter cannot be folded: it is kept, and the
  filters that read it vary. A ``const(0)`` channel still goes. Constants are therefore tracked
  by value, through activations with ``f(0) != 0`` and BatchNorm shifts.
- *No empty convs.* Torch cannot run a conv with zero input or output channels (``nn.Linear``
  can), so when every channel of a conv's input or output would go, channel 0 stays
  (``fxmin/rules/linear.py``, NOTE [No empty convs]). The exact optimum would replace such a
  stage by a constant; keeping one channel costs at most a few parameters.
- *Channels are removed whole.* After ``flatten`` a channel is a block of features; it stays iff
  some kept unit reads some feature of the block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# -- activations, written out in numpy (torch's definitions, float64) ----------------------------

_erf = np.vectorize(math.erf)


def _softplus(x, beta=1.0, threshold=20.0):
    return np.where(x * beta > threshold, x, np.log1p(np.exp(np.minimum(x * beta, threshold))) / beta)


ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "softplus": _softplus,
    "identity": lambda x: x,
}


# -- MLP chains -----------------------------------------------------------------------------------

@dataclass
class Dense:
    """One Linear layer: masked weight (out, in), bias (out,) or None, activation after it."""

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str = "identity"


def _constants(layers, input_const, input_value):
    """Forward pass of the facts: (const, value) per layer output, after its activation."""
    const, value = input_const, input_value
    facts = []
    for layer in layers:
        reads = layer.weight != 0
        out_const = ~(reads & ~const).any(axis=1)
        bias = layer.bias if layer.bias is not None else np.zeros(layer.weight.shape[0])
        pre = bias + layer.weight @ np.where(const, value, 0.0)
        out_value = np.where(out_const, ACTIVATIONS[layer.activation](pre), 0.0)
        facts.append((out_const, out_value))
        const, value = out_const, out_value
    return facts


def _dense_count(weight, bias, rows, cols, folded, value) -> int:
    """Parameters of a kept Linear: rows x cols, plus a bias if it had one or a fold creates one."""
    count = int(rows.sum()) * int(cols.sum())
    delta = weight[rows][:, folded] @ value[folded]
    if bias is not None or np.any(delta != 0):
        count += int(rows.sum())
    return count


def mlp_param_count(layers: list[Dense]) -> int:
    """Parameters of the minimal exact model of ``x -> layers[0] -> ... -> layers[-1]``.

    >>> w = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> mlp_param_count([Dense(w, None, "relu"), Dense(np.ones((1, 2)), None)])
    2
    """
    inputs = layers[0].weight.shape[1]
    facts = _constants(layers, np.zeros(inputs, bool), np.zeros(inputs))
    # removed[i]: units of the value read by layers[i] (i == 0: the model input)
    const = [np.zeros(inputs, bool)] + [c for c, _ in facts[:-1]]
    removed = [c.copy() for c in const]
    changed = True
    while changed:  # NOTE: for a chain one backward sweep suffices; the loop states the fixed point
        changed = False
        for i in range(len(layers)):
            readers = np.ones(layers[i].weight.shape[0], bool) if i == len(layers) - 1 else ~removed[i + 1]
            unneeded = ~(layers[i].weight[readers] != 0).any(axis=0)
            new = removed[i] | unneeded
            changed |= bool((new != removed[i]).any())
            removed[i] = new
    values = [np.zeros(inputs)] + [v for _, v in facts[:-1]]
    total = 0
    for i, layer in enumerate(layers):
        rows = np.ones(layer.weight.shape[0], bool) if i == len(layers) - 1 else ~removed[i + 1]
        cols = ~removed[i]
        total += _dense_count(layer.weight, layer.bias, rows, cols, const[i] & removed[i], values[i])
    return total


# -- Conv / BatchNorm / pool / flatten / Linear chains ------------------------------------------------

@dataclass
class Conv:
    """Conv2d (groups=1) with masked weight (out, in, kh, kw), bias or None, zero ``padding``;
    then an optional eval BatchNorm (gamma, beta, mean, var, eps), the activation, an optional
    max pool (irrelevant to the facts, listed for the reader)."""

    weight: np.ndarray
    bias: np.ndarray | None
    padding: int
    batch_norm: tuple | None
    activation: str
    pool: bool = False


def conv_param_count(convs: list[Conv], spatial_after: int, dense: list[Dense]) -> int:
    """Parameters of the minimal exact model of ``convs``, then (if ``dense``) a flatten of
    ``spatial_after`` positions per channel and the ``dense`` layers. Without ``dense`` the last
    conv stage is the output."""
    channels = convs[0].weight.shape[1]
    const, value = np.zeros(channels, bool), np.zeros(channels)
    stage_const, stage_value = [const], [value]  # facts of the value each conv reads, then the output
    for conv in convs:
        taps = conv.weight != 0
        reads = taps.any(axis=(2, 3))
        blocked = ~const
        if conv.padding > 0:
            blocked = blocked | (value != 0)  # a nonzero constant varies at the zero-padded borders
        out_const = ~(reads & blocked).any(axis=1)
        bias = conv.bias if conv.bias is not None else np.zeros(conv.weight.shape[0])
        pre = bias + conv.weight.sum(axis=(2, 3)) @ np.where(const, value, 0.0)
        if conv.batch_norm is not None:
            gamma, beta, mean, var, eps = conv.batch_norm
            pre = np.where(gamma == 0, beta, gamma * (pre - mean) / np.sqrt(var + eps) + beta)
            out_const = out_const | (gamma == 0)
        const = out_const
        value = np.where(const, ACTIVATIONS[conv.activation](pre), 0.0)
        stage_const.append(const)
        stage_value.append(value)
    feature_const = np.repeat(const, spatial_after)
    feature_value = np.repeat(value, spatial_after)
    dense_facts = _constants(dense, feature_const, feature_value) if dense else []

    # value s is read by stage s (convs, then dense layers) and stage s produces value s + 1
    stages = len(convs) + len(dense)
    unit_const = stage_const + [c for c, _ in dense_facts]
    unit_value = stage_value + [v for _, v in dense_facts]
    kept = [~c for c in unit_const]
    kept[-1] = np.ones_like(kept[-1])  # outputs never shrink
    changed = True
    while changed:  # NOTE: for a chain one backward sweep suffices; the loop states the fixed point
        changed = False
        for s in reversed(range(stages)):
            if s < len(convs):
                reads = (convs[s].weight[kept[s + 1]] != 0).any(axis=(0, 2, 3))
                padded = convs[s].padding > 0
            else:
                weight = dense[s - len(convs)].weight[kept[s + 1]] != 0
                if s == len(convs):  # reads the flattened channels: a channel is a block of features
                    weight = weight.reshape(weight.shape[0], len(kept[s]), spatial_after).any(axis=2)
                reads = weight.any(axis=0)
                padded = False
            pinned = reads & unit_const[s] & (unit_value[s] != 0) if padded else np.zeros_like(reads)
            new = (reads & ~unit_const[s]) | pinned
            if s <= len(convs) and not new.any():
                new[0] = True  # a conv's input or output: torch has no zero-channel convs
            changed |= bool((new != kept[s]).any())
            kept[s] = new

    total = 0
    for i, conv in enumerate(convs):
        rows, cols = kept[i + 1], kept[i]
        total += int(rows.sum()) * int(cols.sum()) * conv.weight.shape[2] * conv.weight.shape[3]
        folded = unit_const[i] & ~cols
        delta = conv.weight[rows].sum(axis=(2, 3))[:, folded] @ unit_value[i][folded]
        if conv.bias is not None or (np.any(delta != 0) and conv.batch_norm is None):
            total += int(rows.sum())  # a BatchNorm right after absorbs the fold in its running mean
        if conv.batch_norm is not None:
            total += 2 * int(rows.sum())  # gamma, beta (running statistics are buffers)
    for d, layer in enumerate(dense):
        i = len(convs) + d
        rows = kept[i + 1]
        if d == 0:
            cols = np.repeat(kept[len(convs)], spatial_after)
            const, value = feature_const, feature_value
        else:
            cols, const, value = kept[i], unit_const[i], unit_value[i]
        total += _dense_count(layer.weight, layer.bias, rows, cols, const & ~cols, value)
    return total
