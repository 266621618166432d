"""The `fxmin` command line: outputs, files, and the exit codes scripts rely on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from examples.audit_resnet_like import build_masks, build_model
from fxmin.cli import main
from tests.helpers import NoRuleModel, masked_copy

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--example-input-shape", "1,3,16,16"]
FACTORY = "examples.audit_resnet_like:build_model"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    torch.save(build_model(), folder / "model.pt")
    torch.save(build_masks(), folder / "masks.pt")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_minimize_writes_a_smaller_equivalent_model(files, capsys):
    out_path = files / "small.pt"
    code, out, err = run(capsys, "minimize", files / "model.pt", "--masks", files / "masks.pt", "-o", out_path, *SHAPE)
    assert code == 0, err
    assert "layer1.0.conv1.weight" in out and f"wrote {out_path}" in out
    small = torch.load(out_path, weights_only=False)
    assert small.get_submodule("layer1.0.conv1").out_channels == 13
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_copy(build_model(), build_masks())(x), atol=1e-5, rtol=1e-5)
    # verify agrees (exit 0) ...
    code, out, err = run(capsys, "verify", files / "model.pt", out_path, "--masks", files / "masks.pt", *SHAPE)
    assert code == 0 and "verified: equivalent" in out
    # ... and fails (exit 1) against the model without its masks applied
    code, out, err = run(capsys, "verify", files / "model.pt", out_path, "--masks", "prune", *SHAPE)
    assert code == 1 and "FAIL" in out and err.startswith("fxmin: error[verification]:")


def test_minimize_from_factory_json_report(files, capsys):
    code, out, err = run(capsys, "minimize", FACTORY, "--masks", files / "masks.pt", "--format", "json", *SHAPE)
    assert code == 0, err
    report = json.loads(out)
    assert report["params_after"] < report["params_before"] == 9994
    assert report["max_error_float64"] < 1e-8


def test_minimize_quick_and_unverified(files, capsys):
    code, out, err = run(capsys, "minimize", FACTORY, "--masks", files / "masks.pt", "--format", "json",
                         "--verify", "quick", *SHAPE)
    assert code == 0, err
    report = json.loads(out)
    assert report["verified"] == "quick" and report["max_error_float64"] is None
    assert list(report["max_error"]) == ["float32"] and report["max_error"]["float32"] < 1e-4
    code, out, err = run(capsys, "minimize", FACTORY, "--masks", files / "masks.pt", "--verify", "quick", *SHAPE)
    assert code == 0 and "verified (verify='quick')" in out and "constants" in out
    code, out, err = run(capsys, "minimize", FACTORY, "--masks", files / "masks.pt", "--format", "json", "--no-verify",
                         *SHAPE)
    report = json.loads(out)
    assert code == 0 and report["verified"] is None and report["max_error"] == {}


def test_audit_formats(files, capsys, tmp_path):
    code, out, _ = run(capsys, "audit", FACTORY, "--masks", files / "masks.pt", *SHAPE)
    assert code == 0 and "blocked by" in out and "13x16x3x3" in out
    code, out, _ = run(capsys, "audit", FACTORY, "--masks", files / "masks.pt", "--format", "json", *SHAPE)
    assert code == 0 and {n["id"] for n in json.loads(out)["nodes"]} >= {"stem", "layer1.0.conv1", "output"}
    code, out, _ = run(capsys, "audit", FACTORY, "--masks", files / "masks.pt", "--format", "graphml",
                       "-o", tmp_path / "g.graphml", *SHAPE)
    assert code == 0 and (tmp_path / "g.graphml").read_text().startswith("<?xml")
    code, out, _ = run(capsys, "audit", FACTORY, "--masks", files / "masks.pt", "--format", "dot", *SHAPE)
    assert code == 0 and out.startswith("digraph")
    code, out, _ = run(capsys, "audit", FACTORY, "--masks", files / "masks.pt", "--explain",
                       "layer1.0.conv1.weight:0", *SHAPE)
    assert code == 0 and out.startswith("removed:")


def test_rules(capsys):
    code, out, _ = run(capsys, "rules")
    assert code == 0 and "torch.nn.modules.conv.Conv2d" in out and "linear/conv" in out
    code, out, _ = run(capsys, "rules", "--format", "json")
    assert any(row["rule"] == "batch_norm" for row in json.loads(out))


def test_exit_codes_and_messages(files, capsys, tmp_path):
    assert run(capsys, "minimize", tmp_path / "missing.pt")[0] == 2
    code, _, err = run(capsys, "minimize", FACTORY, "--masks", files / "masks.pt")  # no input shape for a conv net
    assert code == 2 and err.startswith("fxmin: error[input]:") and "example" in err
    torch.save({"nope.weight": torch.ones(3)}, tmp_path / "bad.pt")
    code, _, err = run(capsys, "minimize", FACTORY, "--masks", tmp_path / "bad.pt", *SHAPE)
    assert code == 2 and "not a parameter" in err
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), tmp_path / "scripted.pt")
    code, _, err = run(capsys, "minimize", tmp_path / "scripted.pt")
    assert code == 2 and "TorchScript" in err and "not support" in err
    torch.save(NoRuleModel(), tmp_path / "logcumsumexp.pt")
    code, _, err = run(capsys, "minimize", tmp_path / "logcumsumexp.pt")
    assert code == 3 and err.startswith("fxmin: error[missing-rule]:") and "logcumsumexp" in err
    assert run(capsys, "minimize", tmp_path / "logcumsumexp.pt", "--barrier", "logcumsumexp")[0] == 0
    assert run(capsys)[0] == 2  # no command: usage error
    assert run(capsys, "minimize", "--help")[0] == 0


def test_exported_program_file(tmp_path, capsys):
    model, masks = build_model(), build_masks()
    x = torch.randn(1, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    torch.save(masks, tmp_path / "masks.pt")
    code, out, err = run(capsys, "minimize", tmp_path / "model.pt2", "--masks", tmp_path / "masks.pt",
                         "-o", tmp_path / "small.pt2")
    assert code == 0, err
    program = torch.export.load(tmp_path / "small.pt2")
    assert tuple(program.state_dict["layer1.0.conv1.weight"].shape) == (13, 16, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), masked_copy(model, masks)(x), atol=1e-5, rtol=1e-5)


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "fxmin", "audit", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--format" in done.stdout and "graphml" in done.stdout
