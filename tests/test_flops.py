"""fxmin.flops: multiply-accumulates counted by hand for a conv net, an MLP and attention blocks."""
import pytest
import torch
from torch import nn

import fxmin
from fxmin.zoo import Attention, CausalSelfAttention


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.depthwise(self.conv2(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_conv_net_macs_counted_by_hand_including_groups():
    report = fxmin.flops(ConvNet().eval(), (torch.randn(2, 3, 8, 8),))
    by_node = {n.name: n.macs for n in report.nodes}
    assert by_node["conv1"] == 2 * 8 * 8 * 8 * (3 * 9)        # outputs x (in x kernel)
    assert by_node["conv2"] == 2 * 8 * 8 * 8 * (2 * 9)        # groups=4: 8/4 inputs per output
    assert by_node["depthwise"] == 2 * 8 * 4 * 4 * (1 * 9)    # stride 2, depthwise
    assert by_node["fc"] == 2 * 10 * 8
    assert report.macs == 27648 + 18432 + 2304 + 160
    assert by_node["bn"] == 0 and report.other > 0            # norms and pointwise: extras only


def test_mlp_macs_and_ideal_speedup_after_minimize():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).eval()
    x = torch.randn(3, 10)
    before = fxmin.flops(net, (x,))
    assert before.macs == 3 * 20 * 10 + 3 * 5 * 20
    mask = torch.ones(20, 10, dtype=torch.bool)
    mask[10:] = False                                        # 10 of the 20 hidden units dead
    result = fxmin.minimize(net, {"0.weight": mask}, (x,))
    after = fxmin.flops(result.module, (x,))
    assert after.macs == 3 * 10 * 10 + 3 * 5 * 10
    assert before.speedup(after) == 2.0


def test_written_out_attention_block():
    block = Attention(16, heads=2).eval()                     # qkv, q @ k^T, attn @ v, proj
    report = fxmin.flops(block, (torch.randn(2, 5, 16),))
    qkv, scores, mix, proj = 2 * 5 * 48 * 16, 2 * 2 * 5 * 5 * 8, 2 * 2 * 5 * 8 * 5, 2 * 5 * 16 * 16
    assert report.macs == qkv + scores + mix + proj == 11840
    assert report.by_target()["matmul"] == scores + mix


def test_sdpa_attention_block_counts_the_same_products():
    block = CausalSelfAttention(16, heads=2).eval()           # c_attn, SDPA (causal, counted dense), c_proj
    report = fxmin.flops(block, (torch.randn(2, 5, 16),))
    assert report.by_target()["scaled_dot_product_attention"] == 2 * 2 * 5 * 5 * (8 + 8)
    assert report.macs == 11840


class Extras(nn.Module):
    """One op of each cheap family: norms, pooling, softmax, pointwise, reductions, shape ops, addmm."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout()
        self.bias = nn.Parameter(torch.randn(5))
        self.weight = nn.Parameter(torch.randn(36, 5))

    def forward(self, x):                                    # x: (2, 4, 6, 6), 288 elements
        y = torch.relu(self.gn(self.bn(x)))                  # 2 + 4 + 1 per element
        y = self.drop(self.pool(y)) * 2.0                    # pooling reads 288, makes 72; dropout free
        z = torch.addmm(self.bias, y.flatten(1), self.weight)   # (2, 5): 10 outputs x 36 + the bias add
        w = nn.functional.layer_norm(z, (5,)).softmax(-1)    # 4 + 3 per element
        return w.transpose(0, 1).contiguous().float().mean()   # shape ops and copies free; mean reads 10


def test_cheap_families_counted_by_hand():
    report = fxmin.flops(Extras().eval(), (torch.randn(2, 4, 6, 6),))
    other = {n.target: n.other for n in report.nodes}
    assert other["BatchNorm2d"] == 2 * 288 and other["GroupNorm"] == 4 * 288 and other["relu"] == 288
    assert other["MaxPool2d"] == 288 and other["Dropout"] == 0 and other["mul"] == 72
    assert other["layer_norm"] == 4 * 10 and other[".softmax()"] == 3 * 10 and other[".mean()"] == 10
    assert other[".flatten()"] == other[".transpose()"] == other[".contiguous()"] == other[".float()"] == 0
    assert report.macs == other["addmm"] * 36 == 10 * 36        # the one product; everything else is extra
    assert report.other == 2 * 288 + 4 * 288 + 288 + 288 + 72 + 10 + 40 + 30 + 10


def test_products_without_a_rule_are_counted_by_torch():
    """``bmm`` and a transposed convolution have no fxmin rule: torch's counter gives their MACs."""
    class Products(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 3, bias=False)

        def forward(self, x, a, b):
            return self.up(x), torch.bmm(a, b)

    report = fxmin.flops(Products(), (torch.randn(2, 3, 5, 5), torch.randn(2, 3, 7), torch.randn(2, 7, 4)))
    by_target = report.by_target()
    assert by_target["ConvTranspose2d"] == 2 * 3 * 5 * 5 * 4 * 9   # each input scatters out x kernel
    assert by_target["bmm"] == 2 * 3 * 4 * 7


def test_unknown_leaf_module_falls_back_to_torch_counter():
    class Leaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return torch.einsum("bi,oi->bo", x, self.weight)

    gm = fxmin.trace(nn.Sequential(Leaf()), leaf_modules=[Leaf])
    report = fxmin.flops(gm, (torch.randn(3, 6),))
    assert report.macs == 3 * 4 * 6                          # nothing silently free


class TwoResolutions(nn.Module):
    """A conv at 8x8, a strided conv to 4x4, a Linear through F.linear on a parameter, used twice."""

    def __init__(self):
        super().__init__()
        self.high = nn.Conv2d(1, 4, 3, padding=1)
        self.low = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Parameter(torch.randn(3, 64))

    def forward(self, x):
        x = torch.flatten(self.low(torch.relu(self.high(x))), 1)
        return nn.functional.linear(x, self.head) + nn.functional.linear(x.flip(1), self.head)


def test_mac_costs_are_macs_per_entry_relative_to_their_mean():
    net = TwoResolutions()
    costs = fxmin.mac_costs(net, torch.randn(5, 1, 8, 8))
    assert set(costs) == {"high.weight", "low.weight", "head"}  # biases are not priced
    uses = {"high.weight": 64, "low.weight": 16, "head": 2}  # positions per image; the head is called twice
    sizes = {name: p.numel() for name, p in net.named_parameters()}
    mean = sum(uses[n] * sizes[n] for n in uses) / sum(sizes[n] for n in uses)
    for name, use in uses.items():
        assert abs(costs[name] - use / mean) < 1e-12
    # the batch size cancels; power 0 prices every entry alike; power 0.5 is the root before the mean
    assert fxmin.mac_costs(net, torch.randn(1, 1, 8, 8)) == pytest.approx(costs, rel=1e-12)
    assert set(fxmin.mac_costs(net, torch.randn(2, 1, 8, 8), power=0).values()) == {1.0}
    half = fxmin.mac_costs(net, torch.randn(2, 1, 8, 8), power=0.5)
    root_mean = sum(uses[n] ** 0.5 * sizes[n] for n in uses) / sum(sizes[n] for n in uses)
    assert abs(half["high.weight"] - 8 / root_mean) < 1e-12
    with pytest.raises(fxmin.InputError, match="power must be at least 0"):
        fxmin.mac_costs(net, torch.randn(1, 1, 8, 8), power=-0.5)


def test_mac_costs_follow_a_minimized_module_and_its_new_names():
    net = ConvNet()
    masks = {"conv1.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)}
    masks["conv1.weight"][:4] = False
    x = torch.randn(2, 3, 8, 8)
    small = fxmin.minimize(net.eval(), masks, (x,)).module
    costs = fxmin.mac_costs(small, (x,))
    assert set(costs) == {n for n in fxmin.prunable(small)}
    # conv1 and conv2 run at 8x8, depthwise at 4x4, fc once: 64 : 64 : 16 : 1 per entry
    by_layer = sorted(costs.values(), reverse=True)
    assert abs(by_layer[0] / by_layer[2] - 4) < 1e-9 and abs(by_layer[0] / by_layer[3] - 64) < 1e-9


def test_counting_leaves_a_training_model_as_it_was():
    """The traced graph shares the user's submodules: a run in training mode would move BatchNorm's
    running statistics. Counting runs in eval mode and restores every module's mode."""
    net = ConvNet().train()
    net.pool.eval()  # a mixed state comes back as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fxmin.flops(net, (torch.randn(4, 3, 8, 8),))
    fxmin.mac_costs(net, (torch.randn(4, 3, 8, 8),))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and net.bn.training and not net.pool.training
