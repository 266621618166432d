"""The phases of one Squeeze-Release cycle -- prune, squeeze (fine-tune with the masks held),
minimize, release, fine-tune, judge -- and the state the loop carries from cycle to cycle
(``LoopState``, which is also what a cycle checkpoint holds). The finishing phase is ``finishing``."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from ..audit.flops import flops
from ..masks import model_device, to_device
from ..minimize import minimize
from ..report import count_parameters
from .checkpoints import CHECKPOINT_VERSION, _picklable, model_signature
from .criteria import global_magnitude, layer_magnitude, prunable, zero_masks
from .records import CycleRecord, TrainStep
from .release import release
from .settings import SqueezeReleaseSettings
from .training import hold_masks


def evaluate_model(evaluate: Callable, model: nn.Module) -> tuple[float, dict]:
    """``(accuracy, other metrics)`` of ``model`` in eval mode; ``evaluate`` returns a float or a dict
    with an 'accuracy' key."""
    model.eval()
    value = evaluate(model)
    if isinstance(value, Mapping):
        metrics = {k: float(v) if isinstance(v, (int, float)) else v for k, v in value.items()}
        return float(metrics.pop("accuracy")), metrics
    return float(value), {}


def train_model(train: Callable, model: nn.Module, step: TrainStep):
    """``train(model, step)`` in train mode, with ``step.masks`` held when there are any."""
    model.train()
    if step.masks is not None:
        with hold_masks(model, step.masks):
            train(model, step)
    else:
        train(model, step)
    model.eval()


@dataclass(frozen=True)
class Job:
    """What every phase needs: the user's callbacks, the inputs and the settings."""

    train: Callable
    evaluate: Callable
    example_inputs: tuple
    settings: SqueezeReleaseSettings

    @property
    def calibration(self):
        batch = self.settings.release.calibration_batch
        return batch if batch is not None else self.example_inputs

    @property
    def minimize_options(self) -> dict:
        return {"seed": self.settings.seed, **(self.settings.minimize_options or {})}

    @property
    def select(self) -> dict:
        return dict(self.settings.prune.select or {})

    def macs(self, module: nn.Module) -> int:
        """The multiply-accumulates of ``module`` on ``example_inputs`` (for the history), traced the
        way ``minimize`` traces it (``minimize_options``' tracer, leaf modules, concrete args)."""
        options = self.minimize_options
        trace_options = {k: options[k] for k in ("tracer", "leaf_modules", "concrete_args") if k in options}
        return flops(module, to_device(self.example_inputs, model_device(module)), **trace_options).macs


@dataclass
class LoopState:
    """What the loop carries from cycle to cycle: the model the next cycle starts from (``current``),
    the history, the best model so far, the backoff ``scale`` and the finishing pool (``candidates``)."""

    current: nn.Module
    history: list
    baseline: float
    params_original: int
    best: nn.Module
    best_cycle: int = 0
    best_masks: dict | None = None
    misses: int = 0
    stopped: str = ""
    scale: float = 1.0
    current_released: int = 0  # zeros the last release refilled (NOTE [Amount after a release])
    candidates: list = field(default_factory=list)  # (cycle, module): the finishing pool
    finish_baseline: float | None = None
    model: dict | None = None  # the signature of the model the loop started from (checkpoints.check_owner)

    @classmethod
    def start(cls, model: nn.Module, job: Job) -> LoopState:
        """Cycle 0: a copy of the input model, evaluated; its accuracy is the baseline unless one is set."""
        current = copy.deepcopy(model)
        params = count_parameters(current)
        accuracy, metrics = evaluate_model(job.evaluate, current)
        baseline = job.settings.stop.baseline
        baseline = accuracy if baseline is None else float(baseline)
        history = [CycleRecord(0, params, 1.0, accuracy, 0.0, 0.0, 0, 0.0, True, metrics, macs=job.macs(current))]
        return cls(current, history, baseline, params, best=current, model=model_signature(model))

    @classmethod
    def from_checkpoint(cls, saved: dict, model: nn.Module) -> LoopState:
        """The state a cycle checkpoint holds; sets torch's RNG to where that cycle left it."""
        current, best_cycle = saved["module"], saved["best_cycle"]
        best = saved.get("best_module")
        if best is None:
            best = copy.deepcopy(model).eval() if best_cycle == 0 else current
        state = cls(current, [CycleRecord(**r) for r in saved["history"]], saved["baseline"], saved["params_original"],
                    best, best_cycle, saved.get("best_masks"), saved["misses"], saved.get("stopped", ""),
                    saved.get("scale", 1.0), saved.get("current_released", 0),
                    [(c, m) for c, m in saved.get("candidates", [])], saved.get("finish_baseline"),
                    model_signature(model))
        torch.set_rng_state(saved["rng"].cpu())  # loaded onto the model's device with the rest
        return state

    def checkpoint(self, cycle: int) -> dict:
        """The payload of ``cycle_NNN.pt`` (CHECKPOINT_VERSION's format, read by ``from_checkpoint``)."""
        return {"version": CHECKPOINT_VERSION, "cycle": cycle, "module": _picklable(self.current),
                "history": [asdict(r) for r in self.history], "baseline": self.baseline,
                "best_cycle": self.best_cycle,
                "best_module": _picklable(self.best) if self.best_cycle > 0 else None, "best_masks": self.best_masks,
                "params_original": self.params_original, "misses": self.misses, "stopped": self.stopped,
                "rng": torch.get_rng_state(), "scale": self.scale,
                "current_released": self.current_released, "finish_baseline": self.finish_baseline,
                "candidates": [(c, _picklable(m)) for c, m in self.candidates], "model": self.model}


def prune(job: Job, state: LoopState, working: nn.Module, fraction: float) -> dict | None:
    """The masks of this cycle's pruning of ``working`` (None when nothing is left to prune)."""
    settings = job.settings
    prior = None if settings.release.enabled else zero_masks(working, **job.select)
    total = sum(p.numel() for p in prunable(working, **job.select).values())
    if total == 0:
        return None
    # NOTE [Amount after a release]: the last release refilled `current_released` zeros; pruning
    # `amount` of *all* weights would mostly re-prune that noise and the cycle would stall. So those
    # positions come on top of the amount (docs/results.md has the run that showed it).
    released = state.current_released
    if settings.release.enabled and settings.prune.scope == "global":
        fraction = min(1.0, (released + fraction * (total - released)) / total)
    masks_for = global_magnitude if settings.prune.scope == "global" else layer_magnitude
    return masks_for(working, fraction, criterion=settings.prune.criterion, masks=prior, **job.select)


def squeeze(job: Job, working: nn.Module, cycle: int, masks: dict):
    """Fine-tune ``working`` in place with ``masks`` held (the 'squeeze' phase)."""
    train_model(job.train, working, TrainStep("squeeze", cycle, job.settings.prune.epochs, masks))


def compact(job: Job, working: nn.Module, masks: dict) -> nn.Module:
    """The exact, smaller model ``fxmin.minimize`` makes of ``working`` under ``masks``."""
    return minimize(working, masks, job.example_inputs, **job.minimize_options).module


def release_zeros(job: Job, module: nn.Module, cycle: int) -> tuple[nn.Module, dict, int]:
    """``(released module, sigma per tensor, zeros released)``; without release, ``module`` unchanged."""
    settings = job.settings
    if not settings.release.enabled:
        return module, {}, 0
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + cycle)
    released = release(module, job.calibration, alpha=settings.release.alpha,
                       tolerance=settings.release.tolerance, generator=generator)
    return released.module, released.sigmas, sum(released.zeros.values())


def fine_tune(job: Job, module: nn.Module, cycle: int):
    """Train ``module`` in place after the release ('release'), or with the zeros still held ('recover')."""
    epochs = job.settings.release.epochs
    if job.settings.release.enabled:
        train_model(job.train, module, TrainStep("release", cycle, epochs, None))
    else:
        train_model(job.train, module, TrainStep("recover", cycle, epochs, zero_masks(module, **job.select)))


def measure(job: Job, state: LoopState, module: nn.Module, cycle: int, fraction: float, sigmas: dict,
            released: int, began: float) -> CycleRecord:
    """The history record of ``cycle``: ``evaluate(module)``, its size, whether it is within tolerance."""
    accuracy, metrics = evaluate_model(job.evaluate, module)
    params = count_parameters(module)
    accepted = accuracy >= state.baseline - job.settings.stop.tolerance
    values = sorted(s for s in sigmas.values() if s > 0)
    return CycleRecord(cycle, params, state.params_original / max(params, 1), accuracy, fraction,
                       values[len(values) // 2] if values else 0.0, released, time.perf_counter() - began,
                       accepted, metrics, dict(sigmas), macs=job.macs(module))


def judge(job: Job, state: LoopState, record: CycleRecord, module: nn.Module, masks: dict):
    """Take ``record`` into ``state``: the next cycle starts from ``module``; an accepted cycle may be
    the new best and regrows the amount; a miss counts towards ``patience`` (then stops the loop) or
    backs off to the best model."""
    settings = job.settings
    state.history.append(record)
    state.current, state.current_released = module, record.released
    if record.accepted:
        state.misses = 0
        if settings.prune.regrow is not None:
            state.scale = min(1.0, state.scale * settings.prune.regrow)
        best = state.history[state.best_cycle]
        if (record.params, -record.accuracy) < (best.params, -best.accuracy):
            state.best, state.best_cycle, state.best_masks = module, record.cycle, masks
    else:
        state.misses += 1
        if state.misses >= settings.stop.patience:
            state.stopped = (f"cycle {record.cycle}: accuracy {record.accuracy:.4f} < baseline {state.baseline:.4f} "
                             f"- {settings.stop.tolerance}")
        elif settings.prune.backoff is not None:  # retry from the best model with a smaller step
            state.current, state.scale = state.best, state.scale * settings.prune.backoff
            state.current_released = state.history[state.best_cycle].released
