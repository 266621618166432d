"""Model families minimize exactly, and remove exactly the structure planted in them (issue 3).

For each family of ``fxmin.zoo`` (small instances, so the file runs in well under a minute):

- *planted*: the dead structure of ``fxmin.zoo.planted`` (dead heads, dead hidden units, dead
  residual-stream / concatenation channels, constant channels with a nonzero bias). The result must
  be exact in float64 and its parameter count must equal the count made by hand there.
- *random*: a random 50-90 % unstructured mask on every weight; the result must be exact.

One-dimensional parameters (biases, norm affines) and BatchNorm running statistics are random and
nonzero (``perturbed``), so no channel is constant by accident.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fxmin
from fxmin.zoo import MODELS, densenet, efficientnet, efficientnet_block, images, resnet18, resnet50
from fxmin.zoo.planted import (PLANTED, Expected, keep_all, kill_rows, perturbed, planted_convnext_tiny_full_size,
                               small_convnext, small_mobilenet)
from helpers import check_minimize, masked_copy, random_masks


# -- shared pieces ----------------------------------------------------------------------------------------------

def check_planted(model, masks, inputs, expected: Expected):
    result = check_minimize(model, masks, inputs, expected_params=expected.count())
    assert result.report.max_error <= 1e-8
    return result


def check_tokens(model, masks, tokens, expected: Expected | None = None, vocab: int = 128):
    """``check_minimize`` for token-id inputs (its random inputs are float): float64 comparison
    against the independent masked copy on the example ids and three random id batches. As there,
    folded biases are float32 in the result, so float64 agreement is to float32 rounding."""
    result = fxmin.minimize(model, masks, tokens)
    reference = masked_copy(model, masks).double()
    minimized = copy.deepcopy(result.module).double()
    generator = torch.Generator().manual_seed(0)
    batches = [tokens] + [(torch.randint(0, vocab, tokens[0].shape, generator=generator),) for _ in range(3)]
    with torch.no_grad():
        for batch in batches:
            expected_out, actual = reference(*batch), minimized(*batch)
            assert actual.shape == expected_out.shape
            error = float((expected_out - actual).abs().max()) / max(1.0, float(expected_out.abs().max()))
            assert error <= 1e-5, f"minimized model diverges: max relative error {error:.3g}"
    assert fxmin.count_parameters(result.module) == result.report.params_after
    assert result.report.max_error <= 1e-8  # fxmin's own check, with float64 folds
    if expected is not None:
        assert result.report.params_after == expected.count()
    return result


# -- ResNet-18 --------------------------------------------------------------------------------------------------

def test_resnet18_random():
    torch.manual_seed(1)
    model = perturbed(resnet18(num_classes=10, width=8))
    check_minimize(model, random_masks(model), images())


# -- ResNet-50 --------------------------------------------------------------------------------------------------

def test_resnet50_random():
    torch.manual_seed(1)
    model = perturbed(resnet50(num_classes=10, width=8))
    check_minimize(model, random_masks(model), images())


# -- DenseNet (concatenation) ------------------------------------------------------------------------------------

def test_densenet_random():
    torch.manual_seed(1)
    model = perturbed(densenet())
    check_minimize(model, random_masks(model), images())


# -- MobileNetV2 (depthwise, inverted residual) -----------------------------------------------------------------

def test_mobilenet_v2_random():
    torch.manual_seed(1)
    model = perturbed(small_mobilenet())
    check_minimize(model, random_masks(model), images())


# -- EfficientNet (squeeze-excitation mul, SiLU) ----------------------------------------------------------------

def test_efficientnet_random():
    torch.manual_seed(1)
    model = perturbed(efficientnet_block(16, 16))
    check_minimize(model, random_masks(model), images(16, 8))
    model = perturbed(efficientnet())
    check_minimize(model, random_masks(model), images())


# -- ConvNeXt (torchvision layout: LayerNorm2d, depthwise 7x7, layer scale, LN + conv downsampling) -------------

def test_convnext_dead_stream_channel_with_layer_scales_at_their_init_value():
    """Layer scales hold one value (1e-6) in every channel until trained (NOTE [Uniform constants]):
    a dead stream channel still removes its entry, and the result runs and is exact."""
    torch.manual_seed(0)
    model = small_convnext().eval()  # as initialized: not perturbed
    masks = keep_all(model)
    kill_rows(masks, "features.6.1", 10), kill_rows(masks, "features.7.0.block.5", 10)
    result = check_minimize(model, masks, images())
    assert tuple(result.module.get_parameter("features.7.0.layer_scale").shape) == (63, 1, 1)


def test_convnext_random():
    torch.manual_seed(1)
    model = perturbed(small_convnext())
    check_minimize(model, random_masks(model), images())


# -- ViT --------------------------------------------------------------------------------------------------------

def test_vit_random():
    torch.manual_seed(1)
    factory, example = MODELS["vit"]
    model = perturbed(factory())
    check_minimize(model, random_masks(model), example())


# -- GPT (causal SDPA, tied embeddings) -------------------------------------------------------------------------

def test_gpt_random():
    torch.manual_seed(1)
    factory, example = MODELS["gpt"]
    model = perturbed(factory())
    check_tokens(model, random_masks(model), example())


# -- the planted tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(PLANTED))
def test_planted_structure_goes_exactly(family):
    model, masks, inputs, want = PLANTED[family]()
    if inputs[0].is_floating_point():
        result = check_planted(model, masks, inputs, want)
    else:
        result = check_tokens(model, masks, inputs, want)
    if family == "gpt":
        assert result.module.lm_head.weight is result.module.transformer.wte.weight  # still tied


@pytest.mark.slow
def test_convnext_tiny_full_size_planted():
    check_planted(*planted_convnext_tiny_full_size())
