"""The catalogues of benchmarks/coverage.py: model name -> builder of ``(model, example_inputs)``.

``example_inputs`` is a tuple of positional tensors or a dict of keyword tensors (Hugging Face).
Every builder makes random weights (nothing downloads) and the smallest input the model takes
from a short list of sizes, to keep each case fast. ``CATALOGUES[name]()`` returns the dict, or
raises ``Unavailable`` saying why (a package that does not import in this environment).

>>> builders = CATALOGUES["zoo"]()
>>> model, inputs = builders["resnet18"]()
>>> tuple(inputs[0].shape)
(2, 3, 32, 32)
"""
from __future__ import annotations

import importlib
from functools import partial
from typing import Callable

import torch

#: square input sizes tried in order; the first the model runs on is used
SIZES = (64, 96, 128, 160, 224, 240, 256, 299)
BATCH = 2

#: timm: one small variant per family (CNNs, ViTs, hybrids, MLP-mixers)
TIMM_MODELS = (
    # CNNs
    "resnet18", "resnetv2_50", "resnext26ts", "seresnext26d_32x4d", "convnext_atto", "convnextv2_atto",
    "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv3_small_100", "mobilenetv4_conv_small", "regnetx_002",
    "regnety_002", "ghostnet_100", "repvgg_a0", "hrnet_w18_small", "densenet121", "dla34", "dpn48b", "cspresnet50",
    "cspdarknet53", "rexnet_100", "tresnet_m", "nf_resnet26", "dm_nfnet_f0", "mnasnet_100", "fbnetc_100",
    "lcnet_050", "hardcorenas_a", "mixnet_s", "tinynet_e", "res2net50_14w_8s", "resnest14d", "skresnet18",
    "selecsls42b", "vovnet39a", "inception_v3", "xception41", "hgnetv2_b0", "ese_vovnet19b_dw", "repghostnet_050",
    "efficientvit_b0", "inception_next_atto",
    # ViTs
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit3_small_patch16_224", "cait_xxs24_224", "beit_base_patch16_224",
    "eva02_tiny_patch14_224", "xcit_nano_12_p16_224", "crossvit_tiny_240", "pit_ti_224", "tnt_s_patch16_224",
    "flexivit_small", "vit_relpos_small_patch16_224", "twins_pcpvt_small", "pvt_v2_b0", "swin_tiny_patch4_window7_224",
    "swinv2_cr_tiny_224", "gcvit_xxtiny", "focalnet_tiny_srf", "davit_tiny", "nest_tiny",
    # hybrids
    "maxvit_tiny_rw_224", "coatnet_0_rw_224", "coat_tiny", "levit_128s", "tiny_vit_5m_224", "mobilevit_xxs",
    "mobilevitv2_050", "edgenext_xx_small", "efficientformer_l1", "efficientformerv2_s0", "fastvit_t8", "poolformer_s12",
    "poolformerv2_s12", "convit_tiny", "visformer_tiny", "sequencer2d_s", "nextvit_small", "repvit_m0_9",
    # MLP-mixers
    "mixer_b16_224", "resmlp_12_224", "gmlp_ti16_224", "gmixer_12_224",
)


class Unavailable(Exception):
    """A catalogue cannot be built in this environment (the message says why)."""


def _runs(model, inputs) -> bool:
    try:
        with torch.no_grad():
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not this size"
        return False


def _images(size: int) -> tuple:
    return (torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _smallest(make: Callable[[int], torch.nn.Module]):
    """``(model, inputs)`` at the first size of SIZES that ``make(size)`` builds and runs on."""
    errors = []
    for size in SIZES:
        try:
            model = make(size).eval()
        except Exception as error:  # noqa: BLE001 - this size is not accepted
            errors.append(f"{size}: {type(error).__name__}: {error}")
            continue
        inputs = _images(size)
        if _runs(model, inputs):
            return model, inputs
    raise RuntimeError(f"the model runs on none of the sizes {SIZES}" + (f" ({errors[-1]})" if errors else ""))


def zoo() -> dict[str, Callable]:
    from fxmin.zoo import MODELS

    return {name: (lambda factory=factory, inputs=inputs: (factory().eval(), inputs()))
            for name, (factory, inputs) in MODELS.items()}


def torchvision() -> dict[str, Callable]:
    try:
        models = importlib.import_module("torchvision.models")
    except Exception as error:  # noqa: BLE001 - torchvision needs a matching torch build
        raise Unavailable(f"torchvision does not import here ({type(error).__name__}: {error})") from error

    def build(name: str):
        def make(size: int):
            # ViTs take their image size as an argument; every other model adapts to the input
            extra = {"image_size": size} if name.startswith("vit_") else {}
            return models.get_model(name, weights=None, **extra)
        return _smallest(make)

    return {name: partial(build, name) for name in models.list_models(module=models)}


def timm() -> dict[str, Callable]:
    try:
        timm_module = importlib.import_module("timm")
    except Exception as error:  # noqa: BLE001 - timm needs torchvision, which needs a matching torch
        raise Unavailable(f"timm does not import here ({type(error).__name__}: {error})") from error

    def build(name: str):
        def make(size: int):
            try:
                return timm_module.create_model(name, pretrained=False, img_size=size)
            except TypeError:  # the model has no img_size argument: it adapts to the input or needs its own
                return timm_module.create_model(name, pretrained=False)
        return _smallest(make)

    known = set(timm_module.list_models())
    return {name: partial(build, name) for name in TIMM_MODELS if name in known}


def hf() -> dict[str, Callable]:
    """``benchmarks/hf_families.py``'s ``families()`` when that module is there and imports."""
    try:
        module = importlib.import_module("benchmarks.hf_families")
    except Exception as error:  # noqa: BLE001 - absent, or transformers missing
        raise Unavailable(f"benchmarks/hf_families.py is not importable here ({type(error).__name__}: {error})") from error
    return dict(module.families())


def known_size(catalogue: str, name: str) -> int | None:
    """The parameter count of a model before building it, where the catalogue states it (torchvision)."""
    if catalogue != "torchvision":
        return None
    try:
        models = importlib.import_module("torchvision.models")
        return max(weights.meta["num_params"] for weights in models.get_model_weights(name))
    except Exception:  # noqa: BLE001 - unknown: the model is built and counted
        return None


CATALOGUES: dict[str, Callable[[], dict[str, Callable]]] = {"zoo": zoo, "torchvision": torchvision, "timm": timm, "hf": hf}
