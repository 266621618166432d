"""The model zoo: every model runs, traces with torch.fx to the same output, and matches its reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmin.zoo as zoo
from fxmin.rules.kit import in_place_call


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inplace_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    """Nodes that would write into their input: the calls fxmin's in-place rule refuses (``x.add_(...)``,
    ``x += y`` with any augmented operator, ``inplace=True``) and modules built with ``inplace=True``."""
    return [node.format_node() for node in graph_module.graph.nodes
            if in_place_call(node)
            or (node.op == "call_module" and getattr(graph_module.get_submodule(node.target), "inplace", False))]


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_traced_model_gives_identical_output(name):
    factory, example_inputs = zoo.MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    inputs = example_inputs()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(*inputs)
        actual = traced(*inputs)
    assert torch.isfinite(expected).all()
    assert torch.equal(actual, expected), f"{name}: traced output differs by {(actual - expected).abs().max()}"
    assert inplace_ops(traced) == [], f"{name} has in-place ops: {inplace_ops(traced)}"
    assert count(traced) == count(model)


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_factories_are_reproducible_under_a_seed(name):
    factory, example_inputs = zoo.MODELS[name]
    torch.manual_seed(1)
    first = factory().state_dict()
    torch.manual_seed(1)
    second = factory().state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert all(torch.equal(a, b) for a, b in zip(example_inputs(), example_inputs()))


@pytest.mark.parametrize("factory, expected", [
    (zoo.resnet18, 11_689_512),
    (zoo.resnet50, 25_557_032),
    (zoo.mobilenet_v2, 3_504_872),
    (zoo.convnext_tiny, 28_589_128),
    (zoo.densenet121, 7_978_856),
    (zoo.efficientnet_b0, 5_288_548),
    (zoo.vit_small, 22_050_664),
    (zoo.gpt2_small, 124_439_808),
], ids=lambda value: getattr(value, "__name__", str(value)))
def test_full_size_parameter_counts_match_the_references(factory, expected):
    with torch.device("meta"):
        model = factory()
    assert count(model) == expected


def test_torchvision_parameter_names_and_shapes():
    with torch.device("meta"):
        resnet = dict(zoo.resnet50().named_parameters())
        mobilenet = dict(zoo.mobilenet_v2().named_parameters())
        convnext = dict(zoo.convnext_tiny().named_parameters())
    assert resnet["conv1.weight"].shape == (64, 3, 7, 7)
    assert resnet["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert resnet["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # V1.5: stride in the 3x3
    assert resnet["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert resnet["layer2.0.downsample.1.bias"].shape == (512,)
    assert resnet["fc.weight"].shape == (1000, 2048)
    assert mobilenet["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert mobilenet["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert mobilenet["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert mobilenet["features.2.conv.2.weight"].shape == (24, 96, 1, 1)
    assert mobilenet["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert mobilenet["classifier.1.weight"].shape == (1000, 1280)
    assert convnext["features.0.0.weight"].shape == (96, 3, 4, 4)
    assert convnext["features.0.1.weight"].shape == (96,)
    assert convnext["features.1.0.block.0.weight"].shape == (96, 1, 7, 7)
    assert convnext["features.1.0.block.2.weight"].shape == (96,)
    assert convnext["features.1.0.block.3.weight"].shape == (384, 96)
    assert convnext["features.1.0.block.5.weight"].shape == (96, 384)
    assert convnext["features.1.0.layer_scale"].shape == (96, 1, 1)
    assert convnext["features.2.0.weight"].shape == (96,)
    assert convnext["features.2.1.weight"].shape == (192, 96, 2, 2)
    assert convnext["features.5.8.layer_scale"].shape == (384, 1, 1)
    assert convnext["classifier.0.weight"].shape == (768,)
    assert convnext["classifier.2.weight"].shape == (1000, 768)


def test_convnext_uses_layernorm2d_and_layer_scale():
    model = zoo.convnext_tiny(10, widths=(8, 16, 24, 32), depths=(1, 1, 1, 1))
    assert isinstance(model.features[0][1], zoo.LayerNorm2d) and isinstance(model.features[0][1], nn.LayerNorm)
    assert isinstance(model.classifier[0], zoo.LayerNorm2d)
    assert torch.all(model.features[1][0].layer_scale == 1e-6)
    x = torch.randn(2, 8, 5, 5)
    norm = model.features[0][1]
    expected = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    assert torch.equal(norm(x), expected)


def test_convnext_fashion_variant_on_28x28():
    model = zoo.convnext_tiny(num_classes=10, in_channels=1, stem="small", width=0.25).eval()
    assert [model.features[i][0].layer_scale.shape[0] for i in (1, 3, 5, 7)] == [24, 48, 96, 192]
    assert model.features[0][0].kernel_size == (2, 2) and model.features[0][0].stride == (2, 2)
    with torch.no_grad():
        features = model.features(torch.randn(2, 1, 28, 28))
        assert features.shape == (2, 192, 1, 1)
    with pytest.raises(ValueError, match="stem"):
        zoo.convnext_tiny(stem="cifar")


def test_stochastic_depth_is_identity_in_eval_and_traces_in_training():
    model = zoo.convnext_tiny(10, in_channels=1, stem="small", widths=(8, 16, 24, 32), depths=(1, 1, 2, 1),
                              stochastic_depth_prob=0.5)
    x = torch.randn(4, 1, 28, 28)
    eval_graph = torch.fx.symbolic_trace(model.eval())
    assert not any(node.target is torch.rand_like for node in eval_graph.graph.nodes)
    train_graph = torch.fx.symbolic_trace(model.train())
    assert any(node.target is torch.rand_like for node in train_graph.graph.nodes)
    assert train_graph(x).shape == (4, 10)

    drop = zoo.StochasticDepth(0.5).train()
    torch.manual_seed(0)
    out = drop(torch.ones(64, 3, 2, 2))
    per_sample = out.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # whole rows dropped or kept
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}


def test_efficientnet_block_has_squeeze_excitation_and_residual():
    block = zoo.efficientnet_block(16, 16).eval()
    graph = torch.fx.symbolic_trace(block).graph
    targets = [node.target for node in graph.nodes]
    assert any("fc1" in str(t) for t in targets) and any("scale_activation" in str(t) for t in targets)
    muls = [node for node in graph.nodes if node.target in (torch.mul, __import__("operator").mul)]
    adds = [node for node in graph.nodes if node.target in (torch.add, __import__("operator").add)]
    assert len(muls) == 1 and len(adds) == 1
    assert isinstance(block.block[0][2], nn.SiLU)


def test_densenet_block_concatenates_features():
    block = zoo.densenet_block(16, 3, 8).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        y = block(x)
    assert y.shape == (2, 40, 6, 6)
    assert torch.equal(y[:, :16], x)  # the block's input passes through the concatenation
    cats = [node for node in torch.fx.symbolic_trace(block).graph.nodes if node.target is torch.cat]
    assert len(cats) == 4  # one per dense layer, one for the block output


def test_vit_attention_is_hand_written():
    graph = torch.fx.symbolic_trace(zoo.vit().eval()).graph
    targets = {node.target for node in graph.nodes}
    assert "softmax" in targets and "unbind" in targets and torch.cat in targets
    assert torch.nn.functional.scaled_dot_product_attention not in targets


def test_gpt_ties_lm_head_to_token_embedding_and_is_causal():
    model = zoo.gpt().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    duplicated = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count(model) == duplicated - model.lm_head.weight.numel()  # the tied weight is counted once
    traced = torch.fx.symbolic_trace(model)
    assert traced.lm_head.weight is traced.transformer.wte.weight
    sdpa = [node for node in traced.graph.nodes if node.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 2 and all(node.kwargs.get("is_causal") for node in sdpa)
    (ids,) = zoo.tokens()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 128
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[:, :-1], after[:, :-1])  # later tokens never change earlier logits
