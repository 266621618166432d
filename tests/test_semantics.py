"""The semantics of issue 2: fixed point, folding, coupling, inputs, outputs, purity, trainability.

Every expected parameter count below is worked out by hand in the comment next to it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import fxmin
from helpers import check_minimize, masked_copy


def ones_like_params(model: nn.Module, *names: str) -> dict:
    parameters = dict(model.named_parameters())
    return {name: torch.ones_like(parameters[name], dtype=torch.bool) for name in names}


def mlp(*widths: int, activation=nn.ReLU) -> nn.Sequential:
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def set_bias(module: nn.Module, index: int, value: float) -> None:
    with torch.no_grad():
        module.bias[index] = value


# -- the fixed point ------------------------------------------------------------------------------


def test_fixed_point_cascades_forward_and_backward_through_depth():
    """Dead units propagate forward (constants fold into readers), unread units propagate backward."""
    torch.manual_seed(0)
    model = mlp(6, 5, 4, 3, 2)  # Linear at 0, 2, 4, 6
    set_bias(model[0], 0, 0.7)  # h1[0] becomes const(relu(0.7)) != 0
    masks = ones_like_params(model, "0.weight", "2.weight", "4.weight", "6.weight")
    # forward: h1[0] reads nothing -> const; h2[1] reads only h1[0] -> const (two layers away)
    masks["0.weight"][0, :] = False
    masks["2.weight"][1, :] = False
    masks["2.weight"][1, 0] = True
    # backward: nobody reads h3[2] -> h3[2] goes; h2[3] is read only by h3[2] -> goes; h1[4] is read
    # only by h2[3] -> goes; input feature 5 is read only by h1[4] -> dropped at the input.
    masks["6.weight"][:, 2] = False
    masks["4.weight"][:, 3] = False
    masks["4.weight"][2, 3] = True
    masks["2.weight"][:, 4] = False
    masks["2.weight"][3, 4] = True
    masks["0.weight"][:, 5] = False
    masks["0.weight"][4, 5] = True
    # kept: input 0..4 (5), h1 {1,2,3}, h2 {0,2}, h3 {0,1}, out 2
    # 0: 3x5+3 = 18; 2: 2x3+2 = 8; 4: 2x2+2 = 6; 6: 2x2+2 = 6 -> 38
    result = check_minimize(model, masks, (torch.randn(4, 6),), expected_params=38)
    module = result.module
    assert (module.get_submodule("0").in_features, module.get_submodule("0").out_features) == (5, 3)
    assert (module.get_submodule("2").in_features, module.get_submodule("2").out_features) == (3, 2)
    assert (module.get_submodule("4").in_features, module.get_submodule("4").out_features) == (2, 2)
    assert (module.get_submodule("6").in_features, module.get_submodule("6").out_features) == (2, 2)
    assert [sizes for _, *sizes in result.report.inputs] == [[6, 5]]


@pytest.mark.parametrize("depth", [2, 5, 12])
def test_dead_unit_cascades_forward_through_any_depth(depth):
    """Unit 0 of layer 1 reads nothing; unit 0 of every later layer reads only unit 0 before it."""
    torch.manual_seed(depth)
    widths = [4] + [3] * depth + [2]
    model = mlp(*widths, activation=nn.Tanh)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    masks = ones_like_params(model, *[f"{name}.weight" for name in linears])
    masks[f"{linears[0]}.weight"][0] = False
    for name in linears[1:-1]:
        masks[f"{name}.weight"][0, 1:] = False
    # first: 2x4+2 = 10; each of the depth-1 middle layers: 2x2+2 = 6; last: 2x2+2 = 6
    expected = 10 + 6 * (depth - 1) + 6
    result = check_minimize(model, masks, (torch.randn(5, 4),), expected_params=expected)
    folded = [layer for layer in result.report.layers if layer.folded_from]
    assert len(folded) == depth  # every reader of a unit-0 constant got it in its bias


@pytest.mark.parametrize("depth", [2, 5, 12])
def test_unread_unit_cascades_backward_through_any_depth(depth):
    """Nobody reads the last hidden unit 2; unit 2 of each layer is read only by unit 2 after it."""
    torch.manual_seed(depth)
    widths = [4] + [3] * depth + [2]
    model = mlp(*widths, activation=nn.Sigmoid)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    masks = ones_like_params(model, *[f"{name}.weight" for name in linears])
    masks[f"{linears[-1]}.weight"][:, 2] = False
    for name in linears[1:-1]:
        masks[f"{name}.weight"][:, 2] = False
        masks[f"{name}.weight"][2, 2] = True
    masks[f"{linears[0]}.weight"][:, 3] = False
    masks[f"{linears[0]}.weight"][2, 3] = True  # input feature 3 feeds only the dead chain
    # first: 2x3+2 = 8 (input feature 3 dropped); middle: 2x2+2 = 6 each; last: 2x2+2 = 6
    expected = 8 + 6 * (depth - 1) + 6
    result = check_minimize(model, masks, (torch.randn(5, 4),), expected_params=expected)
    assert [sizes for _, *sizes in result.report.inputs] == [[4, 3]]


# -- nonzero biases of dead units are folded exactly ------------------------------------------------


def test_dead_unit_through_sigmoid_folds_f_of_zero():
    torch.manual_seed(1)
    model = mlp(4, 3, 2, activation=nn.Sigmoid)
    set_bias(model[0], 0, 0.0)  # sigmoid(0) = 0.5, not 0
    masks = {"0.weight": torch.ones(3, 4, dtype=torch.bool)}
    masks["0.weight"][0] = False
    result = check_minimize(model, masks, (torch.randn(3, 4),), expected_params=2 * 4 + 2 + 2 * 2 + 2)
    expected_bias = model[2].bias.double() + 0.5 * model[2].weight[:, 0].double()
    torch.testing.assert_close(result.module.get_submodule("2").bias.double(), expected_bias, rtol=0, atol=1e-6)
    assert result.module.get_submodule("2").weight.shape == (2, 2)
    torch.testing.assert_close(result.module.get_submodule("2").weight, model[2].weight[:, 1:])


def test_dead_unit_through_batchnorm_with_beta_and_zero_gamma_folds():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.4, -0.3, 0.2]))
        bn = model[1]
        bn.weight.copy_(torch.tensor([1.5, 0.0, 0.8]))  # gamma_1 == 0: channel 1 is const(beta_1)
        bn.bias.copy_(torch.tensor([0.3, 0.9, -0.1]))
        bn.running_mean.copy_(torch.tensor([0.1, 0.5, -0.2]))
        bn.running_var.copy_(torch.tensor([2.0, 0.7, 1.3]))
    masks = {"0.weight": torch.ones(3, 4, dtype=torch.bool)}
    masks["0.weight"][0] = False  # unit 0: const(bn(0.4)) with nonzero beta
    # Linear 1x4+1 = 5; BatchNorm 1 channel: weight+bias = 2; last Linear 2x1+2 = 4 -> 11
    result = check_minimize(model, masks, (torch.randn(6, 4),), expected_params=11)
    c0 = max(0.0, 1.5 * (0.4 - 0.1) / (2.0 + bn.eps) ** 0.5 + 0.3)
    c1 = max(0.0, 0.9)
    w = model[3].weight.double()
    expected_bias = model[3].bias.double() + w[:, 0] * c0 + w[:, 1] * c1
    torch.testing.assert_close(result.module.get_submodule("3").bias.double(), expected_bias, rtol=0, atol=1e-6)
    new_bn = result.module.get_submodule("1")
    assert isinstance(new_bn, nn.BatchNorm1d) and new_bn.num_features == 1
    torch.testing.assert_close(new_bn.running_mean, bn.running_mean[2:])
    torch.testing.assert_close(new_bn.running_var, bn.running_var[2:])


# -- constants into convolutions ------------------------------------------------------------------


def _two_convs(padding: int, bias: float, padding_mode: str = "zeros"):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(3, 2, 3, padding=padding, padding_mode=padding_mode))
    set_bias(model[0], 0, bias)
    masks = {"0.weight": torch.ones(3, 2, 3, 3, dtype=torch.bool)}
    masks["0.weight"][0] = False  # filter 0 reads nothing: const(relu(bias))
    return model, masks


def test_nonzero_constant_into_zero_padded_conv_is_kept():
    model, masks = _two_convs(padding=1, bias=0.5)
    # nothing removable: conv 3x2x9+3 = 57, conv 2x3x9+2 = 56
    result = check_minimize(model, masks, (torch.randn(2, 2, 6, 6),), expected_params=113)
    assert result.module.get_submodule("2").in_channels == 3


def test_zero_constant_into_zero_padded_conv_goes():
    model, masks = _two_convs(padding=1, bias=-0.5)  # relu(-0.5) = 0
    # conv 2x2x9+2 = 38, conv 2x2x9+2 = 38
    check_minimize(model, masks, (torch.randn(2, 2, 6, 6),), expected_params=76)


@pytest.mark.parametrize("padding, padding_mode", [(0, "zeros"), (1, "reflect"), (1, "replicate")])
def test_nonzero_constant_into_unpadded_conv_is_folded(padding, padding_mode):
    model, masks = _two_convs(padding=padding, bias=0.5, padding_mode=padding_mode)
    result = check_minimize(model, masks, (torch.randn(2, 2, 6, 6),), expected_params=76)
    conv = model[2]
    expected_bias = conv.bias.double() + 0.5 * conv.weight[:, 0].double().sum(dim=(1, 2))
    torch.testing.assert_close(result.module.get_submodule("2").bias.double(), expected_bias, rtol=0, atol=1e-6)


# -- grouped and depthwise convolutions -----------------------------------------------------------------


def _grouped():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    masks = {"2.weight": torch.ones(8, 2, 3, 3, dtype=torch.bool)}
    return model, masks
# original: 4x3+4 = 16; 8x2x9+8 = 152; 2x8+2 = 18 -> 186


def test_grouped_conv_keeps_groups_uniform_on_outputs():
    model, masks = _grouped()
    masks["2.weight"][[0, 1, 4]] = False  # group 0 could lose 2 filters, group 1 only 1
    # each group keeps 3 filters: 6x2x9+6 = 114; first conv 16; last 2x6+2 = 14 -> 144
    result = check_minimize(model, masks, (torch.randn(2, 3, 6, 6),), expected_params=144)
    conv = result.module.get_submodule("2")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 6)


def test_grouped_conv_keeps_groups_uniform_on_inputs():
    model, masks = _grouped()
    masks["2.weight"][0:4, 0] = False  # input channel 0 unread, but group 1 needs both its inputs
    result = check_minimize(model, masks, (torch.randn(2, 3, 6, 6),), expected_params=186)
    assert result.module.get_submodule("2").groups == 2 and result.module.get_submodule("0").out_channels == 4


def test_grouped_conv_drops_a_whole_empty_group():
    model, masks = _grouped()
    masks["2.weight"][0:4] = False  # every filter of group 0 is constant -> its inputs are unread
    # first conv 2x3+2 = 8; grouped conv becomes groups=1: 4x2x9+4 = 76; last 2x4+2 = 10 -> 94
    result = check_minimize(model, masks, (torch.randn(2, 3, 6, 6),), expected_params=94)
    conv = result.module.get_submodule("2")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (1, 2, 4)


def _depthwise(multiplier: int):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4 * multiplier, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(4 * multiplier, 2, 1))
    return model


def test_depthwise_conv_zero_input_removes_its_output_channel():
    model = _depthwise(1)
    masks = {"0.weight": torch.ones(4, 3, 1, 1, dtype=torch.bool), "0.bias": torch.ones(4, dtype=torch.bool)}
    masks["0.weight"][1] = False
    masks["0.bias"][1] = False  # channel 1 is const(0): the depthwise output 1 is const(bias)
    # 3x3+3 = 12; depthwise 3x1x9+3 = 30; last 2x3+2 = 8 -> 50
    result = check_minimize(model, masks, (torch.randn(2, 3, 6, 6),), expected_params=50)
    conv = result.module.get_submodule("2")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (3, 3, 3)


def test_depthwise_conv_dead_filter_removes_its_input_channel():
    model = _depthwise(1)
    masks = {"2.weight": torch.ones(4, 1, 3, 3, dtype=torch.bool)}
    masks["2.weight"][2] = False  # output 2 is const(bias); input 2 is read by nobody else
    result = check_minimize(model, masks, (torch.randn(2, 3, 6, 6),), expected_params=50)
    assert result.module.get_submodule("0").out_channels == 3


def test_depthwise_conv_with_channel_multiplier():
    model = _depthwise(2)  # input c feeds outputs 2c and 2c+1
    masks = {"2.weight": torch.ones(8, 1, 3, 3, dtype=torch.bool)}
    masks["2.weight"][[2, 3]] = False  # both outputs of input 1 are dead: input 1 goes
    masks["2.weight"][4] = False  # one output of input 2 only: the multiplier keeps it
    # 3x3+3 = 12; depthwise 6x1x9+6 = 60; last 2x6+2 = 14 -> 86
    result = check_minimize(model, masks, (torch.randn(2, 3, 6, 6),), expected_params=86)
    conv = result.module.get_submodule("2")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (3, 3, 6)


# -- inputs and outputs -------------------------------------------------------------------------


def test_unused_input_features_are_dropped_with_index_select():
    torch.manual_seed(6)
    model = mlp(16, 8, 3)
    masks = {"0.weight": torch.ones(8, 16, dtype=torch.bool)}
    masks["0.weight"][:, [0, 3, 15]] = False  # like MNIST border pixels
    # 8x13+8 = 112; 3x8+3 = 27
    result = check_minimize(model, masks, (torch.randn(4, 16),), expected_params=139)
    assert result.module.get_submodule("0").in_features == 13
    assert "index_select" in result.module.code
    assert [sizes for _, *sizes in result.report.inputs] == [[16, 13]]
    assert result.module(torch.randn(7, 16)).shape == (7, 3)  # same signature


def test_unused_input_channels_of_a_conv_are_dropped():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    masks = {"0.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}
    masks["0.weight"][:, 1] = False
    # 4x2x9+4 = 76; 2x64+2 = 130
    result = check_minimize(model, masks, (torch.randn(2, 3, 6, 6),), expected_params=206)
    assert result.module.get_submodule("0").in_channels == 2
    assert result.module(torch.randn(1, 3, 6, 6)).shape == (1, 2)


def test_outputs_never_shrink():
    torch.manual_seed(8)
    model = mlp(4, 5, 3)
    masks = {"2.weight": torch.ones(3, 5, dtype=torch.bool), "2.bias": torch.ones(3, dtype=torch.bool)}
    masks["2.weight"][1] = False  # output 1 is constant...
    masks["2.bias"][1] = False  # ...and even zero: it still stays
    result = check_minimize(model, masks, (torch.randn(2, 4),), expected_params=5 * 4 + 5 + 3 * 5 + 3)
    assert result.module.get_submodule("2").out_features == 3
    out = result.module(torch.randn(6, 4))
    assert out.shape == (6, 3) and torch.all(out[:, 1] == 0)


def test_multiple_outputs_keep_their_shapes():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head_a, self.head_b = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.head_a(h), {"b": self.head_b(h), "h": h}

    torch.manual_seed(9)
    model = TwoHeads()
    masks = {"head_a.weight": torch.zeros(3, 6, dtype=torch.bool)}  # head_a reads nothing
    result = check_minimize_multi(model, masks, (torch.randn(2, 4),))
    a, rest = result.module(torch.randn(5, 4))
    assert a.shape == (5, 3) and rest["b"].shape == (5, 2) and rest["h"].shape == (5, 6)


def check_minimize_multi(model, masks, example_inputs):
    result = fxmin.minimize(model, masks, example_inputs)
    reference = masked_copy(model, masks).double()
    actual = copy.deepcopy(result.module).double()
    x = torch.randn(7, *example_inputs[0].shape[1:], dtype=torch.float64)
    expected, got = reference(x), actual(x)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1]["b"], expected[1]["b"])
    torch.testing.assert_close(got[1]["h"], expected[1]["h"])
    return result


def test_verification_runs_in_float64_and_the_model_dtype_on_example_and_random_inputs():
    torch.manual_seed(21)
    model = mlp(6, 5, 2)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[0] = False
    result = fxmin.minimize(model, {"0.weight": mask}, (torch.randn(3, 6),), trials=2)
    comparisons = result.report.verification.comparisons
    assert {c.dtype for c in comparisons} == {torch.float64, torch.float32}
    assert {c.inputs for c in comparisons} == {"example", "random #1", "random #2"}
    assert all(c.ok for c in comparisons) and result.report.max_error < 1e-6


# -- purity --------------------------------------------------------------------------------------


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _storages(module):
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def test_model_and_masks_are_never_modified():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    model.train()
    masks = {"0.weight": (torch.rand(4, 2, 3, 3) > 0.5).float(), "4.weight": torch.rand(3, 64) > 0.3}
    masks["0.weight"][1] = 0
    before, masks_before = _snapshot(model), {k: v.clone() for k, v in masks.items()}
    dtypes = {k: v.dtype for k, v in masks.items()}
    result = check_minimize(model, masks, (torch.randn(2, 2, 6, 6),))
    assert result.report.params_after < result.report.params_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} was modified"
    for key in masks:
        assert masks[key].dtype == dtypes[key] and torch.equal(masks[key], masks_before[key])
    assert model.training, "minimize must not switch the user's model to eval()"
    assert not (_storages(result.module) & _storages(model)), "result shares storage with the model"
    with torch.no_grad():
        for p in result.module.parameters():
            p.add_(1.0)
    for key in before:
        assert torch.equal(before[key], model.state_dict()[key])


def test_prune_reparametrized_model_is_not_modified():
    torch.manual_seed(11)
    model = mlp(6, 5, 2)
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    hooks_before = len(model[0]._forward_pre_hooks)
    before = _snapshot(model)
    fxmin.minimize(model, None, (torch.randn(2, 6),))
    assert hasattr(model[0], "weight_orig") and hasattr(model[0], "weight_mask")
    assert len(model[0]._forward_pre_hooks) == hooks_before
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value)


# -- where masks come from ------------------------------------------------------------------------


def test_masks_none_reads_torch_prune_masks():
    torch.manual_seed(12)
    model = mlp(6, 5, 2)
    mask = torch.ones(5, 6)
    mask[1] = 0
    mask[:, 4] = 0
    prune.custom_from_mask(model[0], "weight", mask)
    # unit 1 folds, input feature 4 is dropped: 4x5+4 = 24; 2x4+2 = 10
    result = check_minimize(model, None, (torch.randn(2, 6),), expected_params=34)
    assert set(result.masks) == {"0.weight"} and torch.equal(result.masks["0.weight"], mask.bool())
    assert "weight_orig" not in dict(result.module.named_parameters()).keys()


def test_masks_none_reads_exact_zeros_in_the_weights():
    torch.manual_seed(13)
    model = mlp(6, 5, 2)
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[2].weight[:, 3] = 0.0
    # unit 2 folds, unit 3 is unread: 3x6+3 = 21; 2x3+2 = 8
    check_minimize(model, None, (torch.randn(2, 6),), expected_params=29)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool])
def test_zero_one_masks_of_any_dtype_are_accepted(dtype):
    torch.manual_seed(14)
    model = mlp(6, 5, 2)
    mask = torch.ones(5, 6, dtype=dtype)
    mask[0] = 0
    check_minimize(model, {"0.weight": mask}, (torch.randn(2, 6),), expected_params=4 * 6 + 4 + 2 * 4 + 2)


# -- tracing options --------------------------------------------------------------------------


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = self.fc2(h).tanh()
        return self.fc3(h) + 1.0


def test_custom_forward():
    torch.manual_seed(15)
    model = CustomNet()
    masks = {"fc1.weight": torch.ones(5, 6, dtype=torch.bool), "fc3.weight": torch.ones(2, 4, dtype=torch.bool)}
    masks["fc1.weight"][0] = False
    masks["fc3.weight"][:, 1] = False
    # fc1 4x6+4 = 28; fc2 3x4+3 = 15; fc3 2x3+2 = 8
    check_minimize(model, masks, (torch.randn(3, 6),), expected_params=51)


class Moody(nn.Module):
    """Not traceable: its forward branches on data."""

    def forward(self, x):
        if x.sum() > 0:
            return torch.relu(x)
        return torch.relu(x)


class WithMoody(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 4), Moody(), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc3(self.act(self.fc2(torch.relu(self.fc1(x)))))


def _moody_masks():
    masks = {"fc1.weight": torch.ones(5, 6, dtype=torch.bool), "fc2.weight": torch.ones(4, 5, dtype=torch.bool)}
    masks["fc1.weight"][0] = False  # folds into fc2: away from the barrier
    masks["fc2.weight"][1] = False  # const, but it feeds the barrier: kept
    return masks
# fc1 4x6+4 = 28; fc2 4x4+4 = 20; fc3 2x4+2 = 10 -> 58


@pytest.mark.parametrize("leaf", [Moody, "act"])
def test_user_leaf_modules(leaf):
    torch.manual_seed(16)
    check_minimize(WithMoody(), _moody_masks(), (torch.randn(3, 6),), expected_params=58,
                   leaf_modules=[leaf], barriers=[Moody])


def test_user_tracer():
    class MoodyLeaf(torch.fx.Tracer):
        def is_leaf_module(self, module, qualified_name):
            return isinstance(module, Moody) or super().is_leaf_module(module, qualified_name)

    torch.manual_seed(17)
    tracer = MoodyLeaf()
    check_minimize(WithMoody(), _moody_masks(), (torch.randn(3, 6),), expected_params=58,
                   tracer=tracer, barriers=["act"])


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x, squash=False):
        h = self.fc1(x)
        if squash:
            h = torch.sigmoid(h)
        else:
            h = torch.relu(h)
        return self.fc2(h)


@pytest.mark.parametrize("squash", [True, False])
def test_concrete_args(squash):
    torch.manual_seed(18)
    model = Flagged()
    masks = {"fc1.weight": torch.ones(5, 6, dtype=torch.bool)}
    masks["fc1.weight"][3] = False
    # FX keeps a placeholder for a specialized argument, with the signature's default, and asserts
    # its value: a non-default specialization is passed along (the result takes the same inputs).
    extra = () if squash is False else (squash,)
    result = fxmin.minimize(model, masks, (torch.randn(3, 6), *extra), concrete_args={"squash": squash})
    assert fxmin.count_parameters(result.module) == 4 * 6 + 4 + 2 * 4 + 2
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = masked_copy(model, masks).double()(x, squash=squash)
    torch.testing.assert_close(copy.deepcopy(result.module).double()(x, *extra), expected)


# -- convolution variants -------------------------------------------------------------------------


CONV_VARIANTS = [
    # (conv type, spatial input, kwargs of both convs)
    (nn.Conv1d, (12,), dict(kernel_size=3)),
    (nn.Conv1d, (12,), dict(kernel_size=3, stride=2, padding=1)),
    (nn.Conv1d, (12,), dict(kernel_size=3, dilation=2, padding=2)),
    (nn.Conv2d, (9, 9), dict(kernel_size=3, stride=2)),
    (nn.Conv2d, (9, 9), dict(kernel_size=(3, 1), padding=(1, 0))),
    (nn.Conv2d, (9, 9), dict(kernel_size=3, dilation=2, padding="same")),
    (nn.Conv2d, (9, 9), dict(kernel_size=3, padding=1, padding_mode="circular")),
    (nn.Conv3d, (5, 6, 6), dict(kernel_size=3, padding=1)),
    (nn.Conv3d, (4, 20, 20), dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), dilation=(1, 2, 1))),
]


@pytest.mark.parametrize("conv, spatial, kwargs", CONV_VARIANTS)
def test_conv_variants(conv, spatial, kwargs):
    torch.manual_seed(19)
    model = nn.Sequential(conv(2, 4, **kwargs), nn.ReLU(), conv(4, 3, **kwargs))
    set_bias(model[0], 0, -1.0)  # dead filter 0 with negative bias: const(relu(-1)) = const(0)
    taps = model[0].weight[0, 0].numel()
    masks = {"0.weight": torch.ones_like(model[0].weight, dtype=torch.bool),
             "2.weight": torch.ones_like(model[2].weight, dtype=torch.bool)}
    masks["0.weight"][0] = False
    masks["2.weight"][:, 3] = False  # channel 3 unread
    # conv 2 filters x 2 inputs + 2 biases; conv 3 filters x 2 inputs + 3 biases
    expected = 2 * 2 * taps + 2 + 3 * 2 * taps + 3
    result = check_minimize(model, masks, (torch.randn(2, 2, *spatial),), expected_params=expected)
    assert result.module.get_submodule("0").stride == model[0].stride and result.module.get_submodule("0").dilation == model[0].dilation


# -- the result stays trainable --------------------------------------------------------------------


def test_result_stays_trainable():
    torch.manual_seed(20)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                          nn.Linear(4 * 16, 5), nn.Dropout(0.2), nn.ReLU(), nn.Linear(5, 2))
    model[0].bias.requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    masks = {"0.weight": torch.ones(4, 2, 3, 3, dtype=torch.bool), "8.weight": torch.ones(2, 5, dtype=torch.bool)}
    masks["0.weight"][2] = False
    masks["8.weight"][:, 1] = False
    result = check_minimize(model, masks, (torch.randn(2, 2, 6, 6),))
    module = result.module
    original = dict(model.named_parameters())
    for name, parameter in module.named_parameters():
        assert type(parameter) is nn.Parameter and parameter.is_leaf
        assert parameter.requires_grad == original[name].requires_grad, name
    bn = module.get_submodule("1")
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 3
    torch.testing.assert_close(bn.running_mean, model[1].running_mean[[0, 1, 3]])
    torch.testing.assert_close(bn.running_var, model[1].running_var[[0, 1, 3]])
    assert [type(m) for m in module.modules() if isinstance(m, nn.Dropout)] == [nn.Dropout, nn.Dropout]
    module.train()
    loss = module(torch.randn(8, 2, 6, 6)).square().sum()
    loss.backward()
    assert module.get_submodule("0").weight.grad is not None and module.get_submodule("0").bias.grad is None
    assert module.get_submodule("5").weight.grad is not None
    assert not torch.equal(bn.running_mean, model[1].running_mean[[0, 1, 3]]), "BN running stats update in train()"
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.step()
