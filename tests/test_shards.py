"""Safetensors shards in the Hugging Face layout (fxmin/shards.py): written one shard at a time, read one
tensor at a time, loaded into a module built on the meta device; tied weights stay tied; clear errors."""
import json

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")

from fxmin import InputError  # noqa: E402
from fxmin.shards import INDEX_FILE, SINGLE_FILE, ShardedWeights, load_shards, write_shards  # noqa: E402


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.body(self.embed(ids)).transpose(1, 2)).transpose(1, 2))


def _state(model):  # every entry: head.weight is embed.weight, stored once
    return list(model.state_dict().items())


def test_shards_hold_at_most_their_budget_and_read_back_exactly(tmp_path):
    torch.manual_seed(0)
    model = Tied().eval()
    index = write_shards(_state(model), tmp_path, max_shard_bytes=300)
    assert index.name == INDEX_FILE
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    weights = ShardedWeights(tmp_path)
    assert "head.weight" not in weights  # tied to embed.weight, stored once as save_pretrained does
    unique = [(name, tensor) for name, tensor in _state(model) if name != "head.weight"]
    assert sorted(weights) == sorted(name for name, _ in unique)
    for name, tensor in unique:
        assert weights.shape(name) == tuple(tensor.shape)
        assert torch.equal(weights[name], tensor)
    assert weights.nbytes() == sum(t.nbytes for _, t in unique)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_one_shard_is_a_single_file(tmp_path):
    path = write_shards([("w", torch.ones(3))], tmp_path)
    assert path.name == SINGLE_FILE and list(ShardedWeights(tmp_path)) == ["w"]


def test_a_meta_model_loads_its_shards_and_computes_as_the_original(tmp_path):
    torch.manual_seed(0)
    model = Tied().eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
    write_shards(_state(model), tmp_path, max_shard_bytes=200)
    with torch.device("meta"):
        empty = Tied().eval()
    load_shards(empty, tmp_path)
    assert empty.head.weight is empty.embed.weight  # still tied
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(empty(ids), model(ids), rtol=0, atol=0)


def test_a_model_built_by_accelerate_without_memory_loads_its_shards(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = Tied().eval()
    write_shards(_state(model), tmp_path)
    with accelerate.init_empty_weights():
        empty = Tied().eval()
    empty.head.weight = empty.embed.weight  # init_empty_weights unties; Hugging Face models call tie_weights()
    assert empty.body[0].weight.is_meta
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(load_shards(empty, tmp_path)(ids), model(ids), rtol=0, atol=0)


def test_an_interrupted_write_leaves_no_index_and_no_staging(tmp_path):
    def tensors():
        yield "a", torch.ones(100)
        yield "b", torch.ones(100)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(tensors(), tmp_path, max_shard_bytes=400)
    assert list(tmp_path.iterdir()) == []


def test_mismatches_are_fxmin_errors_that_say_what_to_do(tmp_path):
    write_shards([("body.0.weight", torch.ones(8, 6))], tmp_path)
    with pytest.raises(InputError, match=r"missing \[.*\].*strict=False"):
        load_shards(Tied(), tmp_path)
    write_shards([("w", torch.ones(8, 5))], tmp_path / "other")
    with pytest.raises(InputError, match=r"w: the checkpoint holds shape \(8, 5\), the module \(8, 6\)"):
        load_shards(nn.ParameterDict({"w": nn.Parameter(torch.ones(8, 6))}), tmp_path / "other")
    with pytest.raises(InputError, match="holds no safetensors checkpoint"):
        ShardedWeights(tmp_path / "nowhere")
    with pytest.raises(InputError, match="twice"):
        write_shards([("w", torch.ones(1)), ("w", torch.ones(1))], tmp_path / "twice")


def test_tensors_made_one_at_a_time_are_all_stored(tmp_path):
    """A generator that frees each tensor after it is written: the next one may reuse its address, and is
    still a tensor of its own (only a tensor given again while alive is a tied one)."""
    def tensors():
        for index in range(6):
            yield f"t{index}", torch.full((64,), float(index))

    write_shards(tensors(), tmp_path, max_shard_bytes=256)
    weights = ShardedWeights(tmp_path)
    assert sorted(weights) == [f"t{index}" for index in range(6)]
    assert all(float(weights[f"t{index}"][0]) == index for index in range(6))
