"""NOTE [Weights on demand] (fxmin/weights.py) and NOTE [Streamed runs] (fxmin/streamed.py): the pass reads
the model's own tensors with the masks applied on load, holds no float64 copy of a weight matrix, and
verifies without a copy of either model; the results are what the masked model computes."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fxmin
from fxmin import zoo
from fxmin.streamed import StreamedRun

from helpers import masked_copy


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 10), nn.LayerNorm(10), nn.Linear(10, 4)).to(dtype)
    with torch.no_grad():
        model[0].bias.uniform_(-1, 1)
    mask = torch.ones(32, 12, dtype=torch.bool)
    mask[::2] = False  # 16 dead hidden units: GELU(bias) folds into the next bias
    return model.eval(), {"0.weight": mask}


def test_the_pass_shares_the_models_tensors_and_masks_them_where_it_reads_them():
    model, masks = _mlp()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = fxmin.minimize(model, masks, (torch.randn(3, 12),))
    assert result.graph.get_submodule("0").weight is model[0].weight  # not copied, not masked in place
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    analysis_tensors = result.analysis.tensors.values()
    assert all(t is None or t.dim() <= 1 for t in analysis_tensors)  # no float64 copy of a weight matrix is kept
    assert all(p.dtype == torch.float32 for edit in result.plan.modules.values() for p in edit.module.parameters())
    assert result.module.get_submodule("0").out_features == 16 and result.report.verification.ok
    x = torch.randn(5, 12, dtype=torch.float64)
    reference = masked_copy(model, masks).double()
    torch.testing.assert_close(fxmin.rewrite(result.plan, torch.float64)(x), reference(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.reference(x.float()), reference(x).float(), rtol=0, atol=1e-6)
    assert torch.count_nonzero(result.reference.get_submodule("0").weight) == 16 * 12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_folds_keep_their_float64_value_for_the_float64_check(dtype):
    model, masks = _mlp(dtype)
    result = fxmin.minimize(model, masks, (torch.randn(3, 12, dtype=dtype),))
    exact = result.plan.exact_values()
    assert "2.bias" in exact and exact["2.bias"].dtype == torch.float64  # GELU(bias) of the dead units, unrounded
    assert result.module.get_submodule("2").bias.dtype == dtype
    assert torch.equal(result.module.get_submodule("2").bias, exact["2.bias"].to(dtype))  # rounded once
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(fxmin.rewrite(result.plan, torch.float64)(x), masked_copy(model, masks).double()(x),
                               rtol=0, atol=1e-12)


def test_a_pruned_model_keeps_its_reparametrization_and_weight_orig():
    model, _ = _mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    orig = model[0].weight_orig.detach().clone()
    result = fxmin.minimize(model, None, (torch.randn(3, 12),))
    assert torch.equal(model[0].weight_orig, orig) and hasattr(model[0], "weight_mask")
    assert any(isinstance(h, prune.BasePruningMethod) for h in model[0]._forward_pre_hooks.values())
    x = torch.randn(4, 12)
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_tied_table_masked_under_one_name_is_masked_for_both_readers():
    torch.manual_seed(0)
    model = zoo.gpt().eval()
    mask = torch.ones_like(model.lm_head.weight, dtype=torch.bool)
    mask[:, :8] = False  # 8 embedding columns: the residual stream's first channels start at zero
    result = fxmin.minimize(model, {"lm_head.weight": mask}, (torch.randint(0, 128, (1, 16)),))
    ids = torch.randint(0, 128, (2, 16))
    reference = masked_copy(model, {"transformer.wte.weight": mask})
    torch.testing.assert_close(result.module(ids), reference(ids), rtol=1e-4, atol=1e-5)


def test_streamed_float64_runs_cast_large_weights_a_block_of_rows_at_a_time(monkeypatch):
    monkeypatch.setattr(sys.modules["fxmin.streamed"], "_CAST_ELEMENTS", 16)  # a few rows per block
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 12), nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 7)).eval()
    graph = fxmin.trace(model)
    ids = torch.randint(0, 50, (3, 5))
    expected = copy.deepcopy(model).double()(ids)
    with torch.no_grad():
        streamed = StreamedRun(graph, dtype=torch.float64)(ids)
    assert streamed.dtype == torch.float64
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-13)


class ChannelsLastBlock(nn.Module):
    """A depthwise convolution fed by a permute back from channels-last, as ConvNeXt's blocks are."""

    def __init__(self):
        super().__init__()
        self.norm, self.conv = nn.LayerNorm(6), nn.Conv2d(6, 6, 3, padding=1, groups=6)

    def forward(self, x):
        y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # contiguous values, channels-last layout
        return self.conv(y) + torch.nn.functional.conv2d(y, self.conv.weight, None, 1, 1, 1, 6)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_float64_convolutions_of_a_channels_last_input_give_the_model_s_values(frontend, monkeypatch):
    """NOTE [Float64 convolutions on contiguous inputs]: a contiguous copy of the input, the same values."""
    streamed_module = sys.modules["fxmin.streamed"]
    made_contiguous, contiguous = [], streamed_module._contiguous_float64_input

    def spy(args):
        out = contiguous(args)
        made_contiguous.append(out[0] is not args[0] and out[0].is_contiguous())
        return out
    monkeypatch.setattr(streamed_module, "_contiguous_float64_input", spy)
    torch.manual_seed(0)
    model = ChannelsLastBlock().eval()
    x = torch.randn(2, 6, 5, 5)
    graph = fxmin.minimize(model, None, (x,), frontend=frontend, verify=False).graph
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        streamed = StreamedRun(graph, dtype=torch.float64)(x.double())
    streamed = streamed[0] if isinstance(streamed, tuple) else streamed
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-13)
    assert made_contiguous == [True, True]  # the module's convolution and the function's


def test_a_weight_source_reads_rows_columns_and_the_nonzero_pattern_as_the_masked_tensor_gives_them():
    from fxmin.weights import ModuleWeights, storage_key
    torch.manual_seed(0)
    layer = nn.Linear(7, 5)
    with torch.no_grad():
        layer.weight[1, 2] = 0.0  # a zero of the weight's own
        layer.weight[3, 4] = float("nan")  # masked out below: read as 0
    mask = torch.rand(5, 7) > 0.4
    mask[3, 4] = False
    weights = ModuleWeights(layer, {storage_key(layer.weight): mask})
    masked = torch.where(mask, layer.weight.detach(), 0)
    rows, cols = torch.tensor([0, 3, 4]), torch.tensor([1, 4, 6])
    assert torch.equal(weights.load("weight"), masked)
    assert torch.equal(weights.load("weight", rows, cols), masked[rows][:, cols])
    assert torch.equal(weights.load("weight", None, cols), masked[:, cols])
    assert np.array_equal(weights.nonzero("weight"), (masked != 0).numpy())
    assert weights.count_nonzero("weight") == int((masked != 0).sum()) == int(mask.sum()) - int(mask[1, 2])
    assert weights.load("bias") is not None and weights.count_nonzero("bias") == 5
    assert weights.load("nothing") is None and weights.nonzero("nothing") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonzero_patterns_and_constant_columns_read_in_numpy_agree_with_torch_in_every_float_dtype(dtype, monkeypatch):
    from fxmin import arrays
    monkeypatch.setattr(arrays, "_BLOCK", 5)  # half precision is read a block at a time: blocks that split rows
    values = torch.tensor([[0.0, -0.0, 1.5, float("nan")], [2.0, -0.0, 1.5, -3.0], [0.0, 0.0, 1.5, 5e-3]])
    table = values.to(dtype)
    assert np.array_equal(arrays.nonzero(table), (table != 0).numpy())  # -0 is zero, NaN is not
    # column 2 holds one value; column 1 holds -0 and +0: equal as numbers, kept apart by the bit patterns
    # of half-precision tables (only ever keeping a column more); column 0 differs
    constant = arrays.constant_columns(table)
    assert constant[2] and not constant[0] and not constant[3]
    assert constant[1] == (dtype in (torch.float32, torch.float64))


@pytest.mark.parametrize("rows_per_block", [1, 2, 3, 64])
def test_constant_columns_read_a_block_of_rows_at_a_time_find_every_constant_column(rows_per_block, monkeypatch):
    from fxmin import arrays
    monkeypatch.setattr(arrays, "_ROWS_PER_BLOCK", rows_per_block)
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(9, 12, generator=generator)
    table[:, [1, 4, 5, 9]] = torch.tensor([0.0, 2.5, -1.0, 7.0])
    table[8, 5] = 3.0  # differs in the last row only
    table[4, 9] = float("nan")
    expected = [all(float(table[r, c]) == float(table[0, c]) for r in range(9)) for c in range(12)]
    assert arrays.constant_columns(table).tolist() == expected == [c in (1, 4) for c in range(12)]


@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 3, 3)])
@pytest.mark.parametrize("rows_of", ["whole or dropped", "one row masked entry by entry"])
def test_masked_loads_of_row_structured_masks_equal_the_masked_tensor_sliced(shape, rows_of):
    from fxmin.weights import ModuleWeights, storage_key
    torch.manual_seed(1)
    weight = nn.Parameter(torch.randn(shape))
    holder = nn.Module()
    holder.weight = weight
    mask = torch.ones(shape, dtype=torch.bool)
    mask[[1, 4]] = False  # two output rows dropped whole
    with torch.no_grad():
        weight[1] = float("nan")  # a dropped row's values are never read
    if rows_of == "one row masked entry by entry":
        mask[2, 1] = False
    weights = ModuleWeights(holder, {storage_key(weight): mask})
    expected = torch.where(mask, weight.detach(), 0)
    for rows, cols in [(None, None), (torch.tensor([0, 1, 3]), None), (None, torch.tensor([0, 3])),
                       (torch.tensor([1, 2, 4]), torch.tensor([1, 2])), (torch.tensor([0, 5]), None)]:
        loaded = weights.load("weight", rows, cols)
        want = expected if rows is None else expected[rows]
        want = want if cols is None else want[:, cols]
        assert torch.equal(loaded, want), (rows, cols)
    assert weight.isnan().any()  # the model's own tensor is untouched


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 1), (6, 4, 3, 3), (4, 1, 7, 7), (3, 2, 2, 3, 3)])
def test_any_tap_is_numpys_any_over_the_taps(shape):
    from fxmin import arrays
    pattern = np.random.default_rng(0).random(shape) > 0.8
    expected = pattern.reshape(*shape[:2], -1).any(axis=2)
    assert np.array_equal(arrays.any_tap(pattern), expected)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_a_streamed_run_of_an_exported_graph_holds_one_layers_weights_at_a_time(dtype):
    """The export front end's graphs read every weight through get_attr nodes that come first: a streamed run
    reads each where it is used (NOTE [Weights read where they are used]), not the whole model up front."""
    import weakref

    from fxmin.trace_export import export_trace

    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(12) for layer in (nn.Linear(8, 8), nn.Tanh())]).eval()
    x = torch.randn(3, 8)
    graph, _, _ = export_trace(model, (x,))
    assert [n.op for n in graph.graph.nodes][1:25] == ["get_attr"] * 24  # every weight and bias read first
    alive, most = set(), [0]

    def load(name):
        value = graph.get_parameter(name).detach().clone()
        alive.add(id(value))
        weakref.finalize(value, alive.discard, id(value))
        most[0] = max(most[0], len(alive))
        return value

    with torch.no_grad():
        out = StreamedRun(graph, load=load, dtype=dtype)(x if dtype is None else x.to(dtype))
        expected = model(x) if dtype is None else copy.deepcopy(model).to(dtype)(x.to(dtype))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 if dtype is None else 1e-13)
    assert most[0] <= 2  # a layer's weight and bias, never the 24 tensors of the model
