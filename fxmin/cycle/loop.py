"""The Squeeze-Release loop: prune -> fine-tune (masks held) -> minimize -> release -> fine-tune.

The user's training code stays the user's: fxmin calls ``train(model, step)`` and ``evaluate(model)``
and never owns a data loop. The settings are ``settings``, the phases of a cycle ``phases``, the
finishing phase ``finishing``; see ``docs/squeeze-release.md`` for the guide.

NOTE [Defaults]
``alpha = 0.01`` and ``release_tolerance = 1e-3`` (relative L2 change of the output on the calibration
batch) are our choices, not derived; both are settings. Stopping: the loop stops after ``patience``
consecutive cycles whose accuracy is below ``baseline - tolerance``; the best model is the smallest one
(ties: the most accurate) whose accuracy is within the tolerance, or, with ``finish_epochs``, the
smallest candidate that is within ``finish_tolerance`` after its finishing training.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

from torch import nn

from ..errors import InputError
from ..masks import model_device
from .checkpoints import (CHECKPOINT_VERSION, barrier, check_owner, finish_checkpoint, is_main_process,
                          latest_checkpoint, load_checkpoint, load_finished, save_checkpoint)
from .finishing import finish_loop, offer
from .phases import Job, LoopState, compact, evaluate_model, fine_tune, judge, measure, prune, release_zeros, squeeze
from .records import CycleRecord, FinishRecord, SqueezeReleaseResult, TrainStep
from .settings import SqueezeReleaseSettings

__all__ = ["CHECKPOINT_VERSION", "CycleRecord", "FinishRecord", "SqueezeReleaseResult", "SqueezeReleaseSettings",
           "TrainStep", "finish_checkpoint", "latest_checkpoint", "load_checkpoint", "load_finished", "squeeze_release"]


def squeeze_release(model: nn.Module, *, train: Callable, evaluate: Callable, example_inputs,
                    settings: SqueezeReleaseSettings | None = None, **keywords) -> SqueezeReleaseResult:
    """Run Squeeze-Release cycles on a trained ``model``; return the best model and the history.

    Configure it with ``settings=`` (a :class:`fxmin.SqueezeReleaseSettings`) or with keywords, each
    naming one of its fields (``settings.KEYWORDS``; keywords given with ``settings=`` replace those
    fields; the defaults are the settings classes'): ``cycles``, ``amount``, ``tolerance``, ``criterion``,
    ``scope``, ``select``, ``squeeze_epochs``, ``release_epochs``, ``release_zeros``, ``alpha``,
    ``release_tolerance``, ``calibration_batch``, ``checkpoint_dir``, ``resume``, ``seed``, ``baseline``,
    ``patience``, ``backoff``, ``regrow``, ``progress``, ``minimize_options``, ``finish_epochs``,
    ``finish_tolerance``, ``finish_candidates``, ``finish_spacing``, ``finish_pool_tolerance``,
    ``finish_evaluate``, ``min_amount``, ``time_budget``.

    Each cycle: prune (``scope`` 'global' or 'layer', ``criterion``, ``select`` for
    :func:`fxmin.prunable`), ``train(model, TrainStep('squeeze', ...))`` with the masks held,
    ``minimize``, :func:`release` the zeros left inside the compacted tensors (``alpha``,
    ``release_tolerance``, ``calibration_batch`` defaulting to ``example_inputs``), then
    ``train(model, TrainStep('release', ...))`` and ``evaluate(model)`` (a float, or a dict with an
    'accuracy' key plus any metrics to record). ``release_zeros=False`` keeps those zeros masked
    instead (the 'cycles without release' control). ``amount`` may be a callable ``cycle -> fraction``;
    it counts the weights that were not released in the previous cycle: the released positions are
    ranked with all others and pruned on top (NOTE [Amount after a release]; ``scope='global'`` only).
    A cycle whose accuracy is below ``baseline - tolerance`` is a miss; the loop stops after ``patience``
    consecutive misses. With ``backoff`` (e.g. 0.5) a miss instead restarts from the best model so far
    with the amount multiplied by ``backoff``; with ``regrow`` (e.g. 1.5) each accepted cycle multiplies
    it back up (never above the scheduled amount). The loop also stops when the amount has backed off
    below ``min_amount``, and does not start a cycle that would pass ``time_budget`` seconds (the time
    spent plus the last cycle's duration; the finishing phase comes on top).

    ``finish_epochs``: after the loop, up to ``finish_candidates`` models of the pool (accepted cycles,
    and near misses within ``finish_pool_tolerance``), smallest first and each at least
    ``finish_spacing`` times the size of the one before, are trained once more with
    ``train(model, TrainStep('finish', cycle, finish_epochs))``; the first within ``finish_tolerance``
    (default ``tolerance``) of the baseline is the result. The cycles' weights carry whatever penalty
    drove the squeeze, and a last training without it recovers accuracy, so the search ``tolerance`` may
    be looser than ``finish_tolerance``. When no candidate passes, the most accurate finished one is
    returned and ``stopped`` says so. ``finish_evaluate`` (default ``evaluate``, same return
    convention) judges the finishing phase on data the search never saw (what the search keeps is
    biased towards ``evaluate``'s split); ``finish_tolerance`` is then measured from its score of the
    input model (``result.finish_baseline``).

    ``tolerance`` is in the units ``evaluate`` returns. After each cycle a checkpoint
    ``checkpoint_dir/cycle_NNN.pt`` is written (rank 0 only under torch.distributed); ``resume=True``
    continues from the last one there (``resume='path.pt'``: from that file). The finishing phase writes
    ``checkpoint_dir/finish.pt`` after each candidate it trains, and at its end the cycle it chose
    (:func:`fxmin.cycle.load_finished` reads it back): a resume takes the candidates finished there
    instead of training them again, and ``resume=True`` after a complete run returns its result
    without training. The input model is never modified.

    >>> result = fxmin.squeeze_release(net, train=my_train, evaluate=my_accuracy,   # doctest: +SKIP
    ...                                example_inputs=(x[:64],), cycles=5, amount=0.5)
    >>> settings = fxmin.SqueezeReleaseSettings(prune=fxmin.PruneSettings(amount=0.5),  # doctest: +SKIP
    ...                                         stop=fxmin.StopSettings(cycles=5))
    >>> result = fxmin.squeeze_release(net, train=my_train, evaluate=my_accuracy,   # doctest: +SKIP
    ...                                example_inputs=(x[:64],), settings=settings)
    >>> print(result.table())                                                        # doctest: +SKIP
    """
    if settings is not None and not isinstance(settings, SqueezeReleaseSettings):
        raise InputError(f"settings must be a fxmin.SqueezeReleaseSettings (or pass its fields as keywords), "
                         f"got {type(settings).__name__}")
    settings = (settings or SqueezeReleaseSettings()).with_keywords(**keywords)
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    job = Job(train, evaluate, example_inputs, settings)
    main = is_main_process()
    path = settings.checkpoints.resume_path
    saved = load_checkpoint(path, map_location=model_device(model)) if path else None  # the device train feeds
    if saved is not None:
        check_owner(saved, path, model)
    state = LoopState.from_checkpoint(saved, model) if saved is not None else LoopState.start(model, job)
    finish_evaluate = settings.finish.evaluate
    if finish_evaluate is None:
        state.finish_baseline = state.baseline
    elif state.finish_baseline is None:
        state.finish_baseline = evaluate_model(finish_evaluate, copy.deepcopy(model))[0]

    _run_cycles(job, state, main)
    finished = finish_loop(job, state, resumed=saved is not None, main=main, device=model_device(model))
    return SqueezeReleaseResult(state.best, state.history, state.best_cycle, state.baseline, state.params_original,
                                state.best_masks, state.stopped, finished, state.finish_baseline)


def _run_cycles(job: Job, state: LoopState, main: bool):
    """Cycles from the one after ``state``'s last up to ``cycles``, until ``state.stopped`` says why not."""
    start, called = state.history[-1].cycle + 1, time.perf_counter()
    directory = job.settings.checkpoints.directory
    bar = None
    if job.settings.progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=job.settings.stop.cycles, initial=start - 1, desc="squeeze-release", unit="cycle")
    for cycle in range(start, job.settings.stop.cycles + 1):
        if state.stopped:
            break
        began = time.perf_counter()
        state.stopped, fraction = _start_cycle(job, state, cycle, began - called)
        if state.stopped:
            break
        if not _run_cycle(job, state, cycle, fraction, began):
            state.stopped = f"cycle {cycle}: nothing left to prune"
            break
        if directory and main:
            save_checkpoint(directory, cycle, state.checkpoint(cycle))
        barrier()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(params=state.history[-1].params, accuracy=f"{state.history[-1].accuracy:.4f}")
    if bar is not None:
        bar.close()


def _start_cycle(job: Job, state: LoopState, cycle: int, spent: float) -> tuple[str, float]:
    """``(why not, amount)``: why ``cycle`` does not start ('' when it does: the time budget allows it
    and the amount did not back off below ``min_amount``) and the amount it prunes."""
    budget, last = job.settings.stop.time_budget, state.history[-1].time_s
    if budget is not None and spent + last > budget:
        return (f"cycle {cycle}: time budget of {budget:.0f} s reached ({spent:.1f} s spent, the last "
                f"cycle took {last:.1f} s)"), 0.0
    fraction = job.settings.prune.fraction(cycle) * state.scale
    if fraction < job.settings.prune.min_amount:
        return f"cycle {cycle}: amount {fraction:.2g} backed off below min_amount {job.settings.prune.min_amount}", fraction
    return "", fraction


def _run_cycle(job: Job, state: LoopState, cycle: int, fraction: float, began: float) -> bool:
    """Prune ``fraction`` of ``state.current``, squeeze, minimize, release, fine-tune, judge; False
    when there was nothing left to prune (and nothing ran)."""
    working = copy.deepcopy(state.current)
    masks = prune(job, state, working, fraction)
    if masks is None:
        return False
    squeeze(job, working, cycle, masks)
    module, sigmas, released = release_zeros(job, compact(job, working, masks), cycle)
    fine_tune(job, module, cycle)
    record = measure(job, state, module, cycle, fraction, sigmas, released, began)
    judge(job, state, record, module, masks)
    offer(job, state, record, module)
    return True
