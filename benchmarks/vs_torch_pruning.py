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

With ``--speed`` it times instead the pass against Torch-Pruning on the full-size models
(``common.FULL``: ResNet-50, ConvNeXt-Tiny, ViT-S/16 at 224x224, GPT-2 small at 128 tokens), same masks:
one forward of the masked model, fxmin's pass (trace, analysis, plan, rewrite: ``verify=False``), fxmin's
verification as ``minimize`` runs it at each level (``verify="full"``, the default: streamed float64 and
model-dtype runs on the example and two random input sets; ``verify="quick"``: the model's dtype on the
example inputs and the analysis's constants), and each Torch-Pruning
variant (dependency-graph build plus pruning). The methods are called in turn, ``--repeats`` times; the
table gives medians of CPU seconds, so the ratios come from one run on the same (shared) machine.

    python -m benchmarks.vs_torch_pruning [--write]
    python -m benchmarks.vs_torch_pruning --speed [--repeats 3] [--write]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from tabulate import tabulate
from torch import nn
from torch.nn.utils import prune

from benchmarks.common import FULL, MODEST, WEIGHTED, apply_masks, build, cpu_seconds, planted_masks, parse_common, publish

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
    factory, make_inputs, classifier = {**MODEST, **FULL}[name]
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


def _cpu(function):
    start = time.process_time()
    result = function()
    return time.process_time() - start, result


def speed(name: str, seed: int, repeats: int) -> list:
    """One row: medians over ``repeats`` interleaved rounds of forward, fxmin pass, fxmin verify, Torch-Pruning."""
    from fxmin.verify import verify

    factory, make_inputs, classifier = {**MODEST, **FULL}[name]
    model = build(factory, seed)
    masks = planted_masks(model, 0.5, classifier, seed)
    masked = apply_masks(model, masks)
    inputs = make_inputs(1)
    times: dict = {key: [] for key in ("forward", "pass", "full", "quick", "per layer", "per group")}

    def forward():
        with torch.no_grad():
            return masked(*inputs)

    def check(result, level):  # what minimize(verify=level) runs after the pass
        return verify(result.plan.graph_module, result.module, result.example_inputs, level=level, plan=result.plan)

    for _ in range(repeats):
        times["forward"].append(_cpu(forward)[0])
        seconds, result = _cpu(lambda: fxmin.minimize(model, masks, inputs, verify=False, progress=False))
        times["pass"].append(seconds)
        for level in ("full", "quick"):
            times[level].append(_cpu(lambda: check(result, level))[0])
        del result
        for variant, function in (("per layer", torch_pruning_per_layer), ("per group", torch_pruning_per_group)):
            try:
                times[variant].append(_cpu(lambda: function(masked, inputs, classifier))[0])
            except Exception as failure:  # a peer's failure is a result to report
                times[variant].append(float("nan"))
                print(f"  {name} Torch-Pruning {variant} failed: {type(failure).__name__}: {failure}"[:200],
                      file=sys.stderr)
    median = {key: statistics.median(values) for key, values in times.items()}
    tp_best = min((v for k, v in median.items() if k.startswith("per ") and v == v), default=float("nan"))
    row = [name, f"{median['forward']:.3f}", f"{median['pass']:.2f}", f"{median['full']:.2f}", f"{median['quick']:.2f}",
           f"{median['per layer']:.2f}", f"{median['per group']:.2f}", f"{median['pass'] / tp_best:.2f}",
           f"{median['pass'] / median['forward']:.1f}", f"{median['full'] / median['forward']:.1f}",
           f"{median['quick'] / median['forward']:.1f}"]
    print("  " + " | ".join(row), file=sys.stderr, flush=True)
    return row


SPEED_HEADERS = ["model", "forward s", "fxmin pass s", "verify full s", "verify quick s", "TP per layer s",
                 "TP per group s", "pass / TP best", "pass / forward", "full / forward", "quick / forward"]

HEADERS = ["model", "method", "parameters removed", "stored tensors change", "max abs error", "max rel error",
           "CPU s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=[*MODEST, *FULL],
                        help="default: the MODEST models (the FULL ones with --speed)")
    parser.add_argument("--speed", action="store_true", help="time the pass against Torch-Pruning on the FULL models")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per model with --speed")
    args = parse_common(parser, argv)
    import torch_pruning

    if args.speed:
        rows = [speed(name, args.seed, args.repeats) for name in (args.models or list(FULL))]
        table = tabulate(rows, headers=SPEED_HEADERS, tablefmt="github", disable_numparse=True)
        print(table)
        if args.write:
            notes = (f"Medians of {args.repeats} rounds, CPU seconds (user + system of this process), "
                     f"torch.set_num_threads({args.threads}); in each round the forward, fxmin's pass, its "
                     "verification and the two Torch-Pruning variants run one after the other, so the ratios "
                     "compare runs under the same load (the machine is shared: compare ratios, not seconds "
                     f"across runs). torch-pruning {getattr(torch_pruning, '__version__', '?')} (pip: 1.6.1): "
                     "dependency-graph build plus pruning, on a copy of the masked model; fxmin's pass includes "
                     "its own masked copy. Masks: half the output rows of every Linear/Conv but the classifier "
                     "planted all zero. 'TP best' is the faster Torch-Pruning variant that ran.")
            publish("Pass time against Torch-Pruning: full-size models", table, argv, "vs_torch_pruning.py", notes)
        return

    rows = []
    for name in args.models or list(MODEST):
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
