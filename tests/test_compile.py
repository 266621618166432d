"""torch.compile backend, torch.export round trips, ONNX export."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import fxmin
from examples.audit_resnet_like import build_masks, build_model
from tests.helpers import NoRuleModel, masked_copy

X = torch.randn(2, 3, 16, 16)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_backend_eager_matches_masked_model():
    model, masks = build_model(), build_masks()
    before = copy.deepcopy(model.state_dict())
    backend = fxmin.backend(masks, inner="eager")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        _close(compiled(X), masked_copy(model, masks)(X))
    (result,) = backend.results
    assert result.report.params_after < result.report.params_before
    assert tuple(result.module.get_parameter("layer1.0.conv1.weight").shape) == (13, 16, 3, 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched


class TwoGraphs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))))
        torch._dynamo.graph_break()
        return self.c(y)


def test_graph_break_and_identity_matching():
    model = TwoGraphs().eval()
    masks = {"b.weight": torch.ones(8, 8), "c.weight": torch.ones(4, 8)}
    masks["b.weight"][:, :3] = 0  # a's outputs 0..2 unread: a shrinks inside the first graph
    masks["c.weight"][:, 5:] = 0  # c reads 5 of b's outputs: the second graph selects its input
    backend = fxmin.backend(masks, inner="eager", model=model)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(3, 6)
    with torch.no_grad():
        _close(compiled(x), masked_copy(model, masks)(x))
    first, second = backend.results
    assert tuple(first.module.get_parameter("a.weight").shape) == (5, 6)
    assert tuple(second.module.get_parameter("c.weight").shape) == (4, 5)


def test_missing_rule_raises_or_falls_back(caplog):
    torch._dynamo.reset()
    x = torch.randn(2, 4)
    with pytest.raises(Exception, match="logcumsumexp"):
        torch.compile(NoRuleModel(), backend=fxmin.backend(None, inner="eager"))(x)
    torch._dynamo.reset()
    model = NoRuleModel()
    with torch.no_grad():
        out = torch.compile(model, backend=fxmin.backend(None, inner="eager", on_error="fallback"))(x)
        _close(out, model(x))
    assert "unminimized" in caplog.text


def test_export_round_trips(tmp_path):
    model, masks = build_model(), build_masks()
    reference = masked_copy(model, masks)
    # an ExportedProgram in, a smaller ExportedProgram out
    program = torch.export.export(model, (X,))
    smaller, result = fxmin.minimize_exported(program, masks)
    assert tuple(smaller.state_dict["layer1.0.conv1.weight"].shape) == (13, 16, 3, 3)
    # the minimized GraphModule exports, saves and loads
    exported = torch.export.export(fxmin.minimize(model, masks, (X,)).module, (X,))
    torch.export.save(exported, tmp_path / "small.pt2")
    loaded = torch.export.load(tmp_path / "small.pt2")
    with torch.no_grad():
        _close(smaller.module()(X), reference(X))
        _close(loaded.module()(X), reference(X))


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
                    reason="needs the 'onnx' extra: pip install -e '.[onnx]'")
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    import onnxruntime

    model, masks = build_model(), build_masks()
    result = fxmin.minimize(model, masks, (X,))
    assert fxmin.count_parameters(result.module) < fxmin.count_parameters(model)
    torch.onnx.export(result.module, (X,), str(tmp_path / "small.onnx"), dynamo=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "small.onnx"))
    (out,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        _close(torch.from_numpy(out), masked_copy(model, masks)(X))


def test_backend_inductor():
    """The one inductor test (~15 s cold)."""
    torch._dynamo.reset()
    model, masks = build_model(), build_masks()
    backend = fxmin.backend(masks, inner="inductor")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        _close(compiled(X), masked_copy(model, masks)(X))
    assert backend.results, "the backend never received a graph"
    assert sum(r.report.params_after for r in backend.results) < sum(r.report.params_before for r in backend.results)
