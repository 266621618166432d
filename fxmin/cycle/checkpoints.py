"""Checkpoints of the Squeeze-Release loop: one file per cycle and one for the finishing phase
(``finish.pt``, rewritten after each finished candidate), written atomically, read back for ``resume``."""
from __future__ import annotations

import copy
import os

import torch
import torch.fx

from ..errors import InputError

CHECKPOINT_VERSION = 1
FINISH_FILE = "finish.pt"


def _checkpoint_path(directory, cycle):
    return os.path.join(directory, f"cycle_{cycle:03d}.pt")


def _picklable(module):
    """A copy that pickles. NOTE [Pickling GraphModules]: torch 2.13 fails to pickle a GraphModule
    whose code carries type annotations (``x: torch.Tensor`` gives a global '_torch_Tensor_' that its
    import writer cannot name), so the copy drops node type annotations, which change nothing at run time."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    module = copy.deepcopy(module)
    for node in module.graph.nodes:
        node.type = None
    module.recompile()
    return module


def model_signature(model) -> dict:
    """What a checkpoint records of the model its loop started from: its class and the name and shape
    of each parameter (:func:`check_owner` compares them on resume)."""
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": {name: tuple(p.shape) for name, p in model.named_parameters()}}


def check_owner(saved: dict, path: str, model) -> None:
    """Raise :class:`fxmin.InputError` when the checkpoint ``saved`` (read from ``path``) was written by a
    loop that started from another model than ``model`` (another class, or other parameter names or
    shapes). A checkpoint written before checkpoints recorded their model is not checked."""
    owner = saved.get("model")
    if owner is None:
        return
    mine = model_signature(model)
    if owner == mine:
        return
    theirs, ours = owner["parameters"], mine["parameters"]
    differs = next((f"parameter '{name}' is {tuple(theirs[name])} there, {tuple(ours[name])} here"
                    for name in theirs if name in ours and tuple(theirs[name]) != tuple(ours[name])), None)
    missing = sorted(set(theirs) ^ set(ours))
    if differs is None and missing:
        name = missing[0]
        differs = f"parameter '{name}' is only in {'that model' if name in theirs else 'this one'}"
    detail = differs or "the classes differ"
    raise InputError(
        f"checkpoint {path} was written by a Squeeze-Release loop that started from another model: "
        f"{owner['class']} with {len(theirs)} parameter tensors, not this {mine['class']} with {len(ours)} "
        f"({detail}). Pass the model that run started from to resume it, or start afresh with another "
        "checkpoint_dir (or resume=False, which overwrites that directory's checkpoints).")


def latest_checkpoint(directory: str) -> str | None:
    """Path of the last cycle checkpoint in ``directory`` (None when there is none)."""
    if not directory or not os.path.isdir(directory):
        return None
    found = sorted(f for f in os.listdir(directory) if f.startswith("cycle_") and f.endswith(".pt"))
    return os.path.join(directory, found[-1]) if found else None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by :func:`squeeze_release` (a dict: module, history, best_cycle, ...), its
    tensors on ``map_location`` (``squeeze_release(resume=...)`` loads them onto the model's device)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def _save(payload: dict, target: str) -> str:
    """Write ``payload`` to ``target`` through a temporary file: a crash never leaves a half-written one."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    torch.save(payload, target + ".tmp")
    os.replace(target + ".tmp", target)
    return target


def save_checkpoint(directory: str, cycle: int, payload: dict) -> str:
    """Write ``payload`` as ``directory/cycle_NNN.pt``; a crash never leaves a half-written file."""
    return _save(payload, _checkpoint_path(directory, cycle))


def finish_checkpoint(directory: str) -> str | None:
    """Path of the finishing phase's checkpoint in ``directory`` (None when there is none). It holds each
    finished candidate (``entries``: cycle, record, trained module) and, once the phase is over, the
    ``chosen`` cycle (:func:`load_finished`)."""
    path = os.path.join(directory, FINISH_FILE) if directory else None
    return path if path and os.path.exists(path) else None


def load_finished(location: str, map_location="cpu"):
    """``(cycle, module)``: the finished model ``squeeze_release`` returned, from its ``checkpoint_dir`` or
    a ``finish.pt`` file; None when there is no such file or its finishing phase did not end."""
    path = location if os.path.isfile(location) else finish_checkpoint(location)
    saved = load_checkpoint(path, map_location) if path else None
    if saved is None or saved["chosen"] is None:
        return None
    return saved["chosen"], next(e["module"] for e in saved["entries"] if e["cycle"] == saved["chosen"])


def save_finish_checkpoint(directory: str, payload: dict) -> str:
    """Write the finishing phase's ``payload`` as ``directory/finish.pt`` (atomically)."""
    return _save(payload, os.path.join(directory, FINISH_FILE))


def is_main_process() -> bool:
    """True outside torch.distributed and on its rank 0: the process that writes the checkpoints."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier():
    """Wait for every rank under torch.distributed (after rank 0 wrote a checkpoint); nothing otherwise."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
