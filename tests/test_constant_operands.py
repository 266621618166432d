"""NOTE [Constant operands]: a branch whose every channel is a proven constant, joining a live tensor
through an elementwise op, becomes a constant and the branch leaves the model (a ConvNeXt block whose
MLP was emptied by pruning)."""
from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxmin


class Block(nn.Module):
    """A pre-norm residual MLP block with a layer scale: ``x + scale * fc2(gelu(fc1(norm(x))))``."""

    def __init__(self, width=8, hidden=16, op=operator.add, branch_first=True):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)
        self.op, self.branch_first = op, branch_first

    def forward(self, x):
        branch = self.scale * self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.op(branch, x) if self.branch_first else self.op(x, branch)


class Net(nn.Module):
    def __init__(self, blocks=2, **block):
        super().__init__()
        self.stem = nn.Linear(5, 8)
        self.blocks = nn.Sequential(*(Block(**block) for _ in range(blocks)))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def _net(seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    return Net(**kwargs).to(dtype).eval()


def _emptied(net, blocks):
    """Masks that empty the MLP of each block in ``blocks`` (fc1 keeps no weight)."""
    return {f"blocks.{b}.fc1.weight": torch.zeros_like(net.blocks[b].fc1.weight, dtype=torch.bool) for b in blocks}


def _assert_equal_in_float64(net, masks, module, inputs):
    """``net`` and ``module`` are float64 (a float32 model's folded constants are rounded to float32)."""
    reference = fxmin.masks.masked_reference(net, masks)[0]
    with torch.no_grad():
        torch.testing.assert_close(module(inputs), reference(inputs), rtol=1e-12, atol=1e-12)


def _called(module):
    return {n.target for n in module.graph.nodes if n.op == "call_module"}


@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul, torch.add], ids=["add", "sub", "mul", "torch.add"])
@pytest.mark.parametrize("branch_first", [True, False], ids=["branch-first", "stream-first"])
def test_an_emptied_block_leaves_the_model_and_its_bias_stays_as_a_constant(op, branch_first):
    net = _net(op=op, branch_first=branch_first, dtype=torch.float64)
    masks = _emptied(net, [1])
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = fxmin.minimize(net, masks, example_inputs=(x,))
    module = result.module
    assert not {"blocks.1.norm", "blocks.1.fc1", "blocks.1.fc2"} & _called(module)
    assert {"blocks.0.norm", "blocks.0.fc1", "blocks.0.fc2"} <= _called(module)
    constants = [name for name, _ in module.named_parameters() if name.startswith("_fxmin_constant_")]
    assert len(constants) == 1 and tuple(module.get_parameter(constants[0]).shape) == (1, 8)
    block = (8 + 8) + (8 * 16 + 16) + (16 * 8 + 8) + 8  # norm, fc1, fc2, scale of the block that stays
    assert fxmin.count_parameters(module) == (5 * 8 + 8) + block + 8 + (8 * 3 + 3)
    _assert_equal_in_float64(net, masks, module, torch.randn(7, 5, generator=torch.Generator().manual_seed(2),
                                                             dtype=torch.float64))
    removed = {c.name for c in result.report.layers if c.kind == "removed: read by nothing"}
    assert {"blocks.1.fc1.weight", "blocks.1.fc2.bias", "blocks.1.scale", "blocks.1.norm.weight"} <= removed
    assert any(c.kind == "constant operand" and c.name == constants[0] for c in result.report.layers)


def test_the_constant_trains_when_the_model_does_and_is_a_buffer_when_it_is_frozen():
    net = _net()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    module = fxmin.minimize(net, _emptied(net, [0, 1]), example_inputs=(x,)).module
    constants = [p for name, p in module.named_parameters() if name.startswith("_fxmin_constant_")]
    assert len(constants) == 2 and all(p.requires_grad for p in constants)
    module(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in constants)
    frozen = _net().requires_grad_(False)
    module = fxmin.minimize(frozen, _emptied(frozen, [0]), example_inputs=(x,)).module
    assert not [n for n, _ in module.named_parameters() if n.startswith("_fxmin_constant_")]
    assert [n for n, _ in module.named_buffers() if n.startswith("_fxmin_constant_")]


class ReadTwice(nn.Module):
    """The constant branch is also an output: it must stay, and the sum still gets the constant."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.stem(x)
        branch = self.fc2(torch.relu(self.fc1(h)))
        return h + branch, branch


def test_a_branch_read_elsewhere_stays_and_the_result_is_the_same():
    torch.manual_seed(0)
    net = ReadTwice().eval()
    masks = {"fc1.weight": torch.zeros(16, 8, dtype=torch.bool)}
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    module = fxmin.minimize(net, masks, example_inputs=(x,)).module
    assert "fc2" in _called(module)
    reference = fxmin.masks.masked_reference(net, masks)[0]
    with torch.no_grad():
        for got, expected in zip(module(x), reference(x)):
            torch.testing.assert_close(got, expected)


def test_the_minimized_model_exports_and_the_user_model_is_untouched():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    module = fxmin.minimize(net, _emptied(net, [1]), example_inputs=(x,)).module
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x), module(x))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 4), data=st.data())
def test_random_blocks_emptied_at_random_compute_the_same(blocks, data):
    emptied = data.draw(st.lists(st.integers(0, blocks - 1), unique=True))
    seed = data.draw(st.integers(0, 2**16))
    op = data.draw(st.sampled_from([operator.add, operator.sub, operator.mul]))
    net = _net(seed, blocks=blocks, op=op, branch_first=data.draw(st.booleans()), dtype=torch.float64)
    masks = _emptied(net, emptied)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in net.named_parameters():  # sparse masks elsewhere
        if name.endswith("weight") and parameter.dim() == 2 and name not in masks:
            masks[name] = torch.rand(parameter.shape, generator=generator) > 0.3
    x = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    module = fxmin.minimize(net, masks, example_inputs=(x,)).module
    _assert_equal_in_float64(net, masks, module, torch.randn(6, 5, generator=generator, dtype=torch.float64))
    for b in emptied:
        assert f"blocks.{b}.fc2" not in _called(module)


def test_a_minimized_model_with_a_constant_minimizes_again_and_the_constant_follows_the_stream():
    """The Squeeze-Release cycle minimizes its own output: the constant is a model constant then, and a
    residual channel removed later leaves it too."""
    net = _net(dtype=torch.float64)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = fxmin.minimize(net, _emptied(net, [1]), example_inputs=(x,)).module
    (name,) = [n for n, _ in first.named_parameters() if n.startswith("_fxmin_constant_")]
    # kill residual channels 2 and 5 everywhere: stem rows, every block's reads and writes, head columns
    dead = torch.ones(8, dtype=torch.bool)
    dead[[2, 5]] = False
    masks = {"stem.weight": dead[:, None].expand(8, 5).clone(), "head.weight": dead[None, :].expand(3, 8).clone()}
    second_model = fxmin.masks.masked_reference(first, masks)[0]
    with torch.no_grad():
        second_model.stem.bias[~dead] = 0.0
        second_model.get_parameter(name)[0, ~dead] = 0.0
        block = second_model.blocks.get_submodule("0")
        block.fc2.weight[~dead] = 0.0
        block.fc2.bias[~dead] = 0.0
    second = fxmin.minimize(second_model, {}, example_inputs=(x,)).module
    assert tuple(second.get_parameter(name).shape) == (1, 6)
    _assert_equal_in_float64(second_model, {}, second, torch.randn(6, 5, generator=torch.Generator().manual_seed(3),
                                                                    dtype=torch.float64))


class InPlaceBranch(nn.Module):
    """The constant branch ends in an in-place update: once the sum reads a constant, nothing reads it,
    but an in-place call is never dropped (nor what it reads)."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.stem(x)
        branch = self.fc2(torch.relu(self.fc1(h))).add_(1.0)
        return h + branch


def test_an_in_place_node_in_the_branch_stays_and_the_result_is_the_same():
    torch.manual_seed(0)
    net = InPlaceBranch().eval()
    masks = {"fc1.weight": torch.zeros(16, 8, dtype=torch.bool)}
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    result = fxmin.minimize(net, masks, example_inputs=(x,))
    assert any(n.target == "add_" for n in result.module.graph.nodes if n.op == "call_method")
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), fxmin.masks.masked_reference(net, masks)[0](x))


def test_a_gpt_block_whose_mlp_is_emptied_loses_its_mlp_and_second_norm():
    """The same on a transformer: (batch, tokens, channels), the constant shaped (1, 1, C)."""
    from fxmin import zoo
    torch.manual_seed(0)
    model = zoo.gpt(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16).double().eval()
    masks = {"transformer.h.0.mlp.c_fc.weight": torch.zeros_like(model.transformer.h[0].mlp.c_fc.weight,
                                                                 dtype=torch.bool)}
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    result = fxmin.minimize(model, masks, example_inputs=(tokens,))
    called = _called(result.module)
    assert not {"transformer.h.0.ln_2", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"} & called
    assert {"transformer.h.1.ln_2", "transformer.h.1.mlp.c_fc"} <= called
    (constant,) = [p for n, p in result.module.named_parameters() if n.startswith("_fxmin_constant_")]
    assert tuple(constant.shape) == (1, 1, 16)
    other = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    reference = fxmin.masks.masked_reference(model, masks)[0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(other), reference(other), rtol=1e-12, atol=1e-12)


def test_squeeze_release_goes_on_with_a_constant_in_the_model_and_resumes_from_its_checkpoint(tmp_path):
    """A cycle empties block 1's MLP (the criterion ranks its fc1 lowest): the next cycles prune, train
    and checkpoint a model holding the constant, and a crashed run resumes from that checkpoint."""
    from fxmin.cycle import latest_checkpoint
    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    crash = {"at": 2}

    def train(model, step):
        if getattr(step, "phase", None) == "squeeze" and step.cycle == crash["at"]:
            raise RuntimeError("simulated crash")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    def criterion(name, parameter):
        return parameter.detach().abs() * (1e-6 if name.startswith("blocks.1.fc1") else 1.0)

    options = dict(train=train, evaluate=lambda m: 1.0, example_inputs=(x[:8],), cycles=3, amount=0.25,
                   criterion=criterion, checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fxmin.squeeze_release(net, **options)
    assert latest_checkpoint(str(tmp_path)).endswith("cycle_001.pt")
    crash["at"] = None
    result = fxmin.squeeze_release(net, resume=True, **options)
    assert [r.cycle for r in result.history] == [0, 1, 2, 3]
    names = [n for n, _ in result.module.named_parameters()]
    assert any(n.startswith("_fxmin_constant_") for n in names)
    assert not any(n.startswith("blocks.1.fc") for n in names)
    assert result.module(x).shape == (64, 3)


def test_the_audit_says_a_dropped_layer_leaves_whole_and_which_sum_reads_the_constant():
    net = _net()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    audit = fxmin.dependency_graph(net, _emptied(net, [0, 1]), example_inputs=(x,))
    text = audit.explain("blocks.1.fc2.weight", 3)
    assert text.startswith("removed: ") and "leaves the model whole" in text and "Constant operands" in text
    assert sorted(audit.plan.operands) == ["add", "add_1"]
    assert "('add_1' reads the constants instead" in text  # block 1's sum, not block 0's
    rows = {row["layer"]: row for row in audit.layer_rows()}
    assert rows["blocks.1.fc2"]["after"] == "-" and rows["blocks.1.fc2"]["removed"] == 8
    assert rows["blocks.0.norm"]["after"] == "-"
    assert rows["stem"]["after"] != "-"


class TwoBranches(nn.Module):
    """``h + (b1 + b2)`` with both branches emptied: the inner sum is constant and goes with them."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(5, 8), nn.Linear(8, 3)
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + (self.fc2(torch.relu(self.fc1(h))) + self.fc4(torch.relu(self.fc3(h)))))


def test_a_sum_of_two_constant_branches_leaves_as_one_constant():
    torch.manual_seed(0)
    net = TwoBranches().double().eval()
    masks = {name: torch.zeros(16, 8, dtype=torch.bool) for name in ("fc1.weight", "fc3.weight")}
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = fxmin.minimize(net, masks, example_inputs=(x,))
    assert _called(result.module) == {"stem", "head"}
    constants = [c for c in result.report.layers if c.kind == "constant operand"]
    assert len(constants) == 1 and [n for n, _ in result.module.named_parameters()
                                    if n.startswith("_fxmin_constant_")] == [constants[0].name]
    assert fxmin.count_parameters(result.module) == (5 * 8 + 8) + 8 + (8 * 3 + 3)
    _assert_equal_in_float64(net, masks, result.module, torch.randn(6, 5, generator=torch.Generator().manual_seed(2),
                                                                    dtype=torch.float64))
