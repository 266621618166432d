"""What the benchmarks share: the model set, masks (random and planted dead channels), "trained-like"
affine state, timers, peak memory, and writing a section of docs/benchmarks.md.

Models are fxmin.zoo's pure-torch definitions. ``FULL`` are the real sizes (ConvNeXt-Tiny, ResNet-50,
ViT-S/16, GPT-2 small) for the cost of the pass; ``MODEST`` are the same families at small inputs
(64x64 images, a 4-layer 512-wide GPT at 64 tokens) for latency under torch.compile, where every
variant costs a compile, and for the comparison with Torch-Pruning.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import fxmin
from benchmarks.markdown import replace_section
from benchmarks.pass_speed import machine, section  # one definition of the doc format
from fxmin import zoo
from fxmin.zoo import random_masks as draw_random_masks  # the one maker of random masks

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _images(size: int, batch: int = 1) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(vocab: int, length: int, batch: int = 1) -> tuple:
    return (torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)),)


#: name -> (factory, inputs(batch), classifier parameter names never given dead rows)
FULL: dict[str, tuple[Callable, Callable, tuple]] = {
    "ConvNeXt-Tiny 224": (zoo.convnext_tiny, lambda b=1: _images(224, b), ("classifier.2",)),
    "ResNet-50 224": (zoo.resnet50, lambda b=1: _images(224, b), ("fc",)),
    "ViT-S/16 224": (zoo.vit_small, lambda b=1: _images(224, b), ("head",)),
    "GPT-2 small, 128 tokens": (zoo.gpt2_small, lambda b=1: _tokens(50257, 128, b), ("lm_head",)),
}

MODEST: dict[str, tuple[Callable, Callable, tuple]] = {
    "ResNet-50 64x64": (lambda: zoo.resnet50(num_classes=100), lambda b=1: _images(64, b), ("fc",)),
    "ConvNeXt-Tiny 64x64": (lambda: zoo.convnext_tiny(num_classes=100), lambda b=1: _images(64, b), ("classifier.2",)),
    "ViT-S/16 64x64": (lambda: zoo.vit_small(num_classes=100, image_size=64), lambda b=1: _images(64, b), ("head",)),
    "GPT 4x512, 64 tokens": (lambda: zoo.gpt(vocab_size=2048, block_size=64, n_layer=4, n_head=8, n_embd=512),
                             lambda b=1: _tokens(2048, 64, b), ("lm_head",)),
}


def build(factory: Callable, seed: int = 0, trained_like: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = factory().eval()
    if trained_like:
        randomize_affine(model, seed)
    return model


def randomize_affine(model: nn.Module, seed: int = 0) -> None:
    """Give the model the state a trained one has and a fresh one lacks: nonzero biases, BatchNorm
    and LayerNorm scales/shifts/running statistics away from 1/0, ConvNeXt layer scales of order 1.
    This is what makes dead channels carry constants that a pruner must fold, not drop."""
    generator = torch.Generator().manual_seed(seed + 1)

    def normal(t, std):
        return torch.randn(t.shape, generator=generator) * std

    def uniform(t, low, high):
        return low + (high - low) * torch.rand(t.shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, WEIGHTED) and module.bias is not None:
                module.bias.copy_(normal(module.bias, 0.1))
            if isinstance(module, NORMS):
                if module.weight is not None:
                    module.weight.copy_(uniform(module.weight, 0.5, 1.5))
                if module.bias is not None:
                    module.bias.copy_(normal(module.bias, 0.1))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(normal(module.running_mean, 0.1))
                module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale"):
                parameter.copy_(uniform(parameter, 0.1, 0.3))


def weight_names(model: nn.Module, exclude: tuple = ()) -> dict:
    """``{parameter name: module}`` for the weights of Linear/Conv layers (a tied weight once, under
    its first name), skipping the modules named in ``exclude``."""
    parameters = {id(p): name for name, p in model.named_parameters()}
    chosen = {}
    for path, module in model.named_modules():
        if isinstance(module, WEIGHTED) and path not in exclude and id(module.weight) in parameters:
            name = parameters[id(module.weight)]
            if name == f"{path}.weight":
                chosen[name] = module
    return chosen


def random_masks(model: nn.Module, sparsity: float, seed: int = 0) -> dict:
    """Unstructured: keep each Linear/Conv weight with probability ``1 - sparsity`` (``fxmin.zoo.random_masks``)."""
    return draw_random_masks(model, sparsity, seed, names=weight_names(model))


def planted_masks(model: nn.Module, fraction: float, exclude: tuple = (), seed: int = 0) -> dict:
    """Structured: in every Linear/Conv but the ``exclude``d classifier, a random ``fraction`` of the
    output rows (filters) is all zero; every other weight is kept. Each layer draws its own rows, so
    the writers of a residual stream rarely agree on a channel: those stay (their dead rows carry
    the bias as a constant), while hidden units inside blocks go."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in weight_names(model, exclude).items():
        rows = module.weight.shape[0]
        mask = torch.ones(module.weight.shape, dtype=torch.bool)
        mask[torch.randperm(rows, generator=generator)[: int(fraction * rows)]] = False
        masks[name] = mask
    return masks


def apply_masks(model: nn.Module, masks: dict) -> nn.Module:
    """The masked dense model (a copy, eval): what a user has before minimizing."""
    return fxmin.masked_reference(model, masks)[0]


def cpu_seconds(function: Callable, repeat: int = 1):
    """Best-of-``repeat`` CPU seconds (user + system of this process) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        start = time.process_time()
        result = function()
        best = min(best, time.process_time() - start)
    return best, result


def median_latency(function: Callable, warmup: int, runs: int) -> float:
    """Median wall seconds of ``runs`` calls after ``warmup`` calls, under ``torch.no_grad``."""
    with torch.no_grad():
        for _ in range(warmup):
            function()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib(field: str = "VmRSS") -> float:
    """Current (``VmRSS``) or peak since the last reset (``VmHWM``) resident memory, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parse_common(parser, argv):
    """Add the options every benchmark shares (--seed, --threads, --write), parse ``argv`` and set the
    torch thread count (1 by default: CPU times stay comparable on a shared machine)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def publish(title: str, table: str, argv, script: str, notes: str = "") -> None:
    """Write the section ``## title`` (command, machine, date, table, notes) into docs/benchmarks.md, between
    the markers ``<!-- title begins/ends -->`` (see benchmarks.markdown)."""
    command = f"python -m benchmarks.{script.removesuffix('.py')} " + " ".join(argv if argv is not None else sys.argv[1:])
    body = section(command.strip(), table, title)
    if notes:
        body = body.rstrip("\n") + "\n\n" + notes.strip() + "\n"
    replace_section(DOC, title, body, heading="# Benchmarks")
    print(f"wrote section '{title}' to {DOC}")


__all__ = ["DOC", "FULL", "MODEST", "apply_masks", "build", "cpu_seconds", "machine", "median_latency", "parse_common",
           "planted_masks", "publish", "random_masks", "randomize_affine", "reset_peak_rss", "rss_mib",
           "weight_names"]
