"""Minimize real torchvision/timm models with a planted mask and check the result in float64.

    python benchmarks/fx_catalogue_check.py [name ...]     # needs torchvision and timm

The mask keeps a random half of every weight of rank >= 2 and empties some output rows of each
(dead units), so that both random and structured zeros reach the rules. The check compares
``result.module`` with an independent masked copy (``W * mask``, eval mode) in float64 on fresh
random inputs, and prints parameter counts before and after.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fxmin, not an installed one
import fxmin  # noqa: E402

MODELS = {
    "tv.convnext_tiny": ("torchvision", "convnext_tiny", (1, 3, 64, 64)),
    "tv.efficientnet_b0": ("torchvision", "efficientnet_b0", (1, 3, 64, 64)),
    "tv.shufflenet_v2_x1_0": ("torchvision", "shufflenet_v2_x1_0", (1, 3, 64, 64)),
    "tv.swin_t": ("torchvision", "swin_t", (1, 3, 64, 64)),
    "tv.swin_v2_t": ("torchvision", "swin_v2_t", (1, 3, 64, 64)),
    "tv.maxvit_t": ("torchvision", "maxvit_t", (1, 3, 224, 224)),
    "timm.convnextv2_atto": ("timm", "convnextv2_atto", (1, 3, 64, 64)),
    "timm.levit_128s": ("timm", "levit_128s", (1, 3, 224, 224)),
    "timm.eva02_tiny_patch14_224": ("timm", "eva02_tiny_patch14_224", (1, 3, 224, 224)),
    "timm.edgenext_xx_small": ("timm", "edgenext_xx_small", (1, 3, 64, 64)),
    "timm.swin_tiny_patch4_window7_224": ("timm", "swin_tiny_patch4_window7_224", (1, 3, 224, 224)),
    "timm.nf_resnet26": ("timm", "nf_resnet26", (1, 3, 64, 64)),
    "timm.maxvit_nano_rw_256": ("timm", "maxvit_nano_rw_256", (1, 3, 256, 256)),
    "timm.efficientformerv2_s0": ("timm", "efficientformerv2_s0", (1, 3, 224, 224)),
    "timm.hrnet_w18_small": ("timm", "hrnet_w18_small", (1, 3, 64, 64)),
    "timm.xcit_nano_12_p16_224": ("timm", "xcit_nano_12_p16_224", (1, 3, 224, 224)),
    "timm.tnt_s_patch16_224": ("timm", "tnt_s_patch16_224", (1, 3, 224, 224)),
    "timm.dm_nfnet_f0": ("timm", "dm_nfnet_f0", (1, 3, 64, 64)),
    "timm.resnetv2_50x1_bit": ("timm", "resnetv2_50x1_bit", (1, 3, 64, 64)),
}


def build(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def planted_masks(model: torch.nn.Module, seed: int = 0, dead_fraction: float = 0.25) -> dict:
    """Random 50 % of every weight of rank >= 2, and ``dead_fraction`` of its output rows empty."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2 or not name.endswith("weight"):
            continue
        mask = torch.rand(parameter.shape, generator=generator) < 0.5
        rows = torch.randperm(parameter.shape[0], generator=generator)[: int(parameter.shape[0] * dead_fraction)]
        mask[rows] = False
        masks[name] = mask
    return masks


def masked_copy(model, masks):
    copy_ = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, parameter in copy_.named_parameters():
            if name in masks:
                parameter.mul_(masks[name].to(parameter.dtype))
    return copy_


def check(key: str) -> str:
    source, name, shape = MODELS[key]
    model = build(source, name)
    masks = planted_masks(model)
    x = torch.randn(shape)
    start = time.time()
    result = fxmin.minimize(model, masks, example_inputs=(x,))
    seconds = time.time() - start
    reference = masked_copy(model, masks).double()
    small = copy.deepcopy(result.module).double().eval()
    torch.manual_seed(1)
    errors = []
    with torch.no_grad():
        for _ in range(2):
            probe = torch.randn(shape, dtype=torch.float64)
            expected, got = reference(probe), small(probe)
            errors.append(float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-30)))
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.module.parameters())
    return f"{key}: params {before:,} -> {after:,} ({before / after:.2f}x), float64 rel. error {max(errors):.1e}, {seconds:.0f} s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(MODELS))
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback of a failure")
    args = parser.parse_args(argv)
    print(f"fxmin from {Path(fxmin.__file__).parent}, torch {torch.__version__}", flush=True)
    for key in args.names:
        try:
            print(check(key), flush=True)
        except Exception as error:  # report and go on: one line per model
            lines = [line for line in str(error).splitlines() if line.strip()]
            print(f"{key}: {type(error).__name__}: {' | '.join(lines[:3])[:400]}", flush=True)
            if args.verbose:
                traceback.print_exc()


if __name__ == "__main__":
    main()
