"""The fast subset of the coverage benchmark (benchmarks/coverage.py, docs/coverage.md).

A handful of models through every front end: what fxmin returns passes the benchmark's own float64
check, and what it refuses is an fxmin error naming an op. The zoo part runs everywhere; the
Hugging Face part when benchmarks/hf_families.py imports; the torchvision/timm part in the catalogue
venv (`make test-catalogue`). The check itself is tested on models known to be right and wrong.
"""
import copy

import pytest
import torch
from torch import nn

from benchmarks import coverage
from benchmarks.coverage_catalogues import CATALOGUES, Unavailable

ZOO = ["densenet_block", "efficientnet_block", "convnext_fashion", "vit", "gpt"]
CATALOGUE = [("torchvision", "resnet18"), ("torchvision", "mobilenet_v3_small"), ("timm", "convnext_atto"),
             ("timm", "vit_tiny_patch16_224"), ("timm", "efficientnet_b0")]


def _hf_names(count: int = 3) -> list[str]:
    try:
        return sorted(CATALOGUES["hf"]())[:count]
    except Unavailable:
        return []


def assert_sound(rows) -> None:
    assert [row["frontend"] for row in rows] == list(coverage.DEFAULT_FRONTENDS)
    for row in rows:
        outcome = row["outcome"]
        assert outcome in ("exact-shrunk", "exact-same", "refused", "not-exportable"), row
        if outcome.startswith("exact"):
            assert row["max_error"] <= row["allowed"]
            assert row["params_after"] <= row["params_before"]
            assert (row["params_after"] < row["params_before"]) == (outcome == "exact-shrunk")
        if outcome == "refused":  # an fxmin error that names the node and the op it has no rule for
            assert row["op"] and row["node"], row
            assert "barriers=" in row["way_out"], row


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_are_exact_or_refused_by_name(name):
    assert_sound(list(coverage.run_model("zoo", name)))


@pytest.mark.parametrize("name", _hf_names() or [pytest.param(None, marks=pytest.mark.skip("no benchmarks/hf_families.py"))])
def test_hugging_face_families_are_exact_or_refused_by_name(name):
    assert_sound(list(coverage.run_model("hf", name)))


@pytest.mark.parametrize("catalogue, name", CATALOGUE)
def test_catalogue_models_are_exact_or_refused_by_name(catalogue, name):
    try:
        builders = CATALOGUES[catalogue]()
    except Unavailable as why:
        pytest.skip(str(why))
    assert name in builders
    assert_sound(list(coverage.run_model(catalogue, name)))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10)).eval()


def test_plant_is_seeded_and_kills_whole_rows_and_columns():
    first, second = _net(), _net()
    masks, again = coverage.plant(first), coverage.plant(second)
    assert masks.keys() == again.keys() == {"0.weight", "4.weight"}
    assert all(torch.equal(masks[name], again[name]) for name in masks)
    assert torch.equal(first[1].running_var, second[1].running_var) and not torch.equal(first[1].bias, torch.zeros(16))
    conv = masks["0.weight"]
    assert (~conv.flatten(1).any(1)).sum() == 16 // 8  # dead output filters
    assert (~conv.transpose(0, 1).flatten(1).any(1)).sum() == 3 // 8  # no input channel of three
    linear = masks["4.weight"]
    assert (~linear.any(1)).sum() >= 10 // 8 and (~linear.any(0)).sum() >= 16 * 36 // 8
    assert 0.3 < conv.float().mean() < 0.6


def test_the_float64_check_passes_the_masked_model_and_fails_the_unmasked_one():
    net = _net()
    masks = coverage.plant(net)
    inputs = coverage.fresh_inputs((torch.randn(2, 3, 8, 8),))
    masked = copy.deepcopy(net)
    with torch.no_grad():
        for name, parameter in masked.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    reference = coverage.masked_float64(net, masks)
    error, allowed = coverage.check(reference, masked, inputs)
    assert error <= allowed
    error, allowed = coverage.check(reference, net, inputs)
    assert error > allowed


def test_a_front_end_that_hangs_is_a_timeout_and_the_sweep_goes_on():
    worker = coverage.Worker()
    try:
        rows = list(worker.run("zoo", "densenet_block", ["auto", "export"], float("inf"), timeout=0.01))
        assert [(row["frontend"], row["outcome"]) for row in rows] == [("auto", "timeout"), ("export", "timeout")]
        rows = list(worker.run("zoo", "densenet_block", ["auto"], float("inf"), timeout=300))
        assert rows[0]["outcome"] == "exact-shrunk"
    finally:
        worker.stop()
