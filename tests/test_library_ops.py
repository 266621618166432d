"""Ops of torchvision and timm recorded as single calls (fxmin/rules/libraries.py), on pure-torch
replicas: the main environment has neither library, so each replica is registered the way
``register_loaded`` registers the real module."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.fx
from torch import nn

import fxmin
from fxmin.rules import libraries
from fxmin.rules.api import Registry
from helpers import check_minimize


def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth, as written there (identity unless training with p > 0)."""
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype).bernoulli_(1.0 - p)
    return input * noise.div_(1.0 - p)


torch.fx.wrap("stochastic_depth")  # as torchvision does: traced as one call


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


class DropPath(nn.Module):
    """timm.layers.DropPath: the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


libraries._register_stochastic_depth(types.SimpleNamespace(stochastic_depth=stochastic_depth,
                                                           StochasticDepth=StochasticDepth))
libraries._register_drop_path(types.SimpleNamespace(DropPath=DropPath))


class ResidualBlock(nn.Module):
    """x + drop(conv2(relu(conv1(x)))): a ConvNeXt/EfficientNet-style residual with stochastic depth."""

    def __init__(self, drop: nn.Module | None = None, training_call: bool = False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 1)
        self.drop = drop if drop is not None else StochasticDepth(0.2, "row")
        self.training_call = training_call

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        if self.training_call:
            return x + stochastic_depth(h, 0.2, "row", True)
        return x + self.drop(h)


def _dead_hidden_masks():
    mask = torch.ones(6, 4, 1, 1, dtype=torch.bool)
    mask[[1, 4]] = False  # two hidden channels with no input: constants folded into conv2's bias
    return {"conv1.weight": mask}


@pytest.mark.parametrize("leaf", [False, True], ids=["traced call", "leaf module"])
def test_stochastic_depth_is_the_identity_in_eval(leaf):
    model = ResidualBlock().eval()
    x = torch.randn(2, 4, 5, 5)
    options = {"leaf_modules": [StochasticDepth]} if leaf else {}
    # conv1: 4 rows of (4 + 1), conv2: 4 x 4 weights + 4 bias
    check_minimize(model, _dead_hidden_masks(), (x,), expected_params=4 * 5 + 4 * 4 + 4, **options)


def test_drop_path_leaf_module_is_the_identity_in_eval():
    model = ResidualBlock(DropPath(0.1)).eval()
    check_minimize(model, _dead_hidden_masks(), (torch.randn(2, 4, 5, 5),), expected_params=4 * 5 + 4 * 4 + 4,
                   leaf_modules=[DropPath])


def test_stochastic_depth_in_training_is_refused():
    model = ResidualBlock(training_call=True).eval()
    with pytest.raises(fxmin.FxminError, match=r"model\.eval\(\)"):
        fxmin.minimize(model, _dead_hidden_masks(), (torch.randn(2, 4, 5, 5),))


def test_rules_of_a_library_register_once_it_is_imported(monkeypatch):
    registry = Registry()
    calls = []
    registry.defer("fake_library_for_fxmin", calls.append)
    assert calls == [] and registry.register_imported() == []
    fake = types.ModuleType("fake_library_for_fxmin")
    monkeypatch.setitem(sys.modules, "fake_library_for_fxmin", fake)
    node = torch.fx.Graph().placeholder("x")
    assert registry.lookup(node, None) is None  # any lookup registers what was imported since
    assert calls == [fake] and registry.register_imported() == []


def _patch_merging_pad(x):
    """torchvision.models.swin_transformer._patch_merging_pad, as written there."""
    H, W, _ = x.shape[-3:]
    x = torch.nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)


def shifted_window_attention(x, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size):
    """Stands in for torchvision's wrapped window attention (kept whole by fxmin)."""
    return torch.nn.functional.linear(x, proj_weight) + relative_position_bias.mean() + qkv_weight.sum()


def _get_relative_position_bias(table, index, window_size):
    return table[index].view(window_size[0] * window_size[1], window_size[0] * window_size[1], -1)


torch.fx.wrap("_patch_merging_pad")
torch.fx.wrap("shifted_window_attention")
torch.fx.wrap("_get_relative_position_bias")
libraries._register_swin(types.SimpleNamespace(_patch_merging_pad=_patch_merging_pad,
                                               shifted_window_attention=shifted_window_attention,
                                               _get_relative_position_bias=_get_relative_position_bias))


class PatchMerging(nn.Module):
    """Linear(3, 6) on (B, H, W, 3) -> 2x2 patch merging -> Linear(24, 4) (Swin's PatchMerging)."""

    def __init__(self, bias):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6, bias=bias), nn.Linear(24, 4)

    def forward(self, x):
        return self.fc2(_patch_merging_pad(self.fc1(x)))


@pytest.mark.parametrize("bias, size, kept", [(False, 5, 4), (True, 4, 4), (True, 5, 6)],
                         ids=["const(0), padded", "const(b), even", "const(b), padded: varies"])
def test_patch_merging_pad(bias, size, kept):
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[[2, 4]] = False
    model = PatchMerging(bias).eval()
    check_minimize(model, {"fc1.weight": mask}, (torch.randn(2, size, size, 3),),
                   expected_params=kept * (3 + bias) + 4 * kept * 4 + 4)


class WindowAttentionBlock(nn.Module):
    """fc1 -> torchvision-style wrapped window attention (kept whole) -> fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.qkv, self.proj, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 18), nn.Linear(6, 6), nn.Linear(6, 2)
        self.table = nn.Parameter(torch.randn(9, 2))
        self.register_buffer("index", torch.randint(0, 9, (16,)))

    def forward(self, x):
        bias = _get_relative_position_bias(self.table, self.index, [2, 2])
        return self.fc2(shifted_window_attention(self.fc1(x), self.qkv.weight, self.proj.weight, bias, [2, 2], 2, [0, 0]))


def test_window_attention_keeps_every_channel_around_it():
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[[0, 1]] = False  # two constant inputs of the attention: kept
    model = WindowAttentionBlock().eval()
    check_minimize(model, {"fc1.weight": mask}, (torch.randn(2, 4, 4, 3),),
                   expected_params=sum(p.numel() for p in model.parameters()) - 6 - 18)  # qkv.bias, proj.bias unused


def test_a_library_loaded_before_minimize_has_its_wrapped_functions_registered(monkeypatch):
    """NOTE [Register before tracing] in fxmin/trace.py: a deferred registration reads the library's
    functions before FX traces, not while FX has swapped its torch.fx.wrap'ed functions for wrappers."""
    library = types.ModuleType("fake_wrapping_library_for_fxmin")
    exec("import torch, torch.fx\n"
         "def scale_by_two(x):\n    return x * 2\n"
         "torch.fx.wrap('scale_by_two')\n", library.__dict__)
    fxmin.REGISTRY.defer(library.__name__, lambda module: fxmin.register_pointwise(functions=(module.scale_by_two,)))
    monkeypatch.setitem(sys.modules, library.__name__, library)  # imported after fxmin, as users do

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(library.scale_by_two(self.a(x)))

    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1] = False  # const(bias), doubled, folded into b
    check_minimize(Model().eval(), {"a.weight": mask}, (torch.randn(2, 3),), expected_params=3 * 4 + 2 * 3 + 2)
