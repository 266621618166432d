"""minimize(..., write_to=): the result written to safetensors shards as it is made (NOTE [Results written as
they are made] in fxmin/result_shards.py): the same tensors as the in-memory result, nothing held, nothing
left behind by a failed pass."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import fxmin
from fxmin.facts import ValueFact
from fxmin.rules.kit import pointwise_forward
from fxmin.shards import ShardedWeights, load_shards, write_shards
from fxmin.zoo import planted
from fxmin.zoo.catalog import MODELS
from fxmin.zoo.masks import random_masks

pytest.importorskip("safetensors")


def _same_result(written, in_memory, inputs, directory):
    """The written result, loaded, holds the in-memory result's tensors under the same names and computes the same."""
    assert all(t.is_meta for t in (*written.module.parameters(), *written.module.buffers()))
    assert written.report.params_after == in_memory.report.params_after
    loaded = load_shards(written.module, directory)
    expected = in_memory.module.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), in_memory.module(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_written_result_equals_the_in_memory_one(name, tmp_path):
    factory, example_inputs = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    masks = random_masks(model, 0.5, seed=0)
    in_memory = fxmin.minimize(model, masks, example_inputs())
    written = fxmin.minimize(model, masks, example_inputs(), write_to=tmp_path / "out")
    assert written.report.verification.ok
    _same_result(written, in_memory, example_inputs(), tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]  # no staging folder left


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("make", [planted.planted_resnet18, planted.planted_densenet, planted.planted_efficientnet])
def test_folded_constants_and_replaced_layers_are_written(make, frontend, tmp_path):
    model, masks, inputs, _ = make()
    in_memory = fxmin.minimize(model, masks, inputs, frontend=frontend)
    written = fxmin.minimize(model, masks, inputs, frontend=frontend, write_to=tmp_path / "out", verify="quick")
    if frontend == "export":  # exported again only once its weights are loaded
        with pytest.raises(fxmin.InputError, match="load them first"):
            written.program
    plan = written.plan
    plan_tensors = [t for edit in plan.modules.values() for t in (*edit.module.parameters(), *edit.module.buffers())]
    plan_tensors += [edit.value for edit in plan.attrs.values()]  # the export front end's weights are attributes
    assert plan_tensors and all(t.is_meta for t in plan_tensors)  # the plan holds no tensor of the result
    _same_result(written, in_memory, inputs, tmp_path / "out")
    if frontend == "export":
        with torch.no_grad():
            torch.testing.assert_close(written.program.module()(*inputs), in_memory.program.module()(*inputs))


def test_from_shards_to_shards_in_several_files(tmp_path):
    """A model on the meta device read from shards, its result written as shards of at most 64 KiB."""
    factory, example_inputs = MODELS["gpt"]
    torch.manual_seed(0)
    model = factory().eval()
    masks = random_masks(model, 0.5, seed=0)
    write_shards(model.state_dict().items(), tmp_path / "in", max_shard_bytes=1 << 20)
    with torch.device("meta"):
        empty = factory().eval()
    written = fxmin.minimize(empty, masks, example_inputs(), weights=tmp_path / "in", write_to=tmp_path / "out",
                             shard_bytes=1 << 16)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and len(files) > 3
    assert set(ShardedWeights(tmp_path / "out")) <= set(written.module.state_dict())
    _same_result(written, fxmin.minimize(model, masks, example_inputs()), example_inputs(), tmp_path / "out")


def _sigmoid_off_by_a_quarter():
    def forward(ctx):
        fact, units = pointwise_forward(ctx)
        return ValueFact.constants(fact.axis, fact.const, np.where(fact.const, fact.value + 0.25, 0.0)), units
    good = fxmin.REGISTRY.modules[nn.Sigmoid]
    return fxmin.Rule("sigmoid off by a quarter", forward, good.backward, good.plan)


def _sigmoid_net():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {"0.weight": torch.ones(5, 6, dtype=torch.bool)}
    masks["0.weight"][2] = False
    return model, masks, (torch.randn(4, 6),)


def test_a_result_that_fails_verification_is_not_written(tmp_path, monkeypatch):
    model, masks, inputs = _sigmoid_net()
    monkeypatch.setitem(fxmin.REGISTRY.modules, nn.Sigmoid, _sigmoid_off_by_a_quarter())
    with pytest.raises(fxmin.EquivalenceError):
        fxmin.minimize(model, masks, inputs, write_to=tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_an_interrupted_pass_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    import sys

    model, masks, inputs = _sigmoid_net()
    (tmp_path / "out").mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sys.modules["fxmin.minimize"], "verify_equivalence", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fxmin.minimize(model, masks, inputs, write_to=tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_an_existing_directory_with_files_is_refused(tmp_path):
    model, masks, inputs = _sigmoid_net()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(model, masks, inputs, write_to=tmp_path / "out")
    assert "exists and is not an empty directory" in str(caught.value) and "never overwrites" in str(caught.value)
    assert os.listdir(tmp_path / "out") == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(model, masks, inputs, write_to=tmp_path / "missing" / "out")
    assert "parent directory does not exist" in str(caught.value)


@pytest.mark.parametrize("shard_bytes, expected", [(0, "shard_bytes must be a positive number of bytes, got 0"),
                                                   (1.5, "got 1.5")])
def test_bad_shard_sizes(tmp_path, shard_bytes, expected):
    model, masks, inputs = _sigmoid_net()
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(model, masks, inputs, write_to=tmp_path / "out", shard_bytes=shard_bytes)
    assert expected in str(caught.value) and os.listdir(tmp_path) == []
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.minimize(model, masks, inputs, shard_bytes=1 << 20)
    assert "pass write_to=directory too" in str(caught.value)


def test_minimize_exported_and_the_compile_backend_say_write_to_is_for_minimize(tmp_path):
    model, masks, inputs = _sigmoid_net()
    program = torch.export.export(model, inputs)
    with pytest.raises(fxmin.InputError, match="write_to= is for fxmin.minimize"):
        fxmin.minimize_exported(program, masks, inputs, write_to=tmp_path / "out")
    with pytest.raises(fxmin.InputError, match="write_to= is for fxmin.minimize"):
        fxmin.backend(masks, write_to=tmp_path / "out")
    assert os.listdir(tmp_path) == []
