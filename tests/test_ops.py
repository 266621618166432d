"""Every op of issue 2, in module and functional forms: exact, and something removed where it should be."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import check_minimize


class Wrap(nn.Module):
    """Wraps a callable ``f(x)`` so it is traced as written (functional, method, or module)."""

    def __init__(self, f, module: nn.Module | None = None):
        super().__init__()
        self.f = f
        self.inner = module

    def forward(self, x):
        return self.f(self, x)


def _in_module(module):
    return lambda self, x: self.inner(x)


# -- activations, dropout, identity ----------------------------------------------------------

ACTIVATIONS = {
    "nn.ReLU": nn.ReLU(), "nn.ReLU6": nn.ReLU6(), "nn.LeakyReLU": nn.LeakyReLU(0.2), "nn.GELU": nn.GELU(),
    "nn.GELU(tanh)": nn.GELU(approximate="tanh"), "nn.SiLU": nn.SiLU(), "nn.Sigmoid": nn.Sigmoid(),
    "nn.Tanh": nn.Tanh(), "nn.Hardswish": nn.Hardswish(), "nn.Hardsigmoid": nn.Hardsigmoid(),
    "nn.ELU": nn.ELU(alpha=0.7), "nn.Softplus": nn.Softplus(beta=2.0), "nn.Mish": nn.Mish(),
    "nn.Dropout": nn.Dropout(0.5), "nn.Identity": nn.Identity(),
    "torch.relu": torch.relu, "F.relu": F.relu, "x.relu()": lambda x: x.relu(), "F.relu6": F.relu6,
    "F.leaky_relu": lambda x: F.leaky_relu(x, 0.1), "F.gelu": F.gelu,
    "F.gelu(tanh)": lambda x: F.gelu(x, approximate="tanh"), "F.silu": F.silu, "torch.sigmoid": torch.sigmoid,
    "x.sigmoid()": lambda x: x.sigmoid(), "torch.tanh": torch.tanh, "x.tanh()": lambda x: x.tanh(),
    "F.hardswish": F.hardswish, "F.hardsigmoid": F.hardsigmoid, "F.elu": lambda x: F.elu(x, alpha=0.5),
    "F.softplus": lambda x: F.softplus(x, beta=0.5), "F.mish": F.mish,
    "F.dropout": lambda x: F.dropout(x, 0.3, training=False), "F.relu(inplace)": lambda x: F.relu(x, inplace=True),
}


class ActivationNet(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)
        if isinstance(activation, nn.Module):
            self.act = activation
        else:
            self.function = activation

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h) if hasattr(self, "act") else self.function(h)
        return self.fc2(h)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation(name):
    torch.manual_seed(0)
    model = ActivationNet(ACTIVATIONS[name])
    with torch.no_grad():
        model.fc1.bias[0] = 0.3  # unit 0 reads nothing: const(f(0.3)), folded into fc2's bias
    masks = {"fc1.weight": torch.ones(5, 6, dtype=torch.bool), "fc2.weight": torch.ones(3, 5, dtype=torch.bool)}
    masks["fc1.weight"][0] = False
    masks["fc2.weight"][:, 4] = False  # unit 4 unread
    # fc1 3x6+3 = 21; fc2 3x3+3 = 12
    result = check_minimize(model, masks, (torch.randn(4, 6),), expected_params=33)
    assert result.module.fc1.out_features == 3 and result.module.fc2.in_features == 3
    folded = [layer.folded_from for layer in result.report.layers if layer.name == "fc2.bias"]
    assert len(folded) == 1 and len(folded[0]) == 1 and folded[0][0].endswith("[0]")  # channel 0 folded


@pytest.mark.parametrize("module", [nn.Dropout(0.5), nn.Dropout1d(0.5), nn.Identity()])
def test_dropout_modules_stay_in_the_result(module):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), module, nn.ReLU(), nn.Linear(5, 2))
    masks = {"0.weight": torch.ones(5, 6, dtype=torch.bool)}
    masks["0.weight"][1:3] = False
    result = check_minimize(model, masks, (torch.randn(3, 6),), expected_params=3 * 6 + 3 + 2 * 3 + 2)
    assert any(type(m) is type(module) for m in result.module.modules())


# -- batch norm -----------------------------------------------------------------------------


@pytest.mark.parametrize("conv, norm, spatial", [
    (nn.Conv1d, nn.BatchNorm1d, (10,)), (nn.Conv2d, nn.BatchNorm2d, (6, 6)), (nn.Conv3d, nn.BatchNorm3d, (4, 5, 5)),
])
def test_batch_norm(conv, norm, spatial):
    torch.manual_seed(2)
    model = nn.Sequential(conv(2, 4, 3, padding=1), norm(4), nn.ReLU(), conv(4, 3, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].bias.uniform_(-1, 1)
    masks = {"0.weight": torch.ones_like(model[0].weight, dtype=torch.bool),
             "3.weight": torch.ones_like(model[3].weight, dtype=torch.bool)}
    masks["0.weight"][1] = False  # channel 1: const through BN (nonzero beta), folded into the 1x1 conv
    masks["3.weight"][:, 2] = False  # channel 2 unread
    taps = model[0].weight[0, 0].numel()
    # conv 2x2xtaps+2; BN 2 channels: 4; 1x1 conv 3x2+3 = 9
    result = check_minimize(model, masks, (torch.randn(2, 2, *spatial),), expected_params=2 * 2 * taps + 2 + 4 + 9)
    assert result.module.get_submodule("1").num_features == 2


# -- pooling -------------------------------------------------------------------------------------


POOLS = {  # name: (pooling, output side for 8x8, whether a nonzero constant stays constant)
    "nn.MaxPool2d": (nn.MaxPool2d(2), 4, True),
    "F.max_pool2d": (lambda x: F.max_pool2d(x, 2), 4, True),
    "nn.MaxPool2d(pad)": (nn.MaxPool2d(3, 2, padding=1), 4, True),
    "nn.AvgPool2d": (nn.AvgPool2d(2), 4, True),
    "F.avg_pool2d": (lambda x: F.avg_pool2d(x, 2), 4, True),
    "nn.AvgPool2d(pad, count_include_pad)": (nn.AvgPool2d(3, 2, padding=1), 4, False),
    "nn.AvgPool2d(pad, no count_include_pad)": (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), 4, True),
    "F.avg_pool2d(pad)": (lambda x: F.avg_pool2d(x, 3, 2, 1), 4, False),
    "nn.AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d(2), 2, True),
    "F.adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, (2, 2)), 2, True),
    "nn.AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d(3), 3, True),
    "F.adaptive_max_pool2d": (lambda x: F.adaptive_max_pool2d(x, 1), 1, True),
}


class PoolNet(nn.Module):
    def __init__(self, pool, side):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        if isinstance(pool, nn.Module):
            self.pool = pool
        else:
            self.function = pool
        self.fc = nn.Linear(4 * side * side, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.pool(h) if hasattr(self, "pool") else self.function(h)
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("name", list(POOLS))
def test_pooling(name):
    pool, side, stays_constant = POOLS[name]
    torch.manual_seed(3)
    model = PoolNet(pool, side)
    area = side * side
    with torch.no_grad():
        model.conv.bias[0] = 0.5  # filter 0 reads nothing: const(0.5)
    masks = {"conv.weight": torch.ones(4, 2, 3, 3, dtype=torch.bool), "fc.weight": torch.ones(3, 4 * area, dtype=torch.bool)}
    masks["conv.weight"][0] = False
    masks["fc.weight"][:, 3 * area:] = False  # channel 3's block of features is unread
    kept = 2 if stays_constant else 3  # avg pooling over zero padding makes the constant vary at borders
    expected = kept * 2 * 9 + kept + 3 * kept * area + 3
    result = check_minimize(model, masks, (torch.randn(2, 2, 8, 8),), expected_params=expected)
    assert result.module.conv.out_channels == kept


def test_mean_over_space():
    torch.manual_seed(4)

    class GlobalMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).relu().mean((2, 3)))

    model = GlobalMean()
    masks = {"conv.weight": torch.ones(4, 2, 3, 3, dtype=torch.bool)}
    masks["conv.weight"][2] = False
    check_minimize(model, masks, (torch.randn(2, 2, 6, 6),), expected_params=3 * 2 * 9 + 3 + 2 * 3 + 2)


# -- flatten / view / reshape / sizes ------------------------------------------------------------

RESHAPES = {
    "nn.Flatten": lambda self, x: self.flatten(x),
    "torch.flatten": lambda self, x: torch.flatten(x, 1),
    "x.flatten(1)": lambda self, x: x.flatten(1),
    "x.view(-1, 16*5*5)": lambda self, x: x.view(-1, 16 * 5 * 5),
    "x.view(x.size(0), -1)": lambda self, x: x.view(x.size(0), -1),
    "x.view(x.size(0), 400)": lambda self, x: x.view(x.size(0), 400),
    "x.reshape(x.shape[0], -1)": lambda self, x: x.reshape(x.shape[0], -1),
    "x.reshape((-1, 400))": lambda self, x: x.reshape((-1, 400)),
    "torch.reshape(x, (-1, 400))": lambda self, x: torch.reshape(x, (-1, 400)),
    "x.view(x.size()[0], -1)": lambda self, x: x.view(x.size()[0], -1),
    "x.view(n, c * h * w) from x.shape": lambda self, x: x.view(x.shape[0], x.shape[1] * x.shape[2] * x.shape[3]),
}


class LeNet5(nn.Module):
    """The classic: conv-pool-conv-pool, then x.view(-1, 16*5*5) into the classifier."""

    def __init__(self, reshape):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.flatten = nn.Flatten()
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 12), nn.Linear(12, 10)
        self.reshape = reshape

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.reshape(self, x)
        return self.fc2(F.relu(self.fc1(x)))


def _lenet_masks():
    masks = {"conv2.weight": torch.ones(16, 6, 5, 5, dtype=torch.bool),
             "fc1.weight": torch.ones(12, 400, dtype=torch.bool)}
    masks["conv2.weight"][[3, 7]] = False  # two constant channels -> folded into fc1
    masks["fc1.weight"][:, 25 * 10:25 * 12] = False  # channels 10, 11 unread
    return masks


@pytest.mark.parametrize("name", list(RESHAPES))
def test_flatten_view_reshape(name):
    torch.manual_seed(5)
    model = LeNet5(RESHAPES[name])
    # conv1 6x25+6 = 156; conv2 12x6x25+12 = 1812; fc1 12x(12x25)+12 = 3612; fc2 12x10+10 = 130
    result = check_minimize(model, _lenet_masks(), (torch.randn(2, 1, 32, 32),), expected_params=156 + 1812 + 3612 + 130)
    assert result.module.conv2.out_channels == 12 and result.module.fc1.in_features == 300
    if "400" in name or "16*5*5" in name or "c * h * w" in name:
        # a literal size, or one computed from x.shape (NOTE [Computed sizes]), is written as the kept count
        assert "300" in result.module.code and "400" not in result.module.code
    assert result.module(torch.randn(3, 1, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("divide", [False, True])
def test_shape_and_size_reads_of_other_axes_do_not_pin_channels(divide):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x).relu()
            n, _, height, width = h.shape
            if divide:
                pooled = h.sum(dim=(2, 3)) / (h.size(2) * h.size()[3])
            else:
                pooled = h.sum(dim=(2, 3)) * (1.0 / (h.size(2) * h.size()[3]))
            return self.fc(pooled) * (height * width / (h.size(-1) * h.size(-2))) + 0 * n

    torch.manual_seed(6)
    model = Net()
    with torch.no_grad():
        model.conv.bias[1] = -0.5  # filter 1 reads nothing: const(relu(-0.5)) = const(0)
    masks = {"conv.weight": torch.ones(4, 2, 3, 3, dtype=torch.bool), "fc.weight": torch.ones(2, 4, dtype=torch.bool)}
    masks["conv.weight"][1] = False
    masks["fc.weight"][:, 3] = False  # channel 3 unread
    # 0 * s stays const(0) for a size-derived s; 0 / s is kept as varying (s could be 0 and give nan)
    kept = 3 if divide else 2
    result = check_minimize(model, masks, (torch.randn(2, 2, 6, 6),), expected_params=kept * 18 + kept + 2 * kept + 2)
    assert result.module(torch.randn(1, 2, 9, 7)).shape == (1, 2)  # other spatial sizes still run


# -- linear and convolutions ----------------------------------------------------------------------


def test_functional_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(5, 6)), nn.Parameter(torch.randn(5))
            self.w2, self.b2 = nn.Parameter(torch.randn(2, 5)), nn.Parameter(torch.randn(2))

        def forward(self, x):
            return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)

    torch.manual_seed(7)
    model = Net()
    masks = {"w1": torch.ones(5, 6, dtype=torch.bool)}
    masks["w1"][2] = False
    result = check_minimize(model, masks, (torch.randn(3, 6),), expected_params=4 * 6 + 4 + 2 * 4 + 2)
    assert tuple(result.module.w1.shape) == (4, 6) and tuple(result.module.w2.shape) == (2, 4)


@pytest.mark.parametrize("conv, spatial", [(nn.Conv1d, (9,)), (nn.Conv2d, (7, 7)), (nn.Conv3d, (5, 5, 5))])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_chain(conv, spatial, bias):
    torch.manual_seed(8)
    model = nn.Sequential(conv(3, 5, 3, bias=bias), nn.ReLU(), conv(5, 4, 3, padding=1, bias=bias), nn.ReLU(),
                          conv(4, 2, 1, bias=bias))
    taps = model[0].weight[0, 0].numel()
    masks = {"0.weight": torch.ones_like(model[0].weight, dtype=torch.bool),
             "2.weight": torch.ones_like(model[2].weight, dtype=torch.bool)}
    masks["0.weight"][4] = False  # const(relu(b)) into a zero-padded conv: kept only if nonzero
    masks["2.weight"][:, 0] = False  # channel 0 unread
    masks["0.weight"][:, 2] = False  # input channel 2 unused: index_select
    with torch.no_grad():
        if bias:
            model[0].bias[4] = -1.0  # relu(-1) = 0: removable behind padding
    # conv0 3 filters x 2 inputs; conv2 4 filters x 3 inputs; conv4 2 x 4
    expected = 3 * 2 * taps + 4 * 3 * taps + 2 * 4 + (3 + 4 + 2 if bias else 0)
    result = check_minimize(model, masks, (torch.randn(2, 3, *spatial),), expected_params=expected)
    assert [sizes for _, *sizes in result.report.inputs] == [[3, 2]]


class UniformScaleResidual(nn.Module):
    """``scale * a(x) + b(x)``: ConvNeXt's layer scale (C, 1, 1), here at one value for every channel."""

    def __init__(self, value=1e-6, scale_first=True):
        super().__init__()
        self.scale_first = scale_first
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.scale = nn.Parameter(torch.full((6, 1, 1), value))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        scaled = self.scale * self.a(x) if self.scale_first else self.a(x) * self.scale
        return self.head(torch.relu(scaled + self.b(x)))


@pytest.mark.parametrize("order", ["scale first", "scale second"])
def test_a_uniform_scale_along_the_channels_is_sliced_with_them(order):
    """NOTE [Uniform constants]: a layer scale that holds one value (its init, 1e-6) is still sliced
    with the channels it multiplies; as a scalar it kept all 6 and no longer broadcast (a crash)."""
    torch.manual_seed(0)
    model = UniformScaleResidual(scale_first=order == "scale first")
    dead = torch.ones(6, 3, 1, 1, dtype=torch.bool)
    dead[[1, 4]] = False  # channels 1 and 4 die in both branches: constant, folded into the head's bias
    result = check_minimize(model, {"a.weight": dead, "b.weight": dead}, (torch.randn(2, 3, 5, 5),))
    assert tuple(result.module.scale.shape) == (4, 1, 1)
    assert result.module.head.in_channels == 4
