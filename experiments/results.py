"""What the experiment scripts share: the cached dense model, a run's final model from its checkpoints,
the accuracy plot and the split scores (their sections of docs/results.md go through benchmarks.markdown)."""
from __future__ import annotations

import os
import time

import torch

import fxmin


def cached_dense(model, train, cache, wait=False, map_location=None):
    """Load ``model``'s trained weights from ``cache`` or train it (``train(model)``) and save them there,
    so that every process of an experiment starts from the same dense model; ``wait``: another process
    trains it, poll until the file appears. Returns the training time in seconds (as first measured)."""
    while wait and not os.path.exists(cache):
        time.sleep(5)
    if os.path.exists(cache):
        saved = torch.load(cache, map_location=map_location)
        model.load_state_dict(saved["state"])
        return saved["time_s"]
    began = time.perf_counter()
    train(model)
    seconds = time.perf_counter() - began
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    torch.save({"state": model.state_dict(), "time_s": seconds}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)  # a reader never sees a half-written file
    return seconds


def final_module(folder, cycle, params=None):
    """``(module, weights)``: the model a Squeeze-Release loop (or its control without release) chose, cycle
    ``cycle``, from its checkpoints in ``folder``. ``weights`` says which: 'finished' (``finish.pt``, which
    runs write since fxmin checkpoints its finishing phase) or 'before finishing' (older runs: the cycle's
    model in the last cycle checkpoint's finishing pool or best model; the finishing training changes
    the weights, not the architecture). ``folder`` may also be a ``finish.pt`` file itself (a copy brought
    back from a device run, experiments/convnext_tiny_gpu.sh). ``params``: the size the raw results give, checked."""
    finished = fxmin.cycle.load_finished(folder)
    if finished is not None and finished[0] == cycle:
        module, weights = finished[1], "finished"
    elif os.path.isfile(folder):
        raise SystemExit(f"{folder} holds the finishing phase of a run that chose cycle "
                         f"{finished[0] if finished else None}, not {cycle}")
    else:
        latest = fxmin.cycle.latest_checkpoint(folder)
        if latest is None:
            raise SystemExit(f"{folder} holds no checkpoint of the run that chose cycle {cycle}")
        checkpoint = fxmin.cycle.load_checkpoint(latest)
        pool = dict(checkpoint["candidates"])
        if cycle in pool:
            module = pool[cycle]
        elif cycle == checkpoint["best_cycle"]:
            module = checkpoint["best_module"]
        else:
            raise SystemExit(f"cycle {cycle} is in neither the finishing pool nor the best model of {latest}")
        weights = "before finishing"
    if params is not None and fxmin.count_parameters(module) != params:
        raise SystemExit(f"cycle {cycle} in {folder} has {fxmin.count_parameters(module):,} parameters, the "
                         f"results {params:,}: the checkpoints of another run?")
    return module, weights


def accuracy_axes():
    """(figure, axes) for an accuracy-vs-parameters plot, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt.subplots(figsize=(7, 4.5))


def save_accuracy_plot(fig, ax, path, title, dense_params, dense_test, target):
    """The reference lines (dense - 1 point, ``target``x fewer), log axes and labels; saves ``path``."""
    import matplotlib.pyplot as plt
    ax.axhline(dense_test - 1, color="grey", ls=":", label="dense - 1 point")
    ax.axvline(dense_params / target, color="grey", ls="-.", label=f"{target:g}x fewer")
    ax.set_xscale("log")
    ax.set_xlabel("deployed parameters")
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(bottom=max(80, ax.get_ylim()[0]))
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def split_scores(correct, model, validation, test, judged):
    """'accuracy' on validation half ``judged`` (0, 1; None: the whole split), 'val' on the whole split
    (each validation image is run once), 'test'; ``correct(model, x, y)`` counts the right answers."""
    (vx, vy), (tx, ty) = validation, test
    half = len(vx) // 2
    hits = (correct(model, vx[:half], vy[:half]), correct(model, vx[half:], vy[half:]))
    whole = 100.0 * sum(hits) / len(vx)
    judged_accuracy = whole if judged is None else 100.0 * hits[judged] / (half, len(vx) - half)[judged]
    return {"accuracy": judged_accuracy, "val": whole, "test": 100.0 * correct(model, tx, ty) / len(tx)}
