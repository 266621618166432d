"""The finishing phase of the Squeeze-Release loop: the pool of candidates the loop collects, the
spaced candidates picked from it, and their last training, checkpointed in ``finish.pt``.

NOTE [Finishing pool]
The finishing phase picks its spaced candidates from a pool of ``POOL_PER_CANDIDATE`` times
``finish_candidates`` models (accepted, or near misses within ``finish_pool_tolerance``), the most
accurate of each size band ``spacing ** (1/4)`` wide (kept in memory and in checkpoints). Picking
spaced ones as the loop goes would lose a model that a later, smaller one crowds out but that
finishing may need, and a plain "smallest N" fills up with near twins when the loop lingers at one size.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict

import torch
from torch import nn

from ..report import count_parameters
from .checkpoints import (CHECKPOINT_VERSION, _picklable, barrier, finish_checkpoint, load_checkpoint,
                          save_finish_checkpoint)
from .phases import Job, LoopState, evaluate_model, train_model
from .records import CycleRecord, FinishRecord, TrainStep

POOL_PER_CANDIDATE = 4


def offer(job: Job, state: LoopState, record: CycleRecord, module: nn.Module):
    """Add ``module`` (cycle ``record``) to the finishing pool when finishing is on and it is within
    the pool tolerance; spacing is applied when finishing."""
    finish = job.settings.finish
    if finish.epochs is not None and record.accuracy >= state.baseline - job.settings.pool_tolerance:
        state.candidates = _pool(state.candidates + [(record.cycle, module)], state.history, finish.spacing,
                                 POOL_PER_CANDIDATE * finish.candidates)


def finish_loop(job: Job, state: LoopState, *, resumed: bool, main: bool, device) -> list:
    """Run the finishing phase on ``state``'s pool (when finishing is on and the pool is not empty):
    set ``state.best`` / ``best_cycle`` to the chosen candidate, add a note to ``state.stopped`` when
    none passed; return the :class:`FinishRecord` of each candidate finished. ``resumed``: take the
    candidates a previous run finished (``finish.pt``, loaded onto ``device``); ``main``: this process
    writes the checkpoints."""
    settings, finish = job.settings, job.settings.finish
    finished = []
    if finish.epochs is None or not state.candidates:
        return finished
    directory = settings.checkpoints.directory
    candidates = _spaced(state.candidates, state.history, finish.spacing, finish.candidates)
    done = _finished_before(directory, state, finish.epochs, device) if resumed and directory else {}
    log = {"version": CHECKPOINT_VERSION, "after_cycle": state.history[-1].cycle, "epochs": finish.epochs,
           "entries": [], "chosen": None}

    def keep(cycle, record, module):
        log["entries"].append({"cycle": cycle, "record": asdict(record), "module": _picklable(module),
                               "rng": torch.get_rng_state()})
        if directory and main:
            save_finish_checkpoint(directory, log)
        barrier()

    chosen, note = _finish(job.train, job.evaluate, finish.evaluate, candidates, state.history, state.finish_baseline,
                           finish.epochs, settings.finish_tolerance, finished, done, keep)
    log["chosen"] = chosen[0]
    if directory and main:
        save_finish_checkpoint(directory, log)
    barrier()
    if chosen[0] != state.best_cycle:
        state.best_masks = None  # the masks of the best cycle's squeeze; not kept for other candidates
    state.best_cycle, state.best = chosen
    state.stopped = f"{state.stopped}; {note}" if state.stopped and note else (note or state.stopped)
    return finished


def _finished_before(directory, state, epochs, device) -> dict:
    """cycle -> entry of the candidates a previous run of this loop finished.

    NOTE [Finishing checkpoints]: each finished candidate is written to checkpoint_dir/finish.pt as
    soon as its training ends (a crash loses at most the candidate in progress); a resume of the
    same loop (same last cycle, same finish_epochs) takes the candidates finished there instead of
    training them again, judged against today's finish_tolerance."""
    path = finish_checkpoint(directory)
    saved = load_checkpoint(path, map_location=device) if path else None
    if saved and saved["after_cycle"] == state.history[-1].cycle and saved["epochs"] == epochs:
        return {entry["cycle"]: entry for entry in saved["entries"]}
    return {}


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
    """Train candidates smallest first until one is within ``tolerance`` as ``finish_evaluate``
    (None: ``evaluate``, whose scores before finishing ``history`` holds) judges; returns
    ((cycle, module), note) -- the note is empty unless none passed. ``done``: cycle -> entry of a
    finishing checkpoint (taken instead of training, the RNG set to where that training left it);
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
            before = history[cycle].accuracy if finish_evaluate is None else evaluate_model(finish_evaluate, trained)[0]
            train_model(train, trained, TrainStep("finish", cycle, epochs, None))
            accuracy, metrics = evaluate_model(finish_evaluate or evaluate, trained)
            record = FinishRecord(cycle, count_parameters(trained), before, accuracy,
                                  accuracy >= baseline - tolerance, time.perf_counter() - began, metrics)
        finished.append(record)
        if keep is not None:
            keep(cycle, record, trained)
        if record.accepted:
            return (cycle, trained), ""
        trained_all.append((cycle, trained))
    top = max(range(len(finished)), key=lambda i: finished[i].accuracy)
    note = (f"finish: no candidate within {tolerance} of the baseline after {epochs} epochs; "
            f"returning the most accurate (cycle {finished[top].cycle})")
    warnings.warn(note, stacklevel=4)  # the caller of squeeze_release
    return trained_all[top], note
