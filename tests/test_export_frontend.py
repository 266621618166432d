"""The torch.export front end: the canonical graph, ``frontend="auto"|"fx"|"export"``, the result as a
module and as an ExportedProgram, ``minimize_exported``, and the errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmin
from fxmin.cli import main
from fxmin.trace_export import canonical_graph
from fxmin.zoo import MODELS
from tests.helpers import assert_equivalent, masked_copy

X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def dead_rows(shape, rows) -> torch.Tensor:
    mask = torch.ones(shape)
    mask[list(rows)] = 0
    return mask


class InPlaceCNN(nn.Module):
    """conv -> BatchNorm -> relu_ -> conv -> hardswish_ (+= a skip) -> mean -> linear: in-place ops export keeps."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu_(self.bn(self.c1(x)))
        z = F.hardswish(self.c2(y), inplace=True)
        z += 1.0
        return self.fc(z.mean((2, 3)))


def in_place_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = InPlaceCNN().eval()
    with torch.no_grad():  # running statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


class ShapeBranch(nn.Module):
    """Python control flow on a size: torch.fx cannot trace it, torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.shape[0] > 1:
            h = h * 2.0
        return self.b(h)


class GradModeRegions(nn.Module):
    """A ``no_grad`` and an ``autocast`` region: export wraps each in a higher-order op with a body submodule."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("frequencies", torch.linspace(0.0, 1.0, 8))

    def forward(self, x):
        with torch.no_grad():
            table = torch.sigmoid(self.frequencies * 3.0)
        with torch.autocast("cpu", enabled=False):
            h = torch.relu(self.a(x)) * table
        return self.b(h)


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.cumsum(self.fc(x), dim=1)


def test_mlp_through_export_is_exact_and_counted_by_hand():
    model, masks = mlp(), {"0.weight": dead_rows((8, 6), range(5, 8))}
    result = fxmin.minimize(model, masks, (X,), frontend="export")
    assert result.frontend == "export" and "front end: torch.export" in result.report.table()
    # units 5..7 have no input: const(relu(b)) folds into the next bias
    assert fxmin.count_parameters(result.module) == (6 * 5 + 5) + (5 * 3 + 3)
    assert assert_equivalent(masked_copy(model, masks), result.module, (X,)) <= 1e-6


def test_canonical_graph_is_functional_with_parameters_as_attributes_and_shapes():
    model = in_place_cnn()
    program = torch.export.export(model, (IMAGES,))
    assert {torch.ops.aten.relu_.default, torch.ops.aten.add_.Tensor} <= {n.target for n in program.graph.nodes}
    graph_module = canonical_graph(program)
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    assert calls and not any(n.target._schema.is_mutable for n in calls)  # relu_, hardswish_, add_ functionalized
    assert torch.ops.aten.batch_norm.default in {n.target for n in calls}
    attributes = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    assert attributes == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert [n.target for n in graph_module.graph.nodes if n.op == "placeholder"] == ["x"]
    assert all("tensor_meta" in n.meta for n in graph_module.graph.nodes if n.op != "output")
    assert all("test_export_frontend.py" in n.meta["stack_trace"] for n in calls)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(IMAGES), model(IMAGES))


class Tables(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.register_buffer("frequencies", torch.linspace(0.1, 1.0, 8))

    def forward(self, x):
        table = torch.cos(torch.arange(8.0) * self.frequencies)  # no input, no parameter: a constant
        ones = x.new_ones(x.shape[0], 8)  # reads x's static shape only: a constant
        doubled = self.a.weight * 2.0  # a parameter: stays computed (trainable)
        return F.linear(x, doubled) * table + ones


def test_constants_are_folded_and_parameters_are_not():
    model = Tables().eval()
    graph_module = canonical_graph(torch.export.export(model, (X,)))
    targets = {n.target for n in graph_module.graph.nodes}
    assert not {torch.ops.aten.cos.default, torch.ops.aten.arange.start, torch.ops.aten.arange.default,
                torch.ops.aten.new_ones.default} & targets
    folded = [t for t in targets if isinstance(t, str) and t.startswith("_folded_")]
    assert len(folded) == 2 and "a.weight" in targets and torch.ops.aten.mul.Tensor in targets
    with torch.no_grad():
        torch.testing.assert_close(graph_module(X), model(X))


def test_cnn_with_in_place_ops_is_exact_and_counted_by_hand():
    model = in_place_cnn()
    masks = {"c1.weight": dead_rows((8, 3, 3, 3), (2, 3, 4))}
    result = fxmin.minimize(model, masks, (IMAGES,), frontend="export")
    # c1 keeps 5 filters, BatchNorm 5 channels, c2 reads 5 (the constants fold into its bias); fc as it was
    assert fxmin.count_parameters(result.module) == (5 * 27 + 5) + 2 * 5 + (4 * 5 * 9 + 4) + (4 * 2 + 2)
    assert assert_equivalent(masked_copy(model, masks), result.module, (IMAGES,)) <= 1e-6


class PadThenStack(nn.Module):
    """``F.pad`` and ``torch.stack``, which the export front end keeps as ``aten.pad`` and ``aten.stack``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        y = F.pad(self.a(x), (1, 1, 1, 1))
        return self.b(torch.stack([y, 2 * y], 1).sum(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pad_and_stack_keep_channels_through_both_front_ends(frontend):
    torch.manual_seed(0)
    model = PadThenStack().double().eval()
    masks = {"b.weight": torch.ones(8, 8, 3, 3, dtype=torch.bool)}
    masks["b.weight"][:, :3] = False  # b reads 5 of a's channels: a keeps 5 filters
    images = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    result = fxmin.minimize(model, masks, (images,), frontend=frontend)
    assert result.frontend == frontend
    assert fxmin.count_parameters(result.module) == (5 * 27 + 5) + (8 * 5 * 9 + 8)
    assert assert_equivalent(masked_copy(model, masks), result.module, (images,)) <= 1e-12


@pytest.mark.parametrize("name", ["efficientnet_block", "densenet_block"])
def test_zoo_blocks_shrink_alike_through_both_front_ends(name):
    """Squeeze-excitation gating, depthwise convs, SiLU, concatenation: every third filter of every conv zeroed."""
    factory, example_inputs = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    masks = {k: torch.ones_like(p).index_fill_(0, torch.arange(0, p.shape[0], 3), 0)
             for k, p in model.named_parameters() if p.dim() == 4 and p.shape[0] > 4}
    fx = fxmin.minimize(model, masks, example_inputs(), frontend="fx")
    exported = fxmin.minimize(model, masks, example_inputs(), frontend="export")
    assert exported.report.params_after == fx.report.params_after < fx.report.params_before
    assert_equivalent(masked_copy(model, masks), exported.module, example_inputs())


class GroupedQueryAttention(nn.Module):
    """4 query heads share 2 key/value heads through SDPA's ``enable_gqa``, then an MLP."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        batch, tokens, _ = x.shape
        q = self.q(x).view(batch, tokens, 4, 2).transpose(1, 2)
        k = self.k(x).view(batch, tokens, 2, 2).transpose(1, 2)
        v = self.v(x).view(batch, tokens, 2, 2).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = x + self.o(attended.transpose(1, 2).reshape(batch, tokens, 8))
        return h + self.down(torch.relu(self.up(h)))


def test_grouped_query_attention_through_export_is_exact_and_the_mlp_shrinks():
    torch.manual_seed(0)
    model = GroupedQueryAttention().eval()
    masks = {"up.weight": dead_rows((16, 8), range(0, 16, 2)), "v.weight": dead_rows((4, 8), (0,))}
    tokens = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    result = fxmin.minimize(model, masks, (tokens,), frontend="export")
    shapes = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    assert shapes["up.weight"] == (8, 8) and shapes["down.weight"] == (8, 8)
    assert_equivalent(masked_copy(model, masks), result.module, (tokens,))


def test_auto_exports_a_model_fx_cannot_trace_and_says_so():
    model = ShapeBranch()
    masks = {"a.weight": dead_rows((8, 6), (0, 1, 2))}
    with pytest.raises(fxmin.TraceError, match="torch.fx could not trace ShapeBranch"):
        fxmin.minimize(model, masks, (X,), frontend="fx")
    result = fxmin.minimize(model, masks, (X,))
    assert result.frontend == "export" and "front end: torch.export" in str(result.report)
    assert fxmin.count_parameters(result.module) == (6 * 5 + 5) + (5 * 3 + 3)
    assert_equivalent(masked_copy(model, masks), result.module, (X,))
    # a model torch.fx traces stays on torch.fx
    assert fxmin.minimize(mlp(), None, (X,)).frontend == "fx"


def test_higher_order_op_bodies_are_inlined():
    model = GradModeRegions().eval()
    program = torch.export.export(model, (X,))
    wrappers = {str(n.target) for n in program.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)}
    assert wrappers == {"wrap_with_set_grad_enabled", "wrap_with_autocast"}
    masks = {"a.weight": dead_rows((8, 6), (1, 6))}
    smaller, result = fxmin.minimize_exported(program, masks)
    assert not any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in result.reference.graph.nodes)
    assert fxmin.count_parameters(result.module) == (6 * 6 + 6) + (6 * 3 + 3)
    assert_equivalent(masked_copy(model, masks), result.module, (X,))
    with torch.no_grad():
        torch.testing.assert_close(smaller.module()(X), masked_copy(model, masks)(X))


def test_program_saves_and_loads_with_the_model_names(tmp_path):
    model = in_place_cnn()
    masks = {"c1.weight": dead_rows((8, 3, 3, 3), (0, 7))}
    result = fxmin.minimize(model, masks, (IMAGES,), frontend="export")
    torch.export.save(result.program, tmp_path / "small.pt2")
    loaded = torch.export.load(tmp_path / "small.pt2")
    assert tuple(loaded.state_dict["c1.weight"].shape) == (6, 3, 3, 3)
    assert tuple(loaded.state_dict["c2.weight"].shape) == (4, 6, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(IMAGES), masked_copy(model, masks)(IMAGES))


def test_result_module_trains():
    model, masks = mlp(), {"0.weight": dead_rows((8, 6), (0,))}
    result = fxmin.minimize(model, masks, (X,), frontend="export")
    module = result.module.train()
    module(X).square().sum().backward()
    gradients = [p.grad for p in module.parameters()]
    assert len(gradients) == 4 and all(g is not None and g.abs().sum() > 0 for g in gradients)


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, scale: float = 1.0, return_hidden: bool = False):
        hidden = torch.relu(self.a(x)) * scale
        out = {"logits": self.b(hidden)}
        if return_hidden:
            out["hidden"] = hidden
        return out


def test_keyword_inputs_and_structured_outputs():
    model = KeywordModel().eval()
    masks = {"a.weight": dead_rows((8, 6), (3, 4))}
    inputs = {"x": X, "scale": 2.0, "return_hidden": False}
    result = fxmin.minimize(model, masks, inputs, frontend="export")
    assert [n.target for n in result.module.graph.nodes if n.op == "placeholder"] == ["x"]
    expected = masked_copy(model, masks)(**inputs)["logits"]
    with torch.no_grad():
        (flat,) = result.module(X)  # the flat outputs
        torch.testing.assert_close(flat, expected)
        torch.testing.assert_close(result.program.module()(**inputs)["logits"], expected)
    # the same through minimize_exported, with the program's own example inputs
    smaller, again = fxmin.minimize_exported(torch.export.export(model, (), inputs), masks)
    assert fxmin.count_parameters(again.module) == fxmin.count_parameters(result.module) == (6 * 6 + 6) + (6 * 3 + 3)
    with torch.no_grad():
        torch.testing.assert_close(smaller.module()(**inputs)["logits"], expected)


def test_missing_rule_names_the_node_its_source_line_and_the_way_out():
    with pytest.raises(fxmin.MissingRuleError) as caught:
        fxmin.minimize(Cumulative(), None, (X,), frontend="export")
    message = str(caught.value)
    assert "node 'cumsum'" in message and "torch.ops.aten.cumsum.default" in message
    assert "test_export_frontend.py" in message and "return torch.cumsum(self.fc(x), dim=1)" in message
    assert "barriers=[torch.ops.aten.cumsum.default]" in message
    # the way out works: every channel around the cumsum stays
    model = Cumulative().eval()
    result = fxmin.minimize(model, None, (X,), frontend="export", barriers=[torch.ops.aten.cumsum.default])
    assert fxmin.count_parameters(result.module) == 6 * 4 + 4
    assert_equivalent(model, result.module, (X,))


def test_bad_front_end_arguments_are_refused():
    with pytest.raises(fxmin.InputError, match="frontend must be one of"):
        fxmin.minimize(mlp(), None, (X,), frontend="onnx")
    with pytest.raises(fxmin.InputError, match="leaf_modules are options of the torch.fx front end"):
        fxmin.minimize(mlp(), None, (X,), frontend="export", leaf_modules=[nn.ReLU])
    with pytest.raises(fxmin.InputError, match="needs example_inputs"):
        fxmin.minimize(mlp(), None, frontend="export")


class ShapeBranchFactory:
    """For the command line: ``tests.test_export_frontend:ShapeBranchFactory.build``."""

    @staticmethod
    def build():
        torch.manual_seed(0)
        return ShapeBranch()


def test_cli_frontend_writes_an_exported_program(tmp_path, capsys):
    masks = {"a.weight": dead_rows((8, 6), (0, 1, 2))}
    torch.save(masks, tmp_path / "masks.pt")
    out = tmp_path / "small.pt2"
    code = main(["minimize", "tests.test_export_frontend:ShapeBranchFactory.build", "--masks", str(tmp_path / "masks.pt"),
                 "--example-input-shape", "4,6", "--frontend", "export", "--format", "json", "-o", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(printed)
    assert report["frontend"] == "export" and report["params_after"] == (6 * 5 + 5) + (5 * 3 + 3)
    loaded = torch.export.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(X), masked_copy(ShapeBranchFactory.build(), masks)(X))
    code = main(["minimize", "tests.test_export_frontend:ShapeBranchFactory.build", "--example-input-shape", "4,6",
                 "--frontend", "fx"])
    assert code == 4 and "torch.fx could not trace" in capsys.readouterr().err


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.embed(ids))))


def test_minimize_exported_masks_tied_weights_once():
    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(4))
    masks = {"embed.weight": dead_rows((10, 6), (2, 7)), "mix.weight": dead_rows((6, 6), (1,))}
    smaller, result = fxmin.minimize_exported(torch.export.export(model, (ids,)), masks)
    expected = masked_copy(model, masks)(ids)
    with torch.no_grad():
        torch.testing.assert_close(result.reference(ids), expected)  # the one table masked for both readers
        torch.testing.assert_close(smaller.module()(ids), expected)
