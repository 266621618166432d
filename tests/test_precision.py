"""NOTE [Fold precision] (fxmin/plan.py): every constant fxmin folds is computed in float64 from the
model's own values and rounded once to the model's dtype. Each test computes the fold independently in
float64 (plain torch, no fxmin), rounds it once, and compares bit for bit. NOTE [Tolerances]
(fxmin/verify.py): half-precision models verify with the tolerances the report states."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmin
from fxmin.verify import TOLERANCES, tolerance_for

from helpers import masked_copy


def _bn_constant(state: dict, prefix: str, c: torch.Tensor) -> torch.Tensor:
    """What an eval BatchNorm makes of a constant channel, in float64."""
    g, b = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
    m, v = state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]
    return g * (c - m) / torch.sqrt(v + 1e-5) + b


def _mnasnet_like(seed=0):
    """conv -> BN -> ReLU, twice, then a conv with a bias and one without (MNASNet's pattern: the
    constants of dead channels fold through BN and ReLU into the next layer)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 12, 1), nn.ReLU(), nn.Conv2d(12, 4, 1, bias=False))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.2, 1.0)  # positive: most dead channels stay nonzero after the ReLU
        model[6].bias.uniform_(0.1, 1.0)
    masks = {"0.weight": torch.ones(32, 8, 1, 1, dtype=torch.bool), "3.weight": torch.ones(16, 32, 1, 1, dtype=torch.bool),
             "6.weight": torch.ones(12, 16, 1, 1, dtype=torch.bool)}
    masks["0.weight"][:12] = False  # 12 dead filters: const(0) -> BN -> ReLU, read by conv 3
    masks["3.weight"][:5] = False  # 5 more, read by conv 6
    masks["6.weight"][:3] = False  # 3 dead rows of a conv with a bias: const(relu(b)), read by conv 8
    return model.eval(), masks


def test_folds_through_batchnorm_and_relu_are_float64_rounded_once():
    """A float32 model: the constants of dead channels pass a BatchNorm and a ReLU and fold into a
    BatchNorm's running mean (NOTE [BatchNorm absorbs]), an existing bias and a created one."""
    model, masks = _mnasnet_like()
    result = fxmin.minimize(model, masks, example_inputs=(torch.randn(4, 8, 5, 5),))
    d = {name: value.double() for name, value in model.state_dict().items()}
    w0, w3, w6 = (d[f"{i}.weight"] * masks[f"{i}.weight"] for i in (0, 3, 6))
    dead1, dead4, dead6 = torch.arange(12), torch.arange(5), torch.arange(3)
    kept4, kept6 = torch.arange(5, 16), torch.arange(3, 12)
    # conv 3 has no bias and only BatchNorm 4 reads it: the constants shift its running mean
    shift = w3[:, dead1, 0, 0] @ torch.relu(_bn_constant(d, "1", torch.zeros(32)))[dead1]
    running_mean = (d["4.running_mean"] - shift)[kept4]
    # conv 6 has a bias: the constants of conv 3's dead rows (after BN 4 and the ReLU) join it
    bias6 = (d["6.bias"] + w6[:, dead4, 0, 0] @ torch.relu(_bn_constant(d, "4", torch.zeros(16)))[dead4])[kept6]
    # conv 8 has none: conv 6's dead rows are const(relu(bias6)), which creates one
    bias8 = d["8.weight"][:, dead6, 0, 0] @ torch.relu(d["6.bias"] + w6[:, dead4, 0, 0]
                                                       @ torch.relu(_bn_constant(d, "4", torch.zeros(16)))[dead4])[dead6]
    state = result.module.state_dict()
    assert state["4.running_mean"].dtype == torch.float32
    assert torch.equal(state["4.running_mean"], running_mean.float())
    assert torch.equal(state["6.bias"], bias6.float())
    assert torch.equal(state["8.bias"], bias8.float())
    assert torch.equal(state["0.weight"], model[0].weight[12:])  # what was not folded is the model's own
    folded = {change.name: change.folded_from for change in result.report.layers}
    nonzero = torch.relu(_bn_constant(d, "1", torch.zeros(32)))[dead1] != 0  # node '_2': the first ReLU
    assert folded["4.running_mean"] == tuple(f"_2[{j}]" for j in dead1[nonzero].tolist())  # the report says so
    assert folded["6.bias"] and folded["8.bias"] and not folded["4.bias"]
    # the folds are not exact in float32: a float32 computation of them would round differently
    shift32 = (w3.float()[:, dead1, 0, 0] @ torch.relu(_bn_constant({k: v.float() for k, v in d.items()}, "1",
                                                                     torch.zeros(32)))[dead1])
    assert not torch.equal((model[4].running_mean - shift32)[kept4], state["4.running_mean"])


class _Block(nn.Module):
    """``x + scale * fc2(gelu(fc1(x)))``: emptying fc1 makes the branch a constant operand."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return x + self.scale * self.fc2(F.gelu(self.fc1(x)))


def test_a_constant_operand_is_float64_rounded_once():
    """NOTE [Constant operands]: ``scale * (b2 + W2 gelu(b1))`` in float64, stored in float32."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), _Block(), nn.Linear(6, 3)).eval()
    masks = {"1.fc1.weight": torch.zeros(10, 6, dtype=torch.bool)}
    result = fxmin.minimize(model, masks, example_inputs=(torch.randn(5, 4),))
    block = {name: value.double() for name, value in model[1].state_dict().items()}
    expected = block["scale"] * (block["fc2.bias"] + block["fc2.weight"] @ F.gelu(block["fc1.bias"]))
    (constant,) = [value for name, value in result.module.named_parameters() if name.startswith("_fxmin_constant_")]
    assert constant.dtype == torch.float32
    assert torch.equal(constant.reshape(-1), expected.float())


def test_compensated_layer_norm_constants_are_float64_rounded_once():
    """Dead rows of a Linear are const(gelu(b)) into a LayerNorm: its CompensatedLayerNorm stores them
    rounded once to float32 and sums them in float64, from the unrounded values."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[:3] = False
    result = fxmin.minimize(model, {"0.weight": mask}, example_inputs=(torch.randn(5, 4),))
    norm = result.module.get_submodule("2")
    assert isinstance(norm, fxmin.CompensatedLayerNorm)
    constants = F.gelu(model[0].bias.detach().double()[:3])
    assert norm.constants.dtype == torch.float32
    assert torch.equal(norm.constants, constants.float())
    assert norm._constant_sum == float(constants.sum())  # the statistics come from the float64 constants


def _mlp(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 4)).to(dtype)
    masks = {"0.weight": torch.ones(32, 16, dtype=torch.bool), "2.weight": torch.ones(24, 32, dtype=torch.bool)}
    masks["0.weight"][:10] = False  # 10 hidden units with no input: const(relu(b)) folds into layer 2's bias
    masks["2.weight"][:, 28:] = False  # 4 more unread
    params = (16 * 18 + 18) + (24 * 18 + 24) + (4 * 24 + 4)  # 32 - 10 - 4 hidden units stay
    return model.eval(), masks, (torch.randn(8, 16, dtype=dtype),), params


def _cnn(dtype):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 12, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).to(dtype)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    masks = {"0.weight": torch.ones(16, 3, 3, 3, dtype=torch.bool), "3.weight": torch.ones(12, 16, 1, 1, dtype=torch.bool)}
    masks["0.weight"][:6] = False  # 6 dead filters: their constants fold through BN and ReLU into conv 3
    masks["3.weight"][:4] = False  # 4 dead rows: const(relu(b)) through the pooling into the Linear's bias
    params = (10 * 27 + 10) + 2 * 10 + (8 * 10 + 8) + (5 * 8 + 5)  # conv, BN affine, conv, Linear
    return model.eval(), masks, (torch.randn(4, 3, 10, 10, dtype=dtype),), params


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_models_verify_with_the_tolerances_the_report_states(make, dtype):
    model, masks, inputs, params = make(dtype)
    result = fxmin.minimize(model, masks, example_inputs=inputs)
    assert fxmin.count_parameters(result.module) == params
    assert all(p.dtype == dtype for p in result.module.parameters())
    report = result.report
    assert report.tolerance_in(dtype) == TOLERANCES[dtype] and report.tolerance_in(torch.float64) == 1e-8
    assert {c.dtype for c in report.verification.comparisons} == {dtype, torch.float64}
    name = str(dtype).replace("torch.", "")
    text = report.table()
    assert re.search(rf"\n +{name} +max abs error {report.max_error_in(dtype):.2e} +tolerance {TOLERANCES[dtype]:.0e} +ok: "
                     rf"the result as returned \(folded constants rounded once to {name}\)", text)
    assert re.search(r"\n +float64 +max abs error .* +tolerance 1e-08 +ok: the result built in float64", text)
    # independently of fxmin's verification: the masked copy and the result in the model's dtype, on new
    # inputs, agree within the stated tolerance; in float64 the two agree up to the rounding of the folds
    x = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    reference = masked_copy(model, masks)
    with torch.no_grad():
        expected, got = reference(x).double(), result.module(x).double()
    assert (expected - got).abs().max() <= TOLERANCES[dtype] * max(1.0, float(expected.abs().max()))


def test_a_dtype_without_a_tolerance_is_refused_with_the_way_out():
    with pytest.raises(fxmin.InputError, match=r"no verification tolerance for torch.float8_e4m3fn.*tolerances="):
        tolerance_for(torch.float8_e4m3fn)
    assert tolerance_for(torch.float8_e4m3fn, {torch.float8_e4m3fn: 0.5}) == 0.5


@pytest.mark.parametrize("tolerances", [{"float32": 1e-5}, {torch.float32: -1.0}, {torch.int64: 1.0}, [1e-5]])
def test_bad_tolerances_are_refused(tolerances):
    model, masks, inputs, _ = _mlp(torch.float32)
    with pytest.raises(fxmin.InputError, match="tolerances must map floating torch dtypes to positive numbers"):
        fxmin.minimize(model, masks, example_inputs=inputs, tolerances=tolerances)


def test_a_tighter_tolerance_is_applied_and_reported():
    model, masks, inputs, _ = _mlp(torch.bfloat16)
    with pytest.raises(fxmin.EquivalenceError, match="in torch.bfloat16 .*tolerance 1e-09"):
        fxmin.minimize(model, masks, example_inputs=inputs, tolerances={torch.bfloat16: 1e-9})
    result = fxmin.minimize(model, masks, example_inputs=inputs, tolerances={torch.bfloat16: 0.1})
    assert result.report.tolerance_in(torch.bfloat16) == 0.1 and re.search("tolerance 1e-01 +ok", result.report.table())


def test_an_unverified_result_says_so():
    model, masks, inputs, _ = _mlp(torch.float32)
    result = fxmin.minimize(model, masks, example_inputs=inputs, verify=False)
    assert result.report.table().endswith("not verified (minimize(..., verify=False))")
