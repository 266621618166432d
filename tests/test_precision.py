"""NOTE [Fold precision]: every constant fxmin folds is computed in float64 from the model's own values
and rounded once to the model's dtype. Each test computes the fold independently in float64 (plain
torch, no fxmin), rounds it once, and compares bit for bit."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxmin


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
