"""Squeeze-Release on ConvNeXt (torchvision layout, small stem for 1x28x28) / Fashion-MNIST (issue 4).

    apt-get install -y dataset-fashion-mnist
    # reduced width on CPU (the defaults: width 0.25, depths 1 1 3 1; ~100 s per epoch on one core);
    # ours + (c, c') and (a) + (b) as two processes sharing the cached dense model, each writing its raw
    # results (runs/convnext/results-<methods>.json), then the merge (make experiments-fashion):
    nice -n 5 .venv/bin/python -m experiments.convnext_fashion --methods sr,c,r &
    nice -n 5 .venv/bin/python -m experiments.convnext_fashion --methods b,a & wait
    .venv/bin/python -m experiments.convnext_fashion --merge runs/convnext/results-sr-c-r.json \
        runs/convnext/results-b-a.json --write docs/results.md    # and docs/convnext_fashion.png
    # or the controls (c, c') as a process of their own once ours (--methods sr) has finished:
    .venv/bin/python -m experiments.convnext_fashion --methods c,r --ours runs/convnext/results-sr.json
    # ConvNeXt-Tiny where a GPU is present (picked automatically; TF32 training, --tf32 off to disable):
    .venv/bin/python -m experiments.convnext_fashion --width 1 --depths 3 3 9 3 --dense-epochs 30 \
        --section tiny-gpu --write docs/results.md    # its own section and docs/convnext_fashion-tiny-gpu.png
    # the reported H200 run: dense, then ours within a fixed wall-clock lease (--search-seconds)
    experiments/convnext_tiny_gpu.sh OUT_DIR 480

Training: AdamW (weight decay 0.05), batch 128, in every call a 10 % linear warm-up then cosine decay
of the lr to 0 (``--lr`` for the dense model and control (c), ``--finetune-lr`` for the pruning
methods' fine-tuning); group lasso ``--lasso`` in the cycles, none in the finishing phase.
``--mac-power P`` prices the weights by their multiply-accumulates per entry (``fxmin.MacScaled`` for
the pruning, ``group_lasso(costs=fxmin.mac_costs(...))`` for the lasso) so that the squeeze removes
work, not only storage; every result records its MACs per image.

Same protocol as experiments/mnist_lenet300.py: dense baseline, Squeeze-Release (ours), and controls
(a) iterative magnitude pruning + one final minimization, (b) cycles without release, (c) a ConvNeXt
of reduced width with about as many parameters and (c') our final architecture re-initialized, both
trained from scratch with the same epoch budget. The validation split (last 10k of the 60k training
images) makes every choice: the search judges on its first half, the finishing phase on its second
half, which the search never saw (``--finish-split half``); the 10k test split is only reported.
Target (issue 4): 14.8x fewer parameters at no more than 1 point below dense; aim for 20x.
``--write`` puts the tables into this script's marked section of the file (docs/results.md).
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

import fxmin
from benchmarks.markdown import replace_section
from experiments.fashion_report import LABELS, load_ours, plot_seeds, seeds_section, summary, write_section
from experiments.results import cached_dense, split_scores
from fxmin.zoo.convnext import convnext_tiny

DATA = "/usr/share/datasets/fashion-mnist"


def load_fashion(root=DATA):
    def read(name, offset):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: apt-get update && apt-get install -y dataset-fashion-mnist")
        with gzip.open(path, "rb") as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=offset)

    x = torch.tensor(read("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255
    y = torch.tensor(read("train-labels-idx1-ubyte.gz", 8), dtype=torch.long)
    tx = torch.tensor(read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255
    ty = torch.tensor(read("t10k-labels-idx1-ubyte.gz", 8), dtype=torch.long)
    mean, std = x[:50000].mean(), x[:50000].std()
    x, tx = (x - mean) / std, (tx - mean) / std
    return [(x[:50000], y[:50000]), (x[50000:], y[50000:]), (tx, ty)]


def correct(model, x, y, batch=1000):
    model.eval()
    with torch.no_grad():
        return sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))


def reinitialize(module, seed):
    """A copy of ``module`` (a minimized ConvNeXt) with every parameter drawn afresh as ConvNeXt initializes
    it: convolutions and linear layers truncated normal (std 0.02) with zero biases, norms' affine ones /
    zeros, layer scales 1e-6. Buffers (a compensated LayerNorm's removed channels) are the architecture's
    and stay."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(module)
    for sub in fresh.modules():
        if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                torch.nn.init.zeros_(sub.bias)
        elif isinstance(sub, (torch.nn.LayerNorm, fxmin.CompensatedLayerNorm)):
            for name, value in (("weight", 1.0), ("bias", 0.0)):
                if getattr(sub, name, None) is not None:
                    torch.nn.init.constant_(getattr(sub, name), value)
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            if "layer_scale" in name:
                parameter.fill_(1e-6)
    return fresh


class Trainer:
    """The user's loop: AdamW, a warm-up + cosine lr per call, optional group lasso; fxmin calls train/evaluate."""

    def __init__(self, data, args, lasso=0.0, lr=None):
        (self.x, self.y), (self.vx, self.vy), (self.tx, self.ty) = data
        self.args, self.lasso, self.epochs = args, lasso, 0.0
        self.lr = lr if lr is not None else args.lr
        self.generator = torch.Generator().manual_seed(args.seed)

    def train(self, model, step):
        epochs = step.epochs if isinstance(step, fxmin.TrainStep) else step
        finish = isinstance(step, fxmin.TrainStep) and step.phase == "finish"
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.05)
        model.train()
        steps = math.ceil(epochs * len(self.x) / self.args.batch)
        # every call: 10 % linear warm-up, then cosine decay to 0 (--schedule constant: the old flat lr)
        schedule = None if self.args.schedule == "constant" else torch.optim.lr_scheduler.OneCycleLR(
            optimizer, self.lr, total_steps=max(steps, 2), pct_start=0.1, anneal_strategy="cos")
        lasso = 0.0 if finish else self.lasso  # the finishing phase drops the sparsity penalty
        # --mac-power: the lasso presses each tensor's units by the MACs per entry of this model (this call's)
        costs = fxmin.mac_costs(model, (self.x[:2],), power=self.args.mac_power) \
            if lasso and self.args.mac_power else None
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if len(order) < self.args.batch:
                order = torch.cat([order, torch.randperm(len(self.x), generator=self.generator)])
            index, order = order[:self.args.batch].to(self.x.device), order[self.args.batch:]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(self.x[index]), self.y[index])
            if lasso:
                loss = loss + lasso * fxmin.group_lasso(model, costs=costs)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        self.epochs += epochs
        model.eval()

    def _scores(self, model, judged):
        return split_scores(correct, model, (self.vx, self.vy), (self.tx, self.ty), judged)

    def evaluate(self, model):
        """The search's judge: the first half of the validation split (all of it with --finish-split none)."""
        return self._scores(model, 0 if self.args.finish_split == "half" else None)

    def finish_evaluate(self, model):
        """The finishing phase's judge: the second half of the validation split, which the search never saw."""
        return self._scores(model, 1)


def build(args, width=None):
    return convnext_tiny(10, in_channels=1, stem="small", width=width or args.width, depths=tuple(args.depths),
                         stochastic_depth_prob=0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.25, help="stage-width multiplier (1 = ConvNeXt-Tiny)")
    parser.add_argument("--depths", type=int, nargs=4, default=[1, 1, 3, 1], help="3 3 9 3 = ConvNeXt-Tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-epochs", type=float, default=6.0)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--search-seconds", type=float, default=None,
                        help="wall-clock budget of each pruning loop's cycles (fxmin's time_budget; finishing on top)")
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--squeeze-epochs", type=float, default=0.5)
    parser.add_argument("--release-epochs", type=float, default=1.0)
    parser.add_argument("--lasso", type=float, default=5e-4)
    parser.add_argument("--mac-power", type=float, default=0.0,
                        help="price weights by their MACs per entry to this power (fxmin.MacScaled for the "
                             "pruning, group_lasso(costs=...) for the lasso); 0 = count parameters only")
    parser.add_argument("--tolerance", type=float, default=1.5, help="validation points below dense (the search)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=5e-4,
                        help="peak lr of the pruning methods' fine-tuning (dense and (c) use --lr)")
    parser.add_argument("--schedule", choices=["onecycle", "constant"], default="onecycle",
                        help="lr within every training call: warm-up + cosine decay, or flat")
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--backoff", type=float, default=0.5)
    parser.add_argument("--regrow", type=float, default=1.5)
    parser.add_argument("--finish-epochs", type=float, default=2,
                        help="after the cycles, train the smallest candidates this long without the lasso")
    parser.add_argument("--finish-tolerance", type=float, default=0.9, help="validation points below dense")
    parser.add_argument("--finish-candidates", type=int, default=4)
    parser.add_argument("--finish-pool-tolerance", type=float, default=2.2,
                        help="validation points below dense within which a cycle the search rejected is still a "
                             "finishing candidate (--tolerance: accepted cycles only)")
    parser.add_argument("--finish-split", choices=["half", "none"], default="half",
                        help="half: the search judges on the first half of the validation split and the finishing "
                             "phase on the second half, which the search never saw; none: the whole split for both")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--methods", default="sr,c,r,b,a",
                        help="comma-separated: sr (ours), a, b, c (a narrower ConvNeXt), r (c': ours "
                             "re-initialized); c and r need sr in the same process or --ours; dense alone: train "
                             "and cache the dense model only")
    parser.add_argument("--ours", default=None,
                        help="c and r in a process of their own: the raw results (JSON) of the process that ran sr")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tf32", choices=["on", "off"], default="on",
                        help="train in TF32 on CUDA (fxmin verifies and calibrates in full float32 regardless)")
    parser.add_argument("--data", default=DATA, help="folder of the four Fashion-MNIST .gz files")
    parser.add_argument("--section", default="",
                        help="a tag of the docs section and plot this run writes (e.g. tiny-gpu; default: the "
                             "reduced-width CPU section); with --merge, the section to write whatever the runs' tag")
    parser.add_argument("--checkpoints", default="runs/convnext")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--write", default=None, help="markdown file whose ConvNeXt section is replaced")
    parser.add_argument("--json", default=None,
                        help="raw results (default <checkpoints>/results-<methods>.json), written after every method")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only merge these raw result files (one seed's processes) into --write")
    parser.add_argument("--seeds-summary", nargs="+", default=None,
                        help="only write the per-seed table and mean ± sd of these raw result files (any seeds, "
                             "one model) into --write, a section of its own")
    args = parser.parse_args(argv)
    if args.merge or args.seeds_summary:
        if not args.write:
            raise SystemExit("--merge and --seeds-summary need --write (the markdown file whose section is replaced)")
        records = []
        for path in args.merge or args.seeds_summary:
            with open(path) as handle:
                records.append(json.load(handle))
                records[-1]["path"] = path  # where it was read from (the section names it)
        if args.seeds_summary:
            text = seeds_section(records)
            print(text)
            picture = plot_seeds(records, os.path.join(os.path.dirname(args.write) or ".", "convnext_fashion-seeds.png"))
            if picture:
                text += f"\n![test points below dense vs times fewer parameters]({os.path.basename(picture)})\n"
            replace_section(args.write, "convnext_fashion.py seeds", text)
            return
        print(summary(records))
        if args.section:  # the section to write, whatever the processes were started with
            for item in records:
                item["args"]["section"] = args.section
        write_section(records, args.write)
        return
    unknown = set(args.methods.split(",")) - {"sr", "a", "b", "c", "r", "dense"}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from sr, a, b, c, r, dense")
    if args.json is None:
        args.json = os.path.join(args.checkpoints, f"results-{args.methods.replace(',', '-')}.json")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and args.tf32 == "on":
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    data = load_fashion(args.data)
    if args.train_samples:
        data[0] = (data[0][0][:args.train_samples], data[0][1][:args.train_samples])
    data = [(x.to(device), y.to(device)) for x, y in data]
    log_lines = []

    def log(message):
        print(message, flush=True)
        log_lines.append(message)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"device: {device} ({device_name}), settings: {json.dumps(vars(args))}")
    dense = build(args).to(device)
    plain = Trainer(data, args)
    cache = os.path.join(args.checkpoints, f"dense-w{args.width}-d{'-'.join(map(str, args.depths))}-"
                                           f"{args.dense_epochs}ep-{args.schedule}-n{args.train_samples or 50000}-seed{args.seed}.pt")
    # the dense model is the same for every method: trained once (by the process running ours) and cached
    dense_time = cached_dense(dense, lambda m: plain.train(m, args.dense_epochs), cache,
                              wait=not {"sr", "dense"} & set(args.methods.split(",")),
                              map_location=device)
    scores = plain.evaluate(dense)
    finish_half = plain.finish_evaluate(dense)["accuracy"]
    record = {"command": ".venv/bin/python -m experiments.convnext_fashion " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": vars(args), "device": f"{device} ({device_name})", "methods": {},
              "dense": {"params": fxmin.count_parameters(dense), "val": scores["val"], "test": scores["test"],
                        "search": scores["accuracy"], "finish": finish_half, "epochs": args.dense_epochs,
                        "time_s": dense_time}}
    log(f"dense: {record['dense']['params']:,} params val {scores['val']:.2f} (search half {scores['accuracy']:.2f}, "
        f"finishing half {finish_half:.2f}) test {scores['test']:.2f}")

    def add(key, entry):
        """One method's result: into the raw file (after every method, so a run cut short keeps its rows)
        and, with --write, this process's section."""
        record["methods"][key] = entry
        log(f"{LABELS[key]}: {entry['params']:,} params {entry['macs']:,} MACs per image, val {entry['val']:.2f} "
            f"test {entry['test']:.2f}")
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json + ".tmp", "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(args.json + ".tmp", args.json)
        if args.write:
            write_section([record], args.write)

    baseline, methods = scores["accuracy"], args.methods.split(",")

    example = (data[1][0][:16],)
    criterion = fxmin.unit_scaled_magnitude if not args.mac_power else \
        fxmin.MacScaled(fxmin.unit_scaled_magnitude, example_inputs=example, power=args.mac_power)

    def macs(module):
        """Multiply-accumulates per image."""
        return fxmin.flops(module, (data[1][0][:1],)).macs

    record["dense"]["macs"] = macs(dense)

    def cycles(release_zeros, key):
        trainer = Trainer(data, args, args.lasso, args.finetune_lr)
        start = time.perf_counter()
        result = fxmin.squeeze_release(
            dense, train=trainer.train, evaluate=trainer.evaluate, example_inputs=example,
            calibration_batch=(data[1][0][:256],), cycles=args.cycles, amount=args.amount,
            criterion=criterion, tolerance=args.tolerance, squeeze_epochs=args.squeeze_epochs,
            release_epochs=args.release_epochs, release_zeros=release_zeros, baseline=baseline,
            patience=args.patience, backoff=args.backoff, regrow=args.regrow, seed=args.seed,
            checkpoint_dir=os.path.join(args.checkpoints, key), resume=args.resume, progress=False,
            minimize_options={"trials": 1}, finish_epochs=args.finish_epochs, finish_tolerance=args.finish_tolerance,
            finish_candidates=args.finish_candidates, finish_pool_tolerance=args.finish_pool_tolerance,
            finish_evaluate=None if args.finish_split == "none" else trainer.finish_evaluate,
            time_budget=args.search_seconds)
        log(result.table())
        log(f"stopped: {result.stopped or 'after the last cycle'}")
        if result.finished:
            log(result.finish_table())
        _, metrics = result.scores()
        add(key, {"params": result.history[result.best_cycle].params, "macs": macs(result.module),
                  "val": metrics["val"], "test": metrics["test"],
                  "epochs": args.dense_epochs + trainer.epochs, "time_s": time.perf_counter() - start,
                  "best_cycle": result.best_cycle, "stopped": result.stopped,
                  "history": [[r.cycle, r.params, r.accuracy, r.metrics.get("val"), r.metrics.get("test"), r.amount,
                               r.sigma, r.time_s, r.accepted] for r in result.history],
                  "finished": [[f.cycle, f.params, f.before, f.accuracy, f.metrics.get("val"), f.metrics.get("test"),
                                f.time_s, f.accepted] for f in result.finished]})
        return result

    def from_scratch(key, model, epochs, **extra):
        start, trainer = time.perf_counter(), Trainer(data, args)
        trainer.train(model, epochs)
        s = trainer.evaluate(model)
        add(key, {"params": fxmin.count_parameters(model), "macs": macs(model), "val": s["val"], "test": s["test"],
                  "epochs": epochs,
                  "time_s": time.perf_counter() - start, **extra})

    sr = cycles(True, "squeeze-release") if "sr" in methods else None
    if {"c", "r"} & set(methods):
        if sr is not None:
            ours, module = record["methods"]["squeeze-release"], sr.module
        else:  # controls as a process of their own, after ours: its raw results and checkpoints
            ours, module = load_ours(args.ours, architecture="r" in methods)
        if "c" in methods:  # (c): a narrower ConvNeXt of about our size
            width = min((w / 64 for w in range(1, 65)),
                        key=lambda w: abs(fxmin.count_parameters(build(args, w * args.width)) - ours["params"]))
            from_scratch("width-scratch", build(args, width * args.width).to(device), ours["epochs"], width=width)
        if "r" in methods:  # (c'): our final architecture (the minimized GraphModule), re-initialized
            from_scratch("same-arch-reinit", reinitialize(module, args.seed).to(device), ours["epochs"])
    if "b" in methods:
        cycles(False, "no-release")
    if "a" in methods:
        start, trainer = time.perf_counter(), Trainer(data, args, lr=args.finetune_lr)
        model, masks, best, rounds = copy.deepcopy(dense), None, None, []
        for round_ in range(1, args.cycles + 1):
            masks = fxmin.global_magnitude(model, args.amount, masks=masks)
            with fxmin.hold_masks(model, masks):
                trainer.train(model, args.squeeze_epochs + args.release_epochs)
            s = trainer.evaluate(model)
            rounds.append([round_, sum(int(m.sum()) for m in masks.values()), s["accuracy"], s["test"]])
            if s["accuracy"] < baseline - args.tolerance:
                break
            best = (copy.deepcopy(model), {k: v.clone() for k, v in masks.items()})
        # no round within the tolerance: the dense model itself is what (a) can deploy
        module = dense if best is None else fxmin.minimize(best[0], best[1], (data[1][0][:16],)).module
        if best is not None and args.finish_epochs:  # the same finishing training as ours
            trainer.train(module, fxmin.TrainStep("finish", 0, args.finish_epochs))
        s = trainer.evaluate(module)
        add("imp", {"params": fxmin.count_parameters(module), "macs": macs(module), "val": s["val"], "test": s["test"],
                    "epochs": args.dense_epochs + trainer.epochs, "time_s": time.perf_counter() - start,
                    "rounds": rounds})
    if record["methods"]:
        log(summary([record]))


if __name__ == "__main__":
    main()
