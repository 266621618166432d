"""squeeze_release configured with settings objects: the same run as with keywords, and bad settings
refused with a message that says what to pass instead."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fxmin
from fxmin.cycle.settings import KEYWORDS
from tests.test_cycle import data, make_callbacks, trained_mlp


def _run(net, x, y, **configuration):
    torch.manual_seed(0)
    train, evaluate, calls = make_callbacks(x, y)
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), **configuration)
    history = [dataclasses.replace(r, time_s=0.0) for r in result.history]
    finished = [dataclasses.replace(f, time_s=0.0) for f in result.finished]
    return history, finished, result, calls


def test_settings_form_runs_the_same_loop_as_the_keyword_form(tmp_path):
    x, y = data(200)
    net = trained_mlp(x, y)
    keywords = dict(cycles=4, amount=0.5, tolerance=0.1, patience=3, backoff=0.5, regrow=1.5, finish_epochs=1,
                    finish_candidates=2, finish_pool_tolerance=0.3, seed=2, progress=False)
    settings = fxmin.SqueezeReleaseSettings(
        prune=fxmin.PruneSettings(amount=0.5, backoff=0.5, regrow=1.5),
        stop=fxmin.StopSettings(cycles=4, tolerance=0.1, patience=3),
        finish=fxmin.FinishSettings(epochs=1, candidates=2, pool_tolerance=0.3),
        checkpoints=fxmin.CheckpointSettings(directory=str(tmp_path / "settings")),
        seed=2, progress=False)
    assert settings == fxmin.SqueezeReleaseSettings.from_keywords(**keywords, checkpoint_dir=str(tmp_path / "settings"))

    by_keywords = _run(net, x, y, checkpoint_dir=str(tmp_path / "keywords"), **keywords)
    by_settings = _run(net, x, y, settings=settings)
    assert len(by_keywords[0]) > 2 and by_keywords[1]  # cycles ran and the finishing phase trained a candidate
    assert by_settings[:2] == by_keywords[:2]
    assert by_settings[3] == by_keywords[3]  # the same train calls, in the same order
    assert by_settings[2].best_cycle == by_keywords[2].best_cycle and by_settings[2].stopped == by_keywords[2].stopped
    for a, b in zip(by_settings[2].module.state_dict().values(), by_keywords[2].module.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "settings").iterdir()) == \
        sorted(p.name for p in (tmp_path / "keywords").iterdir())

    # keywords next to settings= replace those fields: here, resume the finished run without training
    resumed = _run(net, x, y, settings=settings, resume=True)
    assert resumed[:2] == by_settings[:2] and resumed[3] == []


def test_every_squeeze_release_keyword_names_a_settings_field():
    settings = fxmin.SqueezeReleaseSettings()
    for keyword, (group, name) in KEYWORDS.items():
        holder = settings if group is None else getattr(settings, group)
        assert name in {f.name for f in dataclasses.fields(holder)}, keyword
    assert len(KEYWORDS) == 29  # every keyword the call took besides model, train, evaluate, example_inputs


@pytest.mark.parametrize("make, message", [
    (lambda: fxmin.PruneSettings(scope="row"), "scope must be 'global' or 'layer', got 'row'"),
    (lambda: fxmin.PruneSettings(amount=1.5), r"amount must be a fraction in \[0, 1\] or a callable"),
    (lambda: fxmin.PruneSettings(backoff=2.0), r"backoff must be a factor in \(0, 1\] \(e.g. 0.5\)"),
    (lambda: fxmin.PruneSettings(regrow=0.5), r"regrow must be a factor of at least 1 \(e.g. 1.5\)"),
    (lambda: fxmin.ReleaseSettings(tolerance=0), "release_tolerance must be a positive number"),
    (lambda: fxmin.StopSettings(patience=0), "patience must be a whole number of misses >= 1"),
    (lambda: fxmin.StopSettings(time_budget=-1), "time_budget must be a positive number of seconds"),
    (lambda: fxmin.FinishSettings(epochs=1, candidates=0), "finish_candidates must be at least 1"),
    (lambda: fxmin.CheckpointSettings(resume=True), "resume=True needs checkpoint_dir"),
    (lambda: fxmin.SqueezeReleaseSettings(stop=fxmin.StopSettings(tolerance=0.1),
                                          finish=fxmin.FinishSettings(pool_tolerance=0.05)),
     r"finish_pool_tolerance \(0.05\) must be at least tolerance \(0.1\)"),
    (lambda: fxmin.SqueezeReleaseSettings(prune={"amount": 0.5}), "prune must be a fxmin.PruneSettings, got dict"),
    (lambda: fxmin.SqueezeReleaseSettings(minimize_options={"write_to": "out/"}),
     "write_to= writes a result's weights to files; the cycle trains each result in memory"),
])
def test_invalid_settings_say_what_to_pass(make, message):
    with pytest.raises(fxmin.InputError, match=message):
        make()


def test_invalid_keywords_are_refused_before_anything_runs():
    x, y = data(50)
    net = trained_mlp(x, y)
    train, evaluate, calls = make_callbacks(x, y)
    with pytest.raises(fxmin.InputError, match="scope must be 'global' or 'layer'"):
        fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), scope="rows")
    with pytest.raises(fxmin.InputError, match="settings must be a fxmin.SqueezeReleaseSettings"):
        fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), settings={"cycles": 3})
    with pytest.raises(TypeError, match="unexpected keyword argument 'cycle'"):
        fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycle=3)
    assert calls == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        fxmin.StopSettings().cycles = 3


def test_cycle_checkpoints_keep_the_version_1_format(tmp_path):
    """Checkpoints written before the settings objects must resume: the payload keeps its keys (and adds
    'model', the signature of the model the loop started from, which a resume checks when it is there)."""
    x, y = data(100)
    net = trained_mlp(x, y)
    _run(net, x, y, cycles=1, amount=0.3, tolerance=1.0, checkpoint_dir=str(tmp_path), progress=False)
    saved = fxmin.cycle.load_checkpoint(fxmin.cycle.latest_checkpoint(str(tmp_path)))
    assert saved["version"] == 1 and set(saved) == {
        "version", "cycle", "module", "history", "baseline", "best_cycle", "best_module", "best_masks",
        "params_original", "misses", "stopped", "rng", "scale", "current_released", "finish_baseline", "candidates",
        "model"}
