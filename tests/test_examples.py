"""The examples (examples/) run end to end and make what their docstrings say: each test calls the
script's ``main`` as a user would run it and checks the model it printed and returned."""
from __future__ import annotations

import torch

import fxmin
from helpers import assert_equivalent, masked_copy


def test_lenet300_demo_prints_the_report_and_drops_pixels_and_units(capsys):
    from examples.lenet300_demo import SPARSITY, lenet300, main

    result = main()
    out = capsys.readouterr().out
    assert "LeNet-300-100: 266,610 parameters" in out and "keeps 5,324 of 266,200 weights" in out
    assert f"parameters: 266,610 -> {fxmin.count_parameters(result.module):,}" in out  # the report table
    assert "1,000 fresh inputs" in out
    shapes = [tuple(p.shape) for name, p in result.module.named_parameters() if name.endswith("weight")]
    assert shapes[0][1] < 784 and shapes[0][0] < 300 and shapes[1][0] < 100 and shapes[2][0] == 10
    model = lenet300()
    masks = fxmin.global_magnitude(model, SPARSITY)
    assert_equivalent(masked_copy(model, masks), result.module, (torch.rand(8, 784),))


def test_minimize_cnn_removes_the_planted_group_and_the_unread_channel(capsys):
    from examples.minimize_cnn import build, main, planted_masks

    result = main()
    assert "def forward" in capsys.readouterr().out  # the minimized module's code
    module = result.module
    assert module.conv2.groups == 3 and module.conv2.out_channels == 12  # group 2 goes whole
    assert module.conv1.out_channels == 12  # and with it the conv1 channels only it read
    assert module.conv3.out_channels == 7  # the classifier never reads channel 2
    model = build()
    assert_equivalent(masked_copy(model, planted_masks(model)), module, (torch.randn(2, 3, 16, 16),))


def test_audit_resnet_like_explains_channels_and_minimizes(capsys):
    from examples.audit_resnet_like import build_masks, build_model, main

    result = main()
    out = capsys.readouterr().out
    assert "channel groups and ends" in out and "dependencies" in out
    assert fxmin.count_parameters(result.module) < fxmin.count_parameters(build_model())
    assert_equivalent(masked_copy(build_model(), build_masks()), result.module, (torch.randn(2, 3, 32, 32),))


def test_minimize_sharded_llama_writes_a_checkpoint_that_computes_the_masked_model(capsys, tmp_path):
    import pytest

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from examples.minimize_sharded_llama import config, main, mlp_masks

    result, module, checkpoint = main(tmp_path)
    out = capsys.readouterr().out
    assert "verified (verify='quick')" in out and "constants" in out and "model.safetensors.index.json" in out
    hidden, units, layers = 64, 256, 2  # gate and up lose half their rows, down half its columns
    assert result.report.params_before - result.report.params_after == layers * 3 * (units // 2) * hidden
    assert not any(t.is_meta for t in module.parameters())  # load_shards filled the result in place
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config()).eval()  # the checkpoint's model, as saved
    ids = torch.randint(0, 512, (1, 8))  # another prompt of the exported shape
    with torch.no_grad():
        expected = masked_copy(model, mlp_masks(model))(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(module(ids)[0], expected, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "minimized"]
