"""fxmin against Torch-Pruning 1.6.1 and torch.nn.utils.prune on the same masked models.

The models (fxmin.zoo: ResNet-50, ConvNeXt-Tiny, ViT-S/16 at 64x64, a 4-layer 512-wide GPT) get
"trained-like" nonzero biases, BatchNorm/LayerNorm shifts and running statistics, and planted dead
channels: in every Linear/Conv but the classifier, half of the output rows (filters) are all zero
(``common.planted_masks``). The masked dense model is the reference. Each tool is handed what a user
would compute from it:

- **fxmin**: ``fxmin.minimize(model, masks, inputs, verify=False)`` (the time of the pass; verify's
  cost is in the pass-cost table).
- **Torch-Pruning, per layer**: ``tp.DependencyGraph().build_dependency(model, inputs)``; for every
  Linear/Conv, the indices of its all-zero weight rows now, ``DG.get_pruning_group(layer,
  prune_out_channels, idxs)``, ``check_pruning_group``, ``group.prune()``. Torch-Pruning removes
  the channel from every coupled layer of the group, including writers of a residual stream whose
  row at that index is alive.
- **Torch-Pruning, per group**: over ``DG.get_all_groups()`` (pruning each group as it comes, as
  ``tp.pruner.MetaPruner`` does), only the channels that are zero in *every* layer that writes the
  group: all-zero rows of each Linear/Conv, all-zero columns of an Embedding; a free parameter
  (``cls_token``, ``pos_embed``) counts as alive. The careful user.
- **torch.nn.utils.prune**: ``prune.custom_from_mask`` on every masked weight: exact, and no smaller
  (it adds a ``weight_mask`` buffer beside ``weight_orig``).

Neither Torch-Pruning variant folds what a dead channel still emits (its bias through BatchNorm's
shift and the activation, a constant) into the next layer: that is the error column. The fused
qkv / c_attn projections are passed to Torch-Pruning as ``ignored_layers`` (their reshapes carry
the head count as a literal, which it cannot rewrite).

    python -m benchmarks.vs_torch_pruning [--write]
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
from tabulate import tabulate
from torch import nn
from torch.nn.utils import prune

from benchmarks.common import MODEST, WEIGHTED, apply_masks, build, cpu_seconds, planted_masks, parse_common, publish

import fxmin


def dead_rows(weight: torch.Tensor) -> list:
    """Output rows (filters) whose weights are all zero."""
    return torch.nonzero(weight.detach().flatten(1).abs().sum(1) == 0).flatten().tolist()


def _ignored(model: nn.Module, classifier: tuple) -> list:
    names = set(classifier)
    return [m for path, m in model.named_modules() if path in names or path.endswith(("attn.qkv", "attn.c_attn"))]


def torch_pruning_per_layer(masked: nn.Module, inputs: tuple, classifier: tuple) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(masked)
    ignored = _ignored(model, classifier)
    graph = tp.DependencyGraph().build_dependency(model, inputs, ignored_layers=ignored, verbose=False)
    for module in list(model.modules()):
        if not isinstance(module, WEIGHTED) or module in ignored or module not in graph.module2node:
            continue
        idxs = dead_rows(module.weight)
        if not idxs:
            continue
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs)
        if graph.check_pruning_group(group):
            group.prune()
    return model


def _dead_channels(module) -> set:
    """Channels a user would call dead in a layer that writes them: all-zero Linear/Conv rows, all-zero
    Embedding columns; a free parameter (cls_token, pos_embed, layer_scale) is taken as alive."""
    if isinstance(module, WEIGHTED):
        return set(dead_rows(module.weight))
    if isinstance(module, nn.Embedding):
        return set(torch.nonzero(module.weight.detach().abs().sum(0) == 0).flatten().tolist())
    return set()


def torch_pruning_per_group(masked: nn.Module, inputs: tuple, classifier: tuple) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(masked)
    ignored = _ignored(model, classifier)
    graph = tp.DependencyGraph().build_dependency(model, inputs, ignored_layers=ignored, verbose=False)
    # as tp.pruner.MetaPruner does: walk the groups and prune each as it comes
    for group in graph.get_all_groups(ignored_layers=ignored):
        alive = set()
        for item in group:
            module = item.dep.target.module
            if graph.is_out_channel_pruning_fn(item.dep.handler) and isinstance(module, (*WEIGHTED, nn.Embedding, nn.Parameter)):
                dead = _dead_channels(module)
                alive.update(r for i, r in zip(item.idxs, item.root_idxs) if i not in dead)
        idxs = sorted(set(group[0].root_idxs) - alive)
        if idxs:
            pruning = graph.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, idxs)
            if graph.check_pruning_group(pruning):
                pruning.prune()
    return model


def torch_prune_masks(masked: nn.Module, masks: dict) -> nn.Module:
    model = copy.deepcopy(masked)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        path, _, attribute = name.rpartition(".")
        prune.custom_from_mask(modules[path], attribute, mask)
    return model


def error(reference: nn.Module, candidate: nn.Module, inputs: tuple) -> tuple:
    with torch.no_grad():
        expected, actual = reference(*inputs), candidate(*inputs)
    if expected.shape != actual.shape:
        return float("inf"), float("inf")
    worst = float((expected.double() - actual.double()).abs().max())
    return worst, worst / max(1.0, float(expected.abs().max()))


def buffers_and_parameters(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def compare(name: str, seed: int) -> list:
    factory, make_inputs, classifier = MODEST[name]
    model = build(factory, seed)
    masks = planted_masks(model, 0.5, classifier, seed)
    masked = apply_masks(model, masks)
    inputs = make_inputs(1)
    check = make_inputs(4)
    check = tuple(x.roll(1, 0) if x.is_floating_point() else x for x in check)  # fresh inputs beside the example
    before = fxmin.count_parameters(masked)
    rows = []
    methods = {
        "fxmin": lambda: fxmin.minimize(model, masks, inputs, verify=False).module,
        "Torch-Pruning, per layer": lambda: torch_pruning_per_layer(masked, inputs, classifier),
        "Torch-Pruning, per group": lambda: torch_pruning_per_group(masked, inputs, classifier),
        "torch.nn.utils.prune": lambda: torch_prune_masks(masked, masks),
    }
    for method, function in methods.items():
        try:
            seconds, result = cpu_seconds(function)
            removed = before - fxmin.count_parameters(result)
            worst, relative = error(masked, result, check)
            stored = buffers_and_parameters(result) - buffers_and_parameters(masked)
            rows.append([name, method, f"{removed:,} ({removed / before:.0%})", f"{stored:+,}", f"{worst:.1e}",
                         f"{relative:.1e}", f"{seconds:.2f}"])
        except Exception as failure:  # a peer's failure is a result to report, not a crash
            rows.append([name, method, "", "", f"failed: {type(failure).__name__}: {str(failure)[:90]}", "", ""])
        print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


HEADERS = ["model", "method", "parameters removed", "stored tensors change", "max abs error", "max rel error",
           "CPU s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEST), choices=list(MODEST))
    args = parse_common(parser, argv)
    import torch_pruning

    rows = []
    for name in args.models:
        rows += compare(name, args.seed)
    table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
    print(table)
    if args.write:
        notes = (f"torch-pruning {getattr(torch_pruning, '__version__', '?')} (pip: 1.6.1; the package reports "
                 f"its own version string), torch.set_num_threads({args.threads}). Error: the max over 4 inputs "
                 "(batch 4) of |masked model - pruned model|, float32; rel divides by max(1, max |output|). "
                 "'stored tensors change' counts parameter and buffer elements after minus before "
                 "(torch.nn.utils.prune adds a mask per weight).")
        publish("Against Torch-Pruning and torch.nn.utils.prune: planted dead channels", table, argv,
                "vs_torch_pruning.py", notes)


if __name__ == "__main__":
    main()
