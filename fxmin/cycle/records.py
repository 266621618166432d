"""What the Squeeze-Release loop hands the user and records: the training request (TrainStep), one
record per cycle and per finished candidate, and the result with its tables and plot."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class TrainStep:
    """What fxmin asks your ``train(model, step)`` to do.

    ``phase``: 'squeeze' (masks held fixed by fxmin: any optimizer works), 'release' (all weights
    trainable), 'recover' (cycles without release: the remaining zeros held) or 'finish' (the final
    training of a candidate after the loop, see ``finish_epochs``; a place to drop a sparsity penalty
    and decay the learning rate). ``epochs``: the budget you configured for this phase. ``masks``: the
    masks being held (None in 'release' and 'finish').
    """

    phase: str
    cycle: int
    epochs: float
    masks: dict | None = None


@dataclass
class CycleRecord:
    cycle: int
    params: int
    compression: float
    accuracy: float
    amount: float
    sigma: float  # median released sigma over tensors (0 without release)
    released: int  # zeros released
    time_s: float
    accepted: bool
    metrics: dict = field(default_factory=dict)
    sigmas: dict = field(default_factory=dict)
    macs: int | None = None  # multiply-accumulates on example_inputs (fxmin.flops); None in older checkpoints


@dataclass
class FinishRecord:
    """One candidate trained by the finishing phase: accuracy before and after, whether it passed."""

    cycle: int
    params: int
    before: float
    accuracy: float
    accepted: bool
    time_s: float
    metrics: dict = field(default_factory=dict)


@dataclass
class SqueezeReleaseResult:
    """``module``: the best model (smallest within tolerance, after finishing when ``finish_epochs``
    was given); ``history``: one record per cycle (cycle 0 = the input model); ``best_cycle``;
    ``baseline``: cycle-0 accuracy; ``finished``: one :class:`FinishRecord` per finished candidate;
    ``finish_baseline``: the input model's score by ``finish_evaluate`` (``baseline`` without one)."""

    module: nn.Module
    history: list
    best_cycle: int
    baseline: float
    params_original: int
    masks: dict | None = None
    stopped: str = ""
    finished: list = field(default_factory=list)
    finish_baseline: float | None = None

    def scores(self) -> tuple[float, dict]:
        """(accuracy, other metrics) of ``module`` as last measured: after its finishing training when
        the finishing phase chose it (by ``finish_evaluate`` when given), else in its cycle."""
        finished = next((f for f in self.finished if f.accepted and f.cycle == self.best_cycle), None)
        if finished is None:  # none passed: the most accurate finished one was returned
            finished = next((f for f in sorted(self.finished, key=lambda f: -f.accuracy)
                             if f.cycle == self.best_cycle), None)
        if finished is not None:
            return finished.accuracy, finished.metrics
        record = self.history[self.best_cycle]
        return record.accuracy, record.metrics

    def table(self, tablefmt: str = "github") -> str:
        from tabulate import tabulate

        extra = sorted({key for record in self.history for key in record.metrics})
        macs = any(r.macs is not None for r in self.history)
        rows = [[r.cycle, f"{r.params:,}", f"{r.compression:.1f}x", *([_count(r.macs)] if macs else []),
                 f"{r.accuracy:.4f}", *[_format(r.metrics.get(k)) for k in extra], f"{r.amount:.2f}",
                 f"{r.sigma:.2e}", f"{r.time_s:.1f}", _mark(r, self.best_cycle)]
                for r in self.history]
        return tabulate(rows, headers=["cycle", "params", "compression", *(["MACs"] if macs else []), "accuracy",
                                       *extra, "amount", "sigma (median)", "time s", ""], tablefmt=tablefmt,
                        disable_numparse=True)

    def finish_table(self, tablefmt: str = "github") -> str:
        """The finishing phase: each candidate's accuracy before and after its final training."""
        from tabulate import tabulate

        extra = sorted({key for record in self.finished for key in record.metrics})
        rows = [[f.cycle, f"{f.params:,}", f"{self.params_original / max(f.params, 1):.1f}x", f"{f.before:.4f}",
                 f"{f.accuracy:.4f}", *[_format(f.metrics.get(k)) for k in extra], f"{f.time_s:.1f}",
                 "best" if f.accepted and f.cycle == self.best_cycle else ("" if f.accepted else "over tol.")]
                for f in self.finished]
        return tabulate(rows, headers=["cycle", "params", "compression", "before", "after", *extra, "time s", ""],
                        tablefmt=tablefmt, disable_numparse=True)

    def plot(self, path: str, label: str = "Squeeze-Release", ax=None):
        """Accuracy vs parameters per cycle; needs matplotlib (returns None without it)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r.params for r in self.history], [r.accuracy for r in self.history], "o-", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("accuracy")
        ax.legend()
        for f in self.finished:
            ax.plot([f.params, f.params], [f.before, f.accuracy], "k-", lw=1)
            ax.plot(f.params, f.accuracy, "k*" if f.accepted else "kx", markersize=8)
        if own:
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return path


def _count(value):
    return "" if value is None else f"{value:,}"


def _format(value):
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _mark(record, best_cycle):
    """'best', 'over tol.', or both for a near miss that finishing chose (finish_pool_tolerance)."""
    if record.cycle == best_cycle:
        return "best" if record.accepted else "best (over tol. in the search)"
    return "" if record.accepted else "over tol."
