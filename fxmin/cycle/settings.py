"""The settings of the Squeeze-Release loop, grouped by concept: the pruning schedule, the release,
when to stop, the finishing phase, checkpoints. Each group is a frozen dataclass that checks its
values when it is made (``fxmin.InputError`` saying what to pass instead).

>>> settings = SqueezeReleaseSettings(prune=PruneSettings(amount=0.5), stop=StopSettings(cycles=5))
>>> settings.with_keywords(tolerance=0.02).stop.tolerance   # the keywords of squeeze_release
0.02

``squeeze_release`` takes either ``settings=`` or its keywords (each keyword names one field, see
``KEYWORDS``); keywords given with ``settings=`` replace those fields.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import InputError
from .checkpoints import latest_checkpoint
from .criteria import magnitude

__all__ = ["CheckpointSettings", "FinishSettings", "KEYWORDS", "PruneSettings", "ReleaseSettings",
           "SqueezeReleaseSettings", "StopSettings"]


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(ok: bool, message: str):
    if not ok:
        raise InputError(message)


@dataclass(frozen=True)
class PruneSettings:
    """What each cycle prunes and how the amount adapts.

    ``amount``: the fraction of the (not just released) weights pruned per cycle, or a callable
    ``cycle -> fraction``. ``criterion``: the scores (:func:`fxmin.magnitude`, ...; one with a
    ``bind(model)``, such as :class:`fxmin.MacScaled`, is bound to each cycle's model). ``scope``:
    'global' (one threshold) or 'layer' (per tensor). ``select``: keywords of :func:`fxmin.prunable`.
    ``epochs``: the budget of the squeeze training (masks held). ``backoff``: after a miss, restart
    from the best model with the amount multiplied by it; ``regrow``: after an accepted cycle, multiply
    it back up (never above the scheduled amount). ``min_amount``: stop once the amount backed off below it.
    """

    amount: float | Callable[[int], float] = 0.3
    criterion: Callable = magnitude
    scope: str = "global"
    select: Mapping | None = None
    epochs: float = 1
    backoff: float | None = None
    regrow: float | None = None
    min_amount: float = 0.0

    def __post_init__(self):
        _check(self.scope in ("global", "layer"), f"scope must be 'global' or 'layer', got {self.scope!r}")
        _check(callable(self.amount) or (_number(self.amount) and 0 <= self.amount <= 1),
               f"amount must be a fraction in [0, 1] or a callable cycle -> fraction, got {self.amount!r}")
        _check(callable(self.criterion) or hasattr(self.criterion, "bind"),
               f"criterion must be a callable such as fxmin.magnitude or one with bind(model) such as fxmin.MacScaled, "
               f"got {self.criterion!r}")
        _check(self.select is None or isinstance(self.select, Mapping),
               f"select must be a dict of fxmin.prunable keywords or None, got {self.select!r}")
        _check(_number(self.epochs) and self.epochs >= 0,
               f"squeeze_epochs must be a number of epochs >= 0, got {self.epochs!r}")
        _check(self.backoff is None or (_number(self.backoff) and 0 < self.backoff <= 1),
               f"backoff must be a factor in (0, 1] (e.g. 0.5) or None, got {self.backoff!r}")
        _check(self.regrow is None or (_number(self.regrow) and self.regrow >= 1),
               f"regrow must be a factor of at least 1 (e.g. 1.5) or None, got {self.regrow!r}")
        _check(_number(self.min_amount) and self.min_amount >= 0,
               f"min_amount must be a fraction >= 0, got {self.min_amount!r}")

    def fraction(self, cycle: int) -> float:
        """The scheduled amount of ``cycle`` (before any backoff)."""
        return float(self.amount(cycle) if callable(self.amount) else self.amount)


@dataclass(frozen=True)
class ReleaseSettings:
    """The release of the zeros left inside compacted tensors, and the training after it.

    ``enabled=False`` keeps those zeros masked instead (the 'cycles without release' control; the
    training after it is then the 'recover' phase). ``alpha``, ``tolerance``: see :func:`fxmin.release`
    (``tolerance`` is the relative L2 change of the output allowed on ``calibration_batch``, which
    defaults to ``example_inputs``). ``epochs``: the budget of the training after the release.
    """

    enabled: bool = True
    alpha: float = 0.01
    tolerance: float = 1e-3
    calibration_batch: Any = None
    epochs: float = 1

    def __post_init__(self):
        _check(isinstance(self.enabled, bool), f"release_zeros must be True or False, got {self.enabled!r}")
        _check(_number(self.alpha) and self.alpha >= 0, f"alpha must be a number >= 0 (e.g. 0.01), got {self.alpha!r}")
        _check(_number(self.tolerance) and self.tolerance > 0,
               f"release_tolerance must be a positive number (e.g. 1e-3), got {self.tolerance!r}")
        _check(_number(self.epochs) and self.epochs >= 0,
               f"release_epochs must be a number of epochs >= 0, got {self.epochs!r}")


@dataclass(frozen=True)
class StopSettings:
    """When a cycle counts as a miss and when the loop stops.

    ``cycles``: the last cycle to run. ``tolerance``: a cycle whose accuracy is below
    ``baseline - tolerance`` is a miss (in the units ``evaluate`` returns); ``baseline`` defaults to
    the input model's accuracy. ``patience``: stop after that many consecutive misses.
    ``time_budget``: seconds this call may spend in cycles; a cycle is not started when the time
    spent plus the last cycle's duration would pass it.
    """

    cycles: int = 10
    tolerance: float = 0.01
    baseline: float | None = None
    patience: int = 1
    time_budget: float | None = None

    def __post_init__(self):
        _check(isinstance(self.cycles, numbers.Integral) and self.cycles >= 0,
               f"cycles must be a whole number >= 0, got {self.cycles!r}")
        _check(_number(self.tolerance), f"tolerance must be a number in evaluate's units, got {self.tolerance!r}")
        _check(self.baseline is None or _number(self.baseline),
               f"baseline must be a number or None (None: the input model's accuracy), got {self.baseline!r}")
        _check(isinstance(self.patience, numbers.Integral) and self.patience >= 1,
               f"patience must be a whole number of misses >= 1, got {self.patience!r}")
        _check(self.time_budget is None or (_number(self.time_budget) and self.time_budget > 0),
               f"time_budget must be a positive number of seconds, got {self.time_budget}")


@dataclass(frozen=True)
class FinishSettings:
    """The finishing phase after the loop (off while ``epochs`` is None).

    Up to ``candidates`` models of the pool (accepted cycles, and near misses within
    ``pool_tolerance``, default the search tolerance), smallest first and each at least ``spacing``
    times the size of the one before, are trained ``epochs`` more; the first within ``tolerance``
    (default the search tolerance) of the baseline is the result. ``evaluate`` (default the loop's)
    judges them on data the search never saw; the baseline is then its score of the input model.
    """

    epochs: float | None = None
    tolerance: float | None = None
    candidates: int = 3
    spacing: float = 1.1
    pool_tolerance: float | None = None
    evaluate: Callable | None = None

    def __post_init__(self):
        _check(self.epochs is None or (_number(self.epochs) and self.epochs >= 0),
               f"finish_epochs must be a number of epochs >= 0 or None (no finishing), got {self.epochs!r}")
        if self.epochs is not None and (self.candidates < 1 or self.spacing < 1):
            raise InputError(f"finish_candidates must be at least 1 and finish_spacing at least 1.0, "
                             f"got {self.candidates} and {self.spacing}")
        _check(self.tolerance is None or _number(self.tolerance),
               f"finish_tolerance must be a number or None (None: the search tolerance), got {self.tolerance!r}")
        _check(self.evaluate is None or callable(self.evaluate),
               f"finish_evaluate must be a callable model -> accuracy or None, got {self.evaluate!r}")


@dataclass(frozen=True)
class CheckpointSettings:
    """``directory``: where ``cycle_NNN.pt`` and ``finish.pt`` are written (None: nowhere).
    ``resume``: True continues from the last checkpoint in ``directory``, a path (str or os.PathLike)
    from that file."""

    directory: str | None = None
    resume: bool | str | os.PathLike = False

    def __post_init__(self):
        _check(self.directory is None or isinstance(self.directory, (str, os.PathLike)),
               f"checkpoint_dir must be a folder path or None, got {self.directory!r}")
        _check(isinstance(self.resume, (bool, str, os.PathLike)),
               f"resume must be True, False or the path of a checkpoint, got {self.resume!r}")
        _check(not (self.resume is True and not self.directory),
               "resume=True needs checkpoint_dir (the folder to resume from); or pass resume='path/cycle_NNN.pt'")

    @property
    def resume_path(self) -> str | None:
        """The checkpoint to resume from: ``resume``'s path, the last one in ``directory``, or None."""
        resume = self.resume
        if isinstance(resume, (str, os.PathLike)):
            return os.fspath(resume)
        return latest_checkpoint(self.directory) if resume else None


@dataclass(frozen=True)
class SqueezeReleaseSettings:
    """Everything :func:`fxmin.squeeze_release` is configured with besides the model and the user's
    ``train``/``evaluate``/``example_inputs``. ``seed`` seeds ``minimize`` and the release noise;
    ``minimize_options``: keywords for :func:`fxmin.minimize`; ``progress``: a tqdm bar."""

    prune: PruneSettings = field(default_factory=PruneSettings)
    release: ReleaseSettings = field(default_factory=ReleaseSettings)
    stop: StopSettings = field(default_factory=StopSettings)
    finish: FinishSettings = field(default_factory=FinishSettings)
    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings)
    seed: int = 0
    progress: bool = True
    minimize_options: Mapping | None = None

    def __post_init__(self):
        for name, kind in (("prune", PruneSettings), ("release", ReleaseSettings), ("stop", StopSettings),
                           ("finish", FinishSettings), ("checkpoints", CheckpointSettings)):
            _check(isinstance(getattr(self, name), kind),
                   f"{name} must be a fxmin.{kind.__name__}, got {type(getattr(self, name)).__name__}")
        _check(isinstance(self.seed, numbers.Integral), f"seed must be a whole number, got {self.seed!r}")
        _check(self.minimize_options is None or isinstance(self.minimize_options, Mapping),
               f"minimize_options must be a dict of fxmin.minimize keywords or None, got {self.minimize_options!r}")
        _check(not (self.minimize_options or {}).get("write_to"),
               "minimize_options: write_to= writes a result's weights to files; the cycle trains each result in memory")
        pool = self.pool_tolerance
        if pool < self.stop.tolerance:
            raise InputError(f"finish_pool_tolerance ({pool}) must be at least tolerance ({self.stop.tolerance}): "
                             f"every accepted model is a finishing candidate")

    @property
    def pool_tolerance(self) -> float:
        """How far below the baseline a cycle may be and still join the finishing pool."""
        pool = self.finish.pool_tolerance
        return self.stop.tolerance if pool is None else float(pool)

    @property
    def finish_tolerance(self) -> float:
        """How far below the finishing baseline a finished candidate may be."""
        return self.stop.tolerance if self.finish.tolerance is None else self.finish.tolerance

    @classmethod
    def from_keywords(cls, **keywords) -> SqueezeReleaseSettings:
        """The settings that ``squeeze_release(..., **keywords)`` runs with."""
        return cls().with_keywords(**keywords)

    def with_keywords(self, **keywords) -> SqueezeReleaseSettings:
        """A copy with the fields named by ``squeeze_release`` keywords (``KEYWORDS``) replaced."""
        groups: dict[str | None, dict] = {}
        for name, value in keywords.items():
            if name not in KEYWORDS:
                raise TypeError(f"squeeze_release() got an unexpected keyword argument {name!r}")
            group, attribute = KEYWORDS[name]
            groups.setdefault(group, {})[attribute] = value
        top = groups.pop(None, {})
        return dataclasses.replace(self, **top, **{group: dataclasses.replace(getattr(self, group), **changes)
                                                   for group, changes in groups.items()})


#: each keyword of :func:`fxmin.squeeze_release` -> (settings group, field); None: a field of
#: :class:`SqueezeReleaseSettings` itself
KEYWORDS: dict[str, tuple[str | None, str]] = {
    "amount": ("prune", "amount"), "criterion": ("prune", "criterion"), "scope": ("prune", "scope"),
    "select": ("prune", "select"), "squeeze_epochs": ("prune", "epochs"), "backoff": ("prune", "backoff"),
    "regrow": ("prune", "regrow"), "min_amount": ("prune", "min_amount"),
    "release_zeros": ("release", "enabled"), "alpha": ("release", "alpha"),
    "release_tolerance": ("release", "tolerance"), "calibration_batch": ("release", "calibration_batch"),
    "release_epochs": ("release", "epochs"),
    "cycles": ("stop", "cycles"), "tolerance": ("stop", "tolerance"), "baseline": ("stop", "baseline"),
    "patience": ("stop", "patience"), "time_budget": ("stop", "time_budget"),
    "finish_epochs": ("finish", "epochs"), "finish_tolerance": ("finish", "tolerance"),
    "finish_candidates": ("finish", "candidates"), "finish_spacing": ("finish", "spacing"),
    "finish_pool_tolerance": ("finish", "pool_tolerance"), "finish_evaluate": ("finish", "evaluate"),
    "checkpoint_dir": ("checkpoints", "directory"), "resume": ("checkpoints", "resume"),
    "seed": (None, "seed"), "progress": (None, "progress"), "minimize_options": (None, "minimize_options"),
}
