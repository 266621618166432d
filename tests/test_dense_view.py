"""NOTE [Dense view] (fxmin/rules/kit/dense.py): a layer's view answers which outputs read which inputs from
packed bits, and the sums of the taps from the weight; checked against dense numpy arithmetic on random
weights (an oracle that shares no code with the view)."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxmin.rules.kit import dense_view


@st.composite
def _layers(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_per_group = draw(st.integers(1, 11))
    out_per_group = draw(st.integers(1, 6))
    taps = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    seed = draw(st.integers(0, 2 ** 16))
    generator = torch.Generator().manual_seed(seed)
    shape = (out_per_group * groups, in_per_group, *taps)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight[torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.5, 0.9]))] = 0
    rows = np.asarray(draw(st.lists(st.booleans(), min_size=shape[0], max_size=shape[0])))
    columns = np.asarray(draw(st.lists(st.booleans(), min_size=in_per_group * groups, max_size=in_per_group * groups)))
    return weight, groups, rows, columns


def _dense(weight: torch.Tensor, groups: int) -> np.ndarray:
    """(out, in) tap sums of a (grouped) weight, zero outside its groups, by plain loops."""
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // groups
    sums = weight.reshape(out_channels, in_per_group, -1)
    dense = np.zeros((out_channels, in_per_group * groups))
    nonzero = np.zeros_like(dense, bool)
    for k in range(out_channels):
        group = k // out_per_group
        for j in range(in_per_group):
            dense[k, group * in_per_group + j] = float(sums[k, j].sum())
            nonzero[k, group * in_per_group + j] = bool((sums[k, j] != 0).any())
    return dense, nonzero


@settings(max_examples=150, deadline=None)
@given(_layers())
def test_reads_read_by_and_tap_sums_match_dense_arithmetic(layer):
    weight, groups, rows, columns = layer
    view = dense_view(weight, None, groups, False, 1 if weight.dim() > 2 else -1)
    sums, nonzero = _dense(weight, groups)
    assert np.array_equal(view.reads(columns), nonzero[:, columns].any(axis=1))
    assert np.array_equal(view.read_by(rows), nonzero[rows].any(axis=0))
    assert np.array_equal(view.row_any, nonzero.any(axis=1)) and np.array_equal(view.col_any, nonzero.any(axis=0))
    assert np.allclose(view.tap_sum(columns), sums[:, columns], rtol=1e-12, atol=1e-12)
    value = np.where(columns, np.linspace(-1.0, 2.0, len(columns)), 0.0)
    assert np.allclose(view.constant_output(value), sums @ value, rtol=1e-12, atol=1e-12)
    assert np.allclose(view.added(columns, value), sums[:, columns] @ value[columns], rtol=1e-12, atol=1e-12)
