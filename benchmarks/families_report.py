"""Per-family numbers for docs/families.md: parameters before/after and measured max error.

For every model family of issue 3 it minimizes (a) the planted masks of
``fxmin.zoo.planted`` (dead heads, dead hidden units, dead stream/concat channels, constant
channels with nonzero bias; the expected count there is made by hand) and (b) a random 50-90 %
unstructured mask, and reads the errors fxmin's own verification measured (float64 and float32,
max absolute error over the example and two random input sets, relative to max(1, |output|)
as fxmin's tolerance is). Side by side in one run on one machine.

    python -m benchmarks.families_report                          # print the table
    python -m benchmarks.families_report --write docs/families.md # write the page
    python -m benchmarks.families_report --full                   # add full-size ConvNeXt-Tiny (~1 min)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxmin
from fxmin.zoo import MODELS, densenet, efficientnet, efficientnet_block, images, random_masks, resnet18, resnet50
from fxmin.zoo import planted

ROOT = Path(__file__).resolve().parent.parent

#: family -> (title, planted builder, random-mask builder of (model, inputs)), in page order.
FAMILIES = {
    "resnet18": ("ResNet-18 (width 8, 32x32)", planted.planted_resnet18,
                 lambda: (resnet18(num_classes=10, width=8), images())),
    "resnet50": ("ResNet-50 (width 8, 32x32)", planted.planted_resnet50,
                 lambda: (resnet50(num_classes=10, width=8), images())),
    "densenet": ("DenseNet (growth 12, blocks 2-2-2)", planted.planted_densenet,
                 lambda: (densenet(), images())),
    "mobilenet_v2": ("MobileNetV2 (3 stages)", planted.planted_mobilenet_v2,
                     lambda: (planted.small_mobilenet(), images())),
    "efficientnet_block": ("EfficientNet MBConv block (SE, SiLU)", planted.planted_efficientnet_block,
                           lambda: (efficientnet_block(16, 16), images(16, 8))),
    "efficientnet": ("EfficientNet (3 stages)", planted.planted_efficientnet,
                     lambda: (efficientnet(), images())),
    "convnext": ("ConvNeXt-Tiny layout (widths 16-32-48-64, depths 1-1-2-1)", planted.planted_convnext,
                 lambda: (planted.small_convnext(), images())),
    "vit": ("ViT (dim 64, 2 blocks, 4 heads)", planted.planted_vit,
            lambda: (MODELS["vit"][0](), MODELS["vit"][1]())),
    "gpt": ("GPT decoder (width 64, 2 layers, 4 heads, tied)", planted.planted_gpt,
            lambda: (MODELS["gpt"][0](), MODELS["gpt"][1]())),
}
FULL = {"convnext_tiny": ("ConvNeXt-Tiny, full size (32x32 input)", planted.planted_convnext_tiny_full_size, None)}


def measure(model, masks, inputs) -> dict:
    start = time.perf_counter()
    result = fxmin.minimize(model, masks, inputs)
    seconds = time.perf_counter() - start
    report = result.report
    return dict(before=report.params_before, after=report.params_after, nonzero=report.nonzero_before,
                f64=report.max_error_in(torch.float64), f32=report.max_error_in(torch.float32), seconds=seconds)


def run(full: bool) -> list:
    torch.set_num_threads(1)
    rows = []
    chosen = {**FAMILIES, **(FULL if full else {})}
    for name, (title, build_planted, random_builder) in chosen.items():
        model, masks, inputs, want = build_planted()
        numbers = measure(model, masks, inputs)
        hand = want.count()
        rows.append(dict(family=title, masks="planted", hand=hand, **numbers))
        print(f"{name} planted: {numbers['before']:,} -> {numbers['after']:,} (hand count {hand:,})", flush=True)
        if random_builder is None:
            continue
        torch.manual_seed(1)
        model, inputs = random_builder()
        model = planted.perturbed(model)
        numbers = measure(model, random_masks(model), inputs)
        rows.append(dict(family=title, masks="random 50-90 %", hand=None, **numbers))
        print(f"{name} random: {numbers['before']:,} -> {numbers['after']:,}", flush=True)
    return rows


def table(rows: list) -> str:
    body = []
    for r in rows:
        hand = "" if r["hand"] is None else ("= after" if r["hand"] == r["after"] else f"{r['hand']:,} (DIFFERS)")
        body.append((r["family"], r["masks"], f"{r['before']:,}", f"{r['nonzero']:,}", f"{r['after']:,}",
                     f"{r['before'] / r['after']:.2f}x", hand, f"{r['f64']:.1e}", f"{r['f32']:.1e}", f"{r['seconds']:.1f}"))
    return tabulate(body, headers=["family", "masks", "params before", "nonzero before", "params after", "ratio",
                                   "hand count", "max err float64", "max err float32", "minimize s"],
                    tablefmt="github", disable_numparse=True)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__} (1 intra-op thread)")


def page(rows: list, command: str) -> str:
    template = (ROOT / "benchmarks" / "families_page.md").read_text()
    return template.format(command=command, date=datetime.date.today().isoformat(), machine=machine(),
                           table=table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="write the page here (e.g. docs/families.md)")
    parser.add_argument("--full", action="store_true", help="add the full-size ConvNeXt-Tiny")
    args = parser.parse_args()
    rows = run(args.full)
    print(table(rows))
    if args.write:
        command = "python -m benchmarks.families_report" + (" --full" if args.full else "") + f" --write {args.write}"
        args.write.write_text(page(rows, command))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
