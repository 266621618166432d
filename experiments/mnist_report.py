"""The tables, plot and markdown section of the LeNet-300-100 / MNIST experiment (docs/results.md):
:func:`summarize`, :func:`plot`, :func:`write_markdown`. ``python -m experiments.mnist_lenet300`` runs it.
"""
from __future__ import annotations

import json
import os
import statistics

from benchmarks.markdown import replace_section
from experiments.results import accuracy_axes, save_accuracy_plot


METHODS = [("dense", "dense LeNet-300-100"), ("squeeze-release", "Squeeze-Release (ours)"),
           ("imp", "(a) iterative magnitude pruning + one minimization"), ("no-release", "(b) cycles without release"),
           ("small-dense", "(c) dense MLP of the same size, from scratch (best of 3 shapes on val)"),
           ("same-arch-reinit", "(c') our final architecture, re-initialized, from scratch")]


def summarize(runs):
    from tabulate import tabulate

    def spread(values, fmt):
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

    rows = []
    for key, label in METHODS:
        entries = [r[key] for r in runs if key in r]
        if not entries:
            continue
        dense = [r["dense"] for r in runs if key in r]
        ratios = [d["params"] / e["params"] for d, e in zip(dense, entries)]
        drops = [d["test"] - e["test"] for d, e in zip(dense, entries)]
        rows.append([label, spread([e["params"] for e in entries], ",.0f"), spread(ratios, ".1f") + "x",
                     spread([e["val"] for e in entries], ".2f"), spread([e["test"] for e in entries], ".2f"),
                     spread(drops, ".2f"), spread([e["epochs"] for e in entries], ".0f"),
                     spread([e["time_s"] for e in entries], ".0f"), f"{len(entries)}"])
    return tabulate(rows, headers=["method", "params", "fewer", "val acc %", "test acc %", "test drop (pts)",
                                   "epochs", "time s", "seeds"], tablefmt="github", disable_numparse=True)


def plot(runs, path):
    figure = accuracy_axes()
    if figure is None:
        return None
    fig, ax = figure
    for i, run in enumerate(runs):
        for key, style in (("squeeze-release", "o-"), ("no-release", "s--")):
            if key in run:
                history = run[key]["history"]
                color = f"C{0 if key == 'squeeze-release' else 1}"
                ax.plot([h[1] for h in history], [h[3] for h in history], style, color=color,
                        alpha=0.7, label=(dict(METHODS)[key] + ", cycles" if i == 0 else None), markersize=3)
                ax.plot(run[key]["params"], run[key]["test"], "*" if key == "squeeze-release" else "P", color=color,
                        markersize=13, markeredgecolor="black",
                        label=(dict(METHODS)[key] + ", after finishing" if i == 0 else None))
        for j, key in enumerate(("imp", "small-dense", "same-arch-reinit")):
            if key in run:
                ax.plot(run[key]["params"], run[key]["test"], "^v<"[j], color=f"C{j + 2}", markersize=8,
                        label=dict(METHODS)[key] if i == 0 else None)
    dense = runs[0]["dense"]
    return save_accuracy_plot(fig, ax, path, "LeNet-300-100 on MNIST", dense["params"],
                              statistics.mean(r["dense"]["test"] for r in runs), 50)


def write_markdown(args, runs, table, total, picture, commands, settings):
    from tabulate import tabulate

    dense_params = runs[0]["dense"]["params"]
    per_seed = []
    for run in runs:
        for key, label in METHODS:
            if key in run:
                e = run[key]
                per_seed.append([run["seed"], label, f"{e['params']:,}", f"{dense_params / e['params']:.1f}x",
                                 f"{e['val']:.2f}", f"{e['test']:.2f}", f"{e['epochs']:g}", f"{e['time_s']:.0f}",
                                 e.get("layers") or " x ".join("x".join(map(str, s)) for s in e.get("shape", []))])
    cycles = []
    for run in runs:
        for cycle, params, val, test, amount, sigma, accepted in run.get("squeeze-release", {}).get("history", []):
            cycles.append([run["seed"], cycle, f"{params:,}", f"{dense_params / params:.1f}x", f"{val:.2f}",
                           f"{test:.2f}" if test is not None else "", f"{amount:.3f}", f"{sigma:.1e}",
                           "" if accepted else "miss"])
    finishing = []
    for run in runs:
        for key in ("squeeze-release", "no-release"):
            for cycle, params, before, after, test, accepted in run.get(key, {}).get("finished", []):
                finishing.append([run["seed"], dict(METHODS)[key], cycle, f"{params:,}", f"{dense_params / params:.1f}x",
                                  f"{before:.2f}", f"{after:.2f}", f"{test:.2f}" if test is not None else "",
                                  "chosen" if accepted else "over tol."])
    shapes = [[run["seed"], e["family"], e["layers"], f"{e['params']:,}",
               f"{e['val']:.2f}", f"{e['test']:.2f}"]
              for run in runs for e in run.get("small-dense", {}).get("tried", [])]
    splits = {"half": "the search (tolerances, backoff) judges on the first half of the validation split, the "
                      "finishing phase on the second half, which the search never saw; the val columns are the "
                      "whole split",
              "train": f"the search (tolerances, backoff) judges on the validation split (10k), the finishing phase "
                       f"on {settings.get('holdout')} training images drawn at random, which no phase trains on",
              "none": "validation split (10k) for every choice"}[settings.get("finish_split", "none")]
    halves, held_out = settings.get("finish_split") == "half", settings.get("finish_split", "none") != "none"
    ours = [r for r in runs if "squeeze-release" in r]
    fewer = [r["dense"]["params"] / r["squeeze-release"]["params"] for r in ours]
    drops = [r["dense"]["test"] - r["squeeze-release"]["test"] for r in ours]
    met = [f >= 50 and d <= 1 for f, d in zip(fewer, drops)]
    mean_fewer, mean_drop = sum(fewer) / max(len(ours), 1), sum(drops) / max(len(ours), 1)
    command = "\n".join(commands)
    text = f"""## LeNet-300-100 on MNIST (experiments/mnist_lenet300.py)

Commands (CPU, {args.threads} torch thread(s) per process, on a 2-core machine shared with other jobs, so
times are wall-clock under load), then the merge that wrote this file:

```
{command}
.venv/bin/python -m experiments.mnist_lenet300 --merge <the result files> --write {args.write}
```

Seeds {args.seeds}; wall time of the longest process {total:.0f} s. Choices: {splits}; the test split (10k)
is only reported.
Target: at least 50x fewer deployed parameters than dense at no more than 1 point below the dense
test accuracy. Met for {sum(met)} of {len(met)} seeds; on average {mean_fewer:.1f}x at {mean_drop:.2f} test points
below dense.

Settings: `{json.dumps({k: v for k, v in settings.items() if k not in ("merge", "seeds", "json")})}`

### Summary (mean ± standard deviation over seeds)

{table}

"fewer" is dense parameters / deployed parameters (the dense parameter count of the minimized
GraphModule; an input-pixel selection costs no parameters). "test drop" is dense test accuracy minus
the method's test accuracy, per seed.

### Per seed

{tabulate(per_seed, headers=["seed", "method", "params", "fewer", "val %", "test %", "epochs", "time s", "weight shapes"], tablefmt="github", disable_numparse=True)}

### Finishing phase ({"finishing split" if held_out else "validation"} accuracy before and after the last training; test after)

{tabulate(finishing, headers=["seed", "method", "cycle", "params", "fewer", "before", "after", "test after", ""], tablefmt="github", disable_numparse=True)}

### Control (c): the shapes tried (the best on validation is reported above)

{tabulate(shapes, headers=["seed", "shape", "layers", "params", "val %", "test %"], tablefmt="github", disable_numparse=True)}

### Squeeze-Release cycles (accuracy before finishing; {"search split" if halves else "val"} = what the search judged)

{tabulate(cycles, headers=["seed", "cycle", "params", "fewer", "search split %" if halves else "val %", "test %", "amount", "sigma (median)", ""], tablefmt="github", disable_numparse=True)}
"""
    if picture:
        text += f"\n![accuracy vs parameters]({os.path.basename(picture)})\n"
    replace_section(args.write, "mnist_lenet300.py", text)
