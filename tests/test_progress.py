"""The progress line of a pass, Ctrl-C in the middle of one, and the CLI's atomic output file."""
import pytest
import torch
from torch import nn

import fxmin
from fxmin import cli, progress
from fxmin.analysis import Engine
from fxmin.errors import InputError


def _net_and_mask():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[5:] = False
    return net, {"0.weight": mask}


def test_progress_names_each_phase(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0)
    net, masks = _net_and_mask()
    fxmin.minimize(net, masks, (torch.randn(3, 4),), progress=True)
    shown = capsys.readouterr().err
    for name in ("trace", "analysis", "plan", "rewrite", "verify"):
        assert f"fxmin {name}" in shown


def test_progress_false_writes_nothing_and_changes_nothing(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0)
    net, masks = _net_and_mask()
    x = torch.randn(3, 4)
    quiet = fxmin.minimize(net, masks, (x,), progress=False)
    assert capsys.readouterr().err == ""
    loud = fxmin.minimize(net, masks, (x,), progress=True)
    assert torch.equal(quiet.module(x), loud.module(x))
    assert quiet.report.params_after == loud.report.params_after


def test_progress_rejects_a_non_boolean():
    net, masks = _net_and_mask()
    with pytest.raises(InputError, match="progress must be True, False or None"):
        fxmin.minimize(net, masks, (torch.randn(3, 4),), progress="yes")


def test_ctrl_c_mid_pass_leaves_the_model_and_masks_untouched(monkeypatch):
    net, masks = _net_and_mask()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    mask = masks["0.weight"].clone()

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "backward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fxmin.minimize(net, masks, (torch.randn(3, 4),), progress=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert torch.equal(masks["0.weight"], mask)
    assert progress._CURRENT.get() is None  # the bar of the interrupted pass is closed and gone


def test_interrupted_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")

    def interrupted(path):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.write_atomically(target, interrupted)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    cli.write_atomically(target, lambda path: torch.save({"w": torch.ones(2)}, path))
    assert torch.equal(torch.load(target)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

