"""The tables, plots and markdown sections of the ConvNeXt / Fashion-MNIST experiment (docs/results.md):
:func:`summary`, :func:`seeds_section`, :func:`write_section` and the plots; :func:`load_ours` reads a
finished run of ours back.
``python -m experiments.convnext_fashion`` runs the experiment.
"""
from __future__ import annotations

import json
import os

import fxmin
from benchmarks.markdown import replace_section
from experiments.results import accuracy_axes, final_module, save_accuracy_plot


LABELS = {"dense": "dense", "squeeze-release": "Squeeze-Release (ours)",
          "imp": "(a) iterative magnitude pruning + one minimization", "no-release": "(b) cycles without release",
          "width-scratch": "(c) narrower ConvNeXt, from scratch", "same-arch-reinit":
          "(c') our final architecture, re-initialized, from scratch"}


# (marker, colour) of each method's final model on every plot
MARKERS = {"squeeze-release": ("*", "C0"), "no-release": ("P", "C1"), "imp": ("^", "C2"), "width-scratch": ("v", "C3"),
           "same-arch-reinit": ("<", "C4")}


def merged(records):
    """dense and every method's entry from the raw files of one seed's processes (they share the dense model)."""
    entries = {"dense": records[0]["dense"]}
    for item in records:
        if item["dense"]["params"] != entries["dense"]["params"] or item["dense"]["test"] != entries["dense"]["test"]:
            raise SystemExit(f"{item['command']} has another dense model: merge only one seed's processes")
        entries.update(item["methods"])
    return entries


def per_seed(records):
    """{seed: merged entries} from the raw files of any number of processes and seeds of one model."""
    models = {(r["args"]["width"], tuple(r["args"]["depths"]), r["args"].get("dense_epochs")) for r in records}
    if len(models) > 1:
        raise SystemExit(f"--seeds-summary: the files hold different models {sorted(models)}: one model at a time")
    by_seed = {}
    for item in records:
        by_seed.setdefault(item["args"]["seed"], []).append(item)
    return {seed: merged(items) for seed, items in sorted(by_seed.items())}


def plot_seeds(records, path):
    """Test points below dense against how many times fewer parameters, one point per seed and method, and
    each method's mean ± standard deviation over its seeds (both axes)."""
    import statistics
    figure = accuracy_axes()
    if figure is None:
        return None
    fig, ax = figure
    seeds = per_seed(records)
    for key, (marker, color) in MARKERS.items():
        found = [e for e in seeds.values() if key in e]
        if not found:
            continue
        fewer = [e["dense"]["params"] / e[key]["params"] for e in found]
        drops = [e["dense"]["test"] - e[key]["test"] for e in found]
        ax.plot(fewer, drops, marker, color=color, alpha=0.45, markersize=7)
        spread = (statistics.stdev(fewer), statistics.stdev(drops)) if len(found) > 1 else (0, 0)
        ax.errorbar(statistics.mean(fewer), statistics.mean(drops), xerr=spread[0], yerr=spread[1], fmt=marker,
                    color=color, markersize=12, markeredgecolor="black", capsize=3,
                    label=f"{LABELS[key]} ({len(found)} seed{'s' if len(found) > 1 else ''})")
    ax.axhline(1.0, color="grey", ls=":", label="1 point below dense")
    ax.axvline(14.8, color="grey", ls="-.", label="14.8x fewer")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 50], labels=["1x", "2x", "5x", "10x", "20x", "50x"])
    ax.invert_yaxis()  # up is better, as on the accuracy plots
    ax.set_xlabel("times fewer deployed parameters than dense")
    ax.set_ylabel("test points below dense")
    ax.legend(fontsize=7, loc="lower left")
    settings = records[0]["args"]
    ax.set_title(f"ConvNeXt (width {settings['width']:g}, depths {' '.join(map(str, settings['depths']))}) on "
                 f"Fashion-MNIST\nsmall: one seed; large: mean ± sd over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def seeds_section(records):
    """Every seed's methods (the raw files of any number of processes of one model) and, per method,
    the mean ± standard deviation over the seeds that ran it."""
    import statistics

    from tabulate import tabulate
    seeds = per_seed(records)
    rows, spread = [], []
    for key in LABELS:
        found = [(seed, entries[key], entries["dense"]) for seed, entries in seeds.items() if key in entries]
        for seed, e, dense in found:
            rows.append([seed, LABELS[key], f"{e['params']:,}", f"{dense['params'] / e['params']:.1f}x",
                         f"{dense['test']:.2f}", f"{e['test']:.2f}", f"{dense['test'] - e['test']:.2f}"])
        if len(found) > 1 and key != "dense":
            fewer = [d["params"] / e["params"] for _, e, d in found]
            drops = [d["test"] - e["test"] for _, e, d in found]
            spread.append([LABELS[key], len(found), f"{statistics.mean(fewer):.1f} ± {statistics.stdev(fewer):.1f}x",
                           f"{statistics.mean(drops):.2f} ± {statistics.stdev(drops):.2f}",
                           f"{min(fewer):.1f}x", f"{max(drops):.2f}"])
    width, depths, epochs = records[0]["args"]["width"], records[0]["args"]["depths"], records[0]["args"]["dense_epochs"]
    text = [f"## ConvNeXt on Fashion-MNIST over seeds (width {width:g}, depths {' '.join(map(str, depths))}, "
            f"{epochs:g}-epoch dense models)\n",
            "Raw files: " + ", ".join(f"`{item.get('path', item['args']['json'])}`" for item in records) + "\n",
            tabulate(rows, headers=["seed", "method", "params", "fewer", "dense test %", "test %", "test drop (pts)"],
                     tablefmt="github", disable_numparse=True) + "\n"]
    if spread:
        text.append("Mean ± standard deviation over the seeds each method ran on (worst seed: fewest x, largest "
                    "drop):\n\n" + tabulate(spread, headers=["method", "seeds", "fewer", "test drop (pts)",
                                                              "worst fewer", "worst drop"],
                                             tablefmt="github", disable_numparse=True) + "\n")
    return "\n".join(text)


def summary(records):
    from tabulate import tabulate
    entries = merged(records)
    dense = entries["dense"]
    with_macs = "macs" in dense and all("macs" in e for e in entries.values())  # runs since --mac-power
    rows = [[LABELS[key] + (f" (width x{e['width']:.3f})" if "width" in e else ""), f"{e['params']:,}",
             f"{dense['params'] / e['params']:.1f}x"]
            + ([f"{e['macs'] / 1e3:,.0f}", f"{dense['macs'] / e['macs']:.1f}x"] if with_macs else [])
            + [f"{e['val']:.2f}", f"{e['test']:.2f}", f"{dense['test'] - e['test']:.2f}", f"{e['epochs']:g}",
               f"{e['time_s']:.0f}"]
            for key in LABELS if key in entries for e in [entries[key]]]
    headers = ["method", "params", "fewer"] + (["kMACs / image", "fewer MACs"] if with_macs else []) \
        + ["val %", "test %", "test drop (pts)", "epochs", "time s"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def plot(records, path):
    """Test accuracy against deployed parameters: both loops' cycles, the finished models, the controls."""
    figure = accuracy_axes()
    if figure is None:
        return None
    fig, ax = figure
    entries = merged(records)
    for key in ("squeeze-release", "no-release"):
        if key in entries:
            marker, color = MARKERS[key]
            history = entries[key]["history"]
            ax.plot([h[1] for h in history], [h[4] for h in history], "o-" if key == "squeeze-release" else "s--",
                    color=color, alpha=0.7, markersize=3, label=LABELS[key] + ", cycles")
            ax.plot(entries[key]["params"], entries[key]["test"], marker, color=color, markersize=13,
                    markeredgecolor="black", label=LABELS[key] + ", after finishing")
    for key in ("imp", "width-scratch", "same-arch-reinit"):
        if key in entries:
            marker, color = MARKERS[key]
            ax.plot(entries[key]["params"], entries[key]["test"], marker, color=color, markersize=8, label=LABELS[key])
    dense = entries["dense"]
    ax.plot(dense["params"], dense["test"], "kD", label="dense")
    settings = records[0]["args"]
    title = (f"ConvNeXt (width {settings['width']:g}, depths {' '.join(map(str, settings['depths']))}) on "
             f"Fashion-MNIST, {records[0]['device'].split(' (')[-1].rstrip(')')}")
    return save_accuracy_plot(fig, ax, path, title, dense["params"], dense["test"], 14.8)


def write_section(records, path):
    """This script's section of ``path`` (docs/results.md) from the raw files of one seed's processes, and
    its plot next to it (with matplotlib)."""
    from tabulate import tabulate
    entries, settings = merged(records), dict(records[0]["args"])
    dense = entries["dense"]
    tag = settings.get("section") or ""
    for key in ("methods", "write", "json", "merge", "resume", "data", "section"):
        settings.pop(key, None)
    commands = "\n".join(item["command"] for item in records)
    title = f"## ConvNeXt on Fashion-MNIST (experiments/convnext_fashion.py{', ' + tag if tag else ''})"
    text = [(f"{title}\n\nCommands (one process each, sharing "
             f"the cached dense model), device {records[0]['device']}:\n\n```\n{commands}\n```\n"),
            f"Settings: `{json.dumps(settings)}`\n",
            "The validation split (10k) makes every choice: "
            + ("the search judges on its first half, the finishing phase on its second half, which the search "
               "never saw; " if settings.get("finish_split", "half") == "half" else "")
            + f"the val column is the whole split, the test split is only reported. Dense: val {dense['val']:.2f} "
              f"(search half {dense['search']:.2f}, finishing half {dense['finish']:.2f}), test {dense['test']:.2f}. "
              f"Target: 14.8x fewer parameters at no more than 1 point below dense test accuracy (aim: 20x).\n",
            summary(records) + "\n",
            ('"fewer" is dense parameters / deployed parameters; "test drop" is dense test accuracy minus the '
             "method's.\n")]
    for key in ("squeeze-release", "no-release"):
        if key not in entries:
            continue
        entry = entries[key]
        rows = [[c, f"{p:,}", f"{dense['params'] / p:.1f}x", f"{a:.2f}", f"{t:.2f}", f"{m:.3f}", f"{sg:.1e}",
                 f"{ts:.0f}", "best" if c == entry["best_cycle"] else ("" if ok else "miss")]
                for c, p, a, v, t, m, sg, ts, ok in entry["history"]]
        text.append(f"### {LABELS[key]}: cycles (search half; test only reported)\n\n" + tabulate(
            rows, headers=["cycle", "params", "fewer", "search %", "test %", "amount", "sigma (median)", "time s", ""],
            tablefmt="github", disable_numparse=True) + "\n")
        if entry["finished"]:
            rows = [[c, f"{p:,}", f"{dense['params'] / p:.1f}x", f"{b:.2f}", f"{a:.2f}", f"{t:.2f}", f"{ts:.0f}",
                     ("chosen" if c == entry["best_cycle"] else "passed") if ok else "over tol."]
                    for c, p, b, a, v, t, ts, ok in entry["finished"]]
            text.append(f"Finishing ({settings['finish_epochs']:g} epochs without the lasso; finishing half before / "
                        f"after, test after):\n\n" + tabulate(
                            rows, headers=["cycle", "params", "fewer", "before %", "after %", "test %", "time s", ""],
                            tablefmt="github", disable_numparse=True) + "\n")
    if "imp" in entries:
        rows = [[r, f"{k:,}", f"{a:.2f}", f"{t:.2f}"] for r, k, a, t in entries["imp"]["rounds"]]
        text.append("### (a): rounds of global magnitude pruning (weights kept; search half; test only reported)\n\n"
                    + tabulate(rows, headers=["round", "weights kept", "search %", "test %"], tablefmt="github",
                               disable_numparse=True) + "\n")
    picture = plot(records, os.path.join(os.path.dirname(path) or ".",
                                         f"convnext_fashion{'-' + tag if tag else ''}.png"))
    if picture:
        text.append(f"![accuracy vs parameters]({os.path.basename(picture)})\n")
    replace_section(path, "convnext_fashion.py" + (f" {tag}" if tag else ""), "\n".join(text))


def load_ours(path, architecture=True):
    """Ours (its raw entry) and its final architecture, from the raw results of the process that ran it
    (``--ours``) and its checkpoints (``final_module``: the finished model, or for older runs the chosen
    cycle's model before finishing, whose architecture is the same). ``architecture=False`` (control (c) alone
    needs only ours' size and epochs): the raw entry and None, no checkpoint needed."""
    if not path or not os.path.exists(path):
        raise SystemExit(f"--methods c or r without sr needs --ours: the raw results (JSON) of the process that "
                         f"ran ours, got {path!r}")
    with open(path) as handle:
        saved = json.load(handle)
    if "squeeze-release" not in saved["methods"]:
        raise SystemExit(f"{path} holds no Squeeze-Release result yet (its process is still running?)")
    entry = saved["methods"]["squeeze-release"]
    if not architecture:
        return entry, None
    folder = os.path.join(saved["args"]["checkpoints"], "squeeze-release")
    latest = fxmin.cycle.latest_checkpoint(folder)
    if latest is None:
        raise SystemExit(f"(c') trains ours' final architecture, which is in the checkpoints of the run of ours, "
                         f"and {folder} holds none: run it where that run's checkpoints are (control (c) alone "
                         f"needs only {path})")
    return entry, final_module(folder, entry["best_cycle"], entry["params"])[0]
