"""The Squeeze-Release loop: prune -> fine-tune (masks held) -> minimize -> release -> fine-tune.

See ``docs/results.md`` for what the loop achieves and ``../shared/design/squeeze-release.md`` for the
design. The user's training code stays the user's: fxmin calls ``train(model, step)`` and
``evaluate(model)`` and never owns a data loop.

NOTE [Defaults]
``alpha = 0.01`` and ``release_tolerance = 1e-3`` (relative L2 change of the output on the calibration
batch) are our choices, not derived; both are parameters. Stopping: the loop stops after ``patience``
consecutive cycles whose accuracy is below ``baseline - tolerance``; the best model is the smallest one
(ties: the most accurate) whose accuracy is within the tolerance, or, with ``finish_epochs``, the
smallest candidate that is within ``finish_tolerance`` after its finishing training.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict
from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import InputError
from ..audit.flops import flops
from ..masks import model_device, to_device
from ..minimize import minimize
from .release import release
from .criteria import global_magnitude, layer_magnitude, magnitude, prunable, zero_masks
from .training import hold_masks
from .checkpoints import (CHECKPOINT_VERSION, _picklable, finish_checkpoint, latest_checkpoint, load_checkpoint,
                          load_finished, save_checkpoint, save_finish_checkpoint)
from .records import CycleRecord, FinishRecord, SqueezeReleaseResult, TrainStep
from ..report import count_parameters

__all__ = ["CHECKPOINT_VERSION", "CycleRecord", "FinishRecord", "SqueezeReleaseResult", "TrainStep",
           "finish_checkpoint", "latest_checkpoint", "load_checkpoint", "load_finished", "squeeze_release"]

# the finishing phase picks its spaced candidates from a pool of this many times finish_candidates
# models (accepted, or near misses within finish_pool_tolerance), the most accurate of each size band
# spacing**(1/4) wide (kept in memory and in checkpoints); picking spaced ones as the loop goes would
# lose a model that a later, smaller one crowds out but that finishing may need, and a plain "smallest N"
# fills up with near twins when the loop lingers at one size (seen on MNIST: 12 models of 4,404-4,450 parameters, one candidate)
POOL_PER_CANDIDATE = 4



def _is_main() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _evaluate(evaluate, model):
    model.eval()
    value = evaluate(model)
    if isinstance(value, Mapping):
        metrics = {k: float(v) if isinstance(v, (int, float)) else v for k, v in value.items()}
        return float(metrics.pop("accuracy")), metrics
    return float(value), {}


def _train(train, model, step):
    model.train()
    if step.masks is not None:
        with hold_masks(model, step.masks):
            train(model, step)
    else:
        train(model, step)
    model.eval()


def squeeze_release(model: nn.Module, *, train: Callable, evaluate: Callable, example_inputs,
                    cycles: int = 10, amount=0.3, tolerance: float = 0.01, criterion=magnitude,
                    scope: str = "global", select: dict | None = None, squeeze_epochs: float = 1,
                    release_epochs: float = 1, release_zeros: bool = True, alpha: float = 0.01,
                    release_tolerance: float = 1e-3, calibration_batch=None, checkpoint_dir: str | None = None,
                    resume=False, seed: int = 0, baseline: float | None = None, patience: int = 1,
                    backoff: float | None = None, regrow: float | None = None, progress: bool = True,
                    minimize_options: dict | None = None, finish_epochs: float | None = None,
                    finish_tolerance: float | None = None, finish_candidates: int = 3,
                    finish_spacing: float = 1.1, finish_pool_tolerance: float | None = None,
                    finish_evaluate: Callable | None = None, min_amount: float = 0.0,
                    time_budget: float | None = None) -> SqueezeReleaseResult:
    """Run Squeeze-Release cycles on a trained ``model``; return the best model and the history.

    Each cycle: ``masks = prune(model, amount)`` (``scope`` 'global' or 'layer', ``criterion`` (one with a
    ``bind(model)``, such as :class:`fxmin.MacScaled`, is bound to each cycle's model),
    ``select`` for :func:`fxmin.prunable`), ``train(model, TrainStep('squeeze', ...))`` with the masks
    held, ``minimize``, :func:`release` the zeros left inside the compacted tensors (``alpha``,
    ``release_tolerance``, ``calibration_batch`` defaulting to ``example_inputs``), then
    ``train(model, TrainStep('release', ...))`` and ``evaluate(model)`` (a float, or a dict with an
    'accuracy' key plus any metrics to record). ``release_zeros=False`` keeps those zeros masked
    instead (the 'cycles without release' control). ``amount`` may be a callable ``cycle -> fraction``.
    ``amount`` counts the weights that were not released in the previous cycle: the released positions
    are ranked with all others and pruned on top (NOTE [Amount after a release]; ``scope='global'`` only).
    A cycle whose accuracy is below ``baseline - tolerance`` is a miss; the loop stops after ``patience``
    consecutive misses. With ``backoff`` (e.g. 0.5) a miss instead restarts from the best model so far
    with the amount multiplied by ``backoff`` (until ``patience`` misses in a row); with ``regrow``
    (e.g. 1.5) each accepted cycle multiplies it back up (never above the scheduled amount), so one
    miss does not shrink every later step. The loop also stops when the amount has backed off below
    ``min_amount`` (misses and regrowth that alternate drive it towards 0 while the model barely changes).

    ``finish_epochs``: after the loop, up to ``finish_candidates`` accepted models, smallest first and
    each at least ``finish_spacing`` times the size of the one before (so that a miss moves to a
    clearly larger model, not to a near twin), are trained once more with
    ``train(model, TrainStep('finish', cycle, finish_epochs))``; the first whose accuracy is then within
    ``finish_tolerance`` (default ``tolerance``) of the baseline is the result. The cycles' weights
    carry whatever penalty drove the squeeze; a last training without it recovers accuracy (on
    LeNet-300-100: 0.2-0.6 validation points, docs/results.md), so the search ``tolerance`` may be
    looser than ``finish_tolerance``. When no candidate passes, the most accurate
    finished one is returned and ``stopped`` says so. Each is recorded in ``result.finished``.
    ``finish_pool_tolerance`` (default ``tolerance``) admits the search's near misses to the pool too:
    a cycle within it of the baseline is a finishing candidate even when the loop rejected it and
    went on from the best model (a miss at the search tolerance may pass once finished; the search
    itself still only continues from accepted models).
    ``finish_evaluate`` (default ``evaluate``, same return convention) judges the finishing phase on
    data the search never saw: the loop accepts and rejects dozens of models on ``evaluate``'s split,
    and what it keeps is biased towards that split (on MNIST, a lineage 0.8 points below dense on
    validation was 1.3 below on test). With it, ``finish_tolerance`` is measured from
    ``finish_evaluate(model)`` of the input model (``result.finish_baseline``), and each candidate's
    accuracy before and after finishing is ``finish_evaluate``'s.

    ``time_budget`` (seconds): the wall-clock time this call may spend in cycles. A cycle is not
    started when the time spent so far plus the last cycle's duration would pass it (the finishing
    phase comes on top); ``stopped`` says so, and ``resume=True`` with a new budget goes on.

    ``tolerance`` is in the units ``evaluate`` returns. After each cycle a checkpoint
    ``checkpoint_dir/cycle_NNN.pt`` is written (rank 0 only under torch.distributed); ``resume=True``
    continues from the last one there (``resume='path.pt'``: from that file). The finishing phase writes
    ``checkpoint_dir/finish.pt`` after each candidate it trains, and at its end the cycle it chose
    (:func:`fxmin.cycle.load_finished` reads it back): a resume takes the candidates finished there instead of training
    them again, so a crash loses at most the candidate in progress, and ``resume=True`` after a complete
    run returns its result without training. The input model is never modified.

    >>> result = fxmin.squeeze_release(net, train=my_train, evaluate=my_accuracy,   # doctest: +SKIP
    ...                                example_inputs=(x[:64],), cycles=5, amount=0.5)
    >>> print(result.table())                                                        # doctest: +SKIP
    """
    if scope not in ("global", "layer"):
        raise InputError(f"scope must be 'global' or 'layer', got {scope!r}")
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    calibration = calibration_batch if calibration_batch is not None else example_inputs
    prune_masks_for = global_magnitude if scope == "global" else layer_magnitude
    schedule = amount if callable(amount) else (lambda cycle: amount)
    options = {"seed": seed, **(minimize_options or {})}
    main = _is_main()

    state = None
    path = resume if isinstance(resume, str) else (latest_checkpoint(checkpoint_dir) if resume else None)
    if path:  # onto the model's device: the user's train/evaluate feed it there
        state = load_checkpoint(path, map_location=model_device(model))
    if state is not None:
        current = state["module"]
        history = [CycleRecord(**r) for r in state["history"]]
        baseline, best_cycle, params_original = state["baseline"], state["best_cycle"], state["params_original"]
        best = state.get("best_module")
        if best is None:
            best = copy.deepcopy(model).eval() if best_cycle == 0 else current
        best_masks, misses, stopped = state.get("best_masks"), state["misses"], state.get("stopped", "")
        scale = state.get("scale", 1.0)
        current_released = state.get("current_released", 0)
        candidates = [(c, m) for c, m in state.get("candidates", [])]
        finish_baseline = state.get("finish_baseline")
        torch.set_rng_state(state["rng"].cpu())  # loaded onto the model's device with the rest
    else:
        current = copy.deepcopy(model)
        params_original = count_parameters(current)
        accuracy, metrics = _evaluate(evaluate, current)
        baseline = accuracy if baseline is None else float(baseline)
        history = [CycleRecord(0, params_original, 1.0, accuracy, 0.0, 0.0, 0, 0.0, True, metrics,
                               macs=_macs(current, example_inputs, options))]
        best, best_cycle, best_masks, misses, stopped = current, 0, None, 0, ""
        scale = 1.0
        current_released = 0
        candidates = []  # (cycle, module): the pool for the finishing phase (accepted models and near misses)
        finish_baseline = None
    if finish_evaluate is not None and finish_baseline is None:
        finish_baseline = _evaluate(finish_evaluate, copy.deepcopy(model))[0]
    elif finish_evaluate is None:
        finish_baseline = baseline
    start = history[-1].cycle + 1
    if finish_epochs is not None and (finish_candidates < 1 or finish_spacing < 1):
        raise InputError(f"finish_candidates must be at least 1 and finish_spacing at least 1.0, "
                         f"got {finish_candidates} and {finish_spacing}")
    pool_tolerance = tolerance if finish_pool_tolerance is None else float(finish_pool_tolerance)
    if pool_tolerance < tolerance:
        raise InputError(f"finish_pool_tolerance ({pool_tolerance}) must be at least tolerance ({tolerance}): "
                         f"every accepted model is a finishing candidate")

    if time_budget is not None and time_budget <= 0:
        raise InputError(f"time_budget must be a positive number of seconds, got {time_budget}")
    bar = None
    called = time.perf_counter()
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cycles, initial=start - 1, desc="squeeze-release", unit="cycle")
    for cycle in range(start, cycles + 1):
        if stopped:
            break
        began = time.perf_counter()
        spent, last = began - called, history[-1].time_s
        if time_budget is not None and spent + last > time_budget:
            stopped = (f"cycle {cycle}: time budget of {time_budget:.0f} s reached ({spent:.1f} s spent, the last "
                       f"cycle took {last:.1f} s)")
            break
        fraction = float(schedule(cycle)) * scale
        if fraction < min_amount:
            stopped = f"cycle {cycle}: amount {fraction:.2g} backed off below min_amount {min_amount}"
            break
        working = copy.deepcopy(current)
        prior = None if release_zeros else zero_masks(working, **(select or {}))
        # NOTE [Amount after a release]: the last release refilled `current_released` zeros; pruning
        # `amount` of *all* weights would mostly re-prune that noise and the cycle would stall (it did:
        # 2.9x after 10 cycles on LeNet-300-100). So those positions come on top of the amount.
        total = sum(p.numel() for p in prunable(working, **(select or {})).values())
        if total == 0:
            stopped = f"cycle {cycle}: nothing left to prune"
            break
        effective = min(1.0, (current_released + fraction * (total - current_released)) / total) \
            if release_zeros and scope == "global" else fraction
        masks = prune_masks_for(working, effective, criterion=criterion, masks=prior, **(select or {}))
        _train(train, working, TrainStep("squeeze", cycle, squeeze_epochs, masks))
        minimized = minimize(working, masks, example_inputs, **options).module
        if release_zeros:
            generator = torch.Generator().manual_seed(seed * 100_003 + cycle)
            released = release(minimized, calibration, alpha=alpha, tolerance=release_tolerance, generator=generator)
            minimized, sigmas, released_count = released.module, released.sigmas, sum(released.zeros.values())
            _train(train, minimized, TrainStep("release", cycle, release_epochs, None))
        else:
            sigmas, released_count = {}, 0
            _train(train, minimized, TrainStep("recover", cycle, release_epochs, zero_masks(minimized, **(select or {}))))
        accuracy, metrics = _evaluate(evaluate, minimized)
        params = count_parameters(minimized)
        accepted = accuracy >= baseline - tolerance
        values = sorted(s for s in sigmas.values() if s > 0)
        record = CycleRecord(cycle, params, params_original / max(params, 1), accuracy, fraction,
                             values[len(values) // 2] if values else 0.0, released_count,
                             time.perf_counter() - began, accepted, metrics, dict(sigmas),
                             macs=_macs(minimized, example_inputs, options))
        history.append(record)
        current, current_released = minimized, released_count
        if accepted:
            misses = 0
            if regrow is not None:
                scale = min(1.0, scale * regrow)
            if (params, -accuracy) < (history[best_cycle].params, -history[best_cycle].accuracy):
                best, best_cycle, best_masks = minimized, cycle, masks
        else:
            misses += 1
            if misses >= patience:
                stopped = f"cycle {cycle}: accuracy {accuracy:.4f} < baseline {baseline:.4f} - {tolerance}"
            elif backoff is not None:  # retry from the best model with a smaller step
                current, scale = best, scale * backoff
                current_released = history[best_cycle].released
        if finish_epochs is not None and accuracy >= baseline - pool_tolerance:
            # a pool of the smallest (near misses too); spacing is applied when finishing
            candidates = _pool(candidates + [(cycle, minimized)], history, finish_spacing,
                               POOL_PER_CANDIDATE * finish_candidates)
        if checkpoint_dir and main:
            payload = {"version": CHECKPOINT_VERSION, "cycle": cycle, "module": _picklable(current),
                       "history": [asdict(r) for r in history], "baseline": baseline, "best_cycle": best_cycle,
                       "best_module": _picklable(best) if best_cycle > 0 else None, "best_masks": best_masks,
                       "params_original": params_original, "misses": misses, "stopped": stopped,
                       "rng": torch.get_rng_state(), "scale": scale,
                       "current_released": current_released, "finish_baseline": finish_baseline,
                       "candidates": [(c, _picklable(m)) for c, m in candidates]}
            save_checkpoint(checkpoint_dir, cycle, payload)
        _barrier()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(params=params, accuracy=f"{accuracy:.4f}")
    if bar is not None:
        bar.close()
    finished = []
    if finish_epochs is not None and candidates:
        candidates = _spaced(candidates, history, finish_spacing, finish_candidates)
        # NOTE [Finishing checkpoints]: each finished candidate is written to checkpoint_dir/finish.pt as
        # soon as its training ends (a crash loses at most the candidate in progress); a resume of the
        # same loop (same last cycle, same finish_epochs) takes the candidates finished there instead of
        # training them again, judged against today's finish_tolerance.
        done = {}
        if state is not None and checkpoint_dir:
            saved_path = finish_checkpoint(checkpoint_dir)
            saved = load_checkpoint(saved_path, map_location=model_device(model)) if saved_path else None
            if saved and saved["after_cycle"] == history[-1].cycle and saved["epochs"] == finish_epochs:
                done = {entry["cycle"]: entry for entry in saved["entries"]}
        log = {"version": CHECKPOINT_VERSION, "after_cycle": history[-1].cycle, "epochs": finish_epochs,
               "entries": [], "chosen": None}

        def keep(cycle, record, module):
            log["entries"].append({"cycle": cycle, "record": asdict(record), "module": _picklable(module),
                                   "rng": torch.get_rng_state()})
            if checkpoint_dir and main:
                save_finish_checkpoint(checkpoint_dir, log)
            _barrier()

        chosen, note = _finish(train, evaluate, finish_evaluate, candidates, history, finish_baseline, finish_epochs,
                               tolerance if finish_tolerance is None else finish_tolerance, finished, done, keep)
        log["chosen"] = chosen[0]
        if checkpoint_dir and main:
            save_finish_checkpoint(checkpoint_dir, log)
        _barrier()
        if chosen[0] != best_cycle:
            best_masks = None  # the masks of the best cycle's squeeze; not kept for other candidates
        best_cycle, best = chosen
        stopped = f"{stopped}; {note}" if stopped and note else (note or stopped)
    return SqueezeReleaseResult(best, history, best_cycle, baseline, params_original, best_masks, stopped, finished,
                                finish_baseline)


def _macs(module, example_inputs, options):
    """The multiply-accumulates of ``module`` on ``example_inputs`` (for the history), traced the way
    ``minimize`` traces it (``minimize_options``' tracer, leaf modules, concrete args)."""
    trace_options = {k: options[k] for k in ("tracer", "leaf_modules", "concrete_args") if k in options}
    return flops(module, to_device(example_inputs, model_device(module)), **trace_options).macs


def _smallest(candidates, history, count):
    return sorted(candidates, key=lambda c: (history[c[0]].params, -history[c[0]].accuracy))[:count]


def _pool(candidates, history, spacing, count):
    """The most accurate candidate of each size band (bands ``spacing ** (1/4)`` wide), smallest bands
    first: a loop that lingers at one size fills one band, not the whole pool, with near twins."""
    bands = {}
    for cycle, module in candidates:
        record = history[cycle]
        band = math.floor(4 * math.log(max(record.params, 1)) / math.log(spacing)) if spacing > 1 else record.params
        held = bands.get(band)
        if held is None or (-record.accuracy, record.params) < (-history[held[0]].accuracy, history[held[0]].params):
            bands[band] = (cycle, module)
    return _smallest(list(bands.values()), history, count)


def _spaced(candidates, history, spacing, count):
    """The smallest candidates (ties: the more accurate), each ``spacing`` times larger than the last kept."""
    kept = []
    for cycle, module in _smallest(candidates, history, len(candidates)):
        if not kept or history[cycle].params >= history[kept[-1][0]].params * spacing:
            kept.append((cycle, module))
    return kept[:count]


def _finish(train, evaluate, finish_evaluate, candidates, history, baseline, epochs, tolerance, finished,
            done=None, keep=None):
    """The finishing phase: train candidates smallest first until one is within ``tolerance`` as
    ``finish_evaluate`` (None: ``evaluate``, whose scores before finishing ``history`` holds) judges;
    returns ((cycle, module), note) -- the note is empty unless none passed. ``done``: cycle -> entry of
    a finishing checkpoint (taken instead of training, the RNG set to where that training left it);
    ``keep(cycle, record, module)`` is called after each candidate (it writes the checkpoint)."""
    trained_all = []
    for cycle, module in candidates:
        entry = (done or {}).get(cycle)
        if entry is not None:
            record, trained = FinishRecord(**entry["record"]), entry["module"]
            record.accepted = record.accuracy >= baseline - tolerance
            torch.set_rng_state(entry["rng"].cpu())
        else:
            began = time.perf_counter()
            trained = copy.deepcopy(module)
            before = history[cycle].accuracy if finish_evaluate is None else _evaluate(finish_evaluate, trained)[0]
            _train(train, trained, TrainStep("finish", cycle, epochs, None))
            accuracy, metrics = _evaluate(finish_evaluate or evaluate, trained)
            record = FinishRecord(cycle, count_parameters(trained), before, accuracy,
                                  accuracy >= baseline - tolerance, time.perf_counter() - began, metrics)
        finished.append(record)
        if keep is not None:
            keep(cycle, record, trained)
        accepted = record.accepted
        if accepted:
            return (cycle, trained), ""
        trained_all.append((cycle, trained))
    top = max(range(len(finished)), key=lambda i: finished[i].accuracy)
    note = (f"finish: no candidate within {tolerance} of the baseline after {epochs} epochs; "
            f"returning the most accurate (cycle {finished[top].cycle})")
    warnings.warn(note, stacklevel=3)
    return trained_all[top], note
