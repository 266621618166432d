"""Sharded training (FSDP2) inside the user's ``train(model, step)``: the cycle keeps a plain, full module
on every rank, ``train`` trains a sharded copy of it and writes the full weights back.

NOTE [Sharded training between minimizations]
Minimization is a graph-wide analysis: it needs every weight of the model at once, so the cycle's own
steps (prune, minimize, release, checkpoint) always see a plain, unsharded module. Sharding lives in
the user's ``train``: :func:`sharded` deep-copies the module fxmin hands over, shards the copy
(``fully_shard``, by the user's policy), yields it for training and, when the block ends, gathers the
full weights (``get_model_state_dict`` with ``full_state_dict=True, cpu_offload=True``: rank 0 gets
them on the CPU, one tensor on the accelerator at a time) and broadcasts them from rank 0 into the
plain module on every rank. Every rank then runs the same deterministic prune, minimize and seeded
release on the same weights, as under DDP, and the next ``train`` shards the smaller module afresh:
the re-shard after minimization is the next call's copy. The broadcast makes the ranks agree on the
buffers too, which FSDP2 leaves per rank (BatchNorm statistics, say).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from .training import strip_mask_holds


def shard_copy(model: nn.Module, shard: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """A sharded deep copy of the plain ``model``; ``model`` is untouched.

    ``shard(copy)`` applies ``fully_shard`` as you want it (e.g. to every Linear, then to the root: go
    by module type, a minimized model's layers are renamed); by default ``fully_shard(copy)`` on the
    default device mesh (every rank, the accelerator if there is one). A mask hold that fxmin put on
    ``model`` does not follow it into the copy: hold the masks on the copy with its optimizer,
    ``fxmin.hold_masks(copy, step.masks, optimizer)``.
    """
    from torch.distributed.fsdp import fully_shard

    _require_process_group("shard_copy")
    result = copy.deepcopy(model)
    strip_mask_holds(result)
    if shard is None:
        fully_shard(result)
    else:
        shard(result)
    if not _sharded_parameters(result):
        raise InputError(f"shard_copy: shard({type(model).__name__}) left no parameter sharded; it must call "
                         f"torch.distributed.fsdp.fully_shard on the module it is given (or on its layers)")
    return result


def gather_full_model(sharded: nn.Module, into: nn.Module) -> nn.Module:
    """Copy the full weights and buffers of the FSDP2 module ``sharded`` into the plain ``into`` (its
    unsharded twin, same names and shapes) on every rank; return ``into``. A collective: every rank
    calls it. The values are rank 0's, broadcast, so the ranks end bitwise equal."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    _require_process_group("gather_full_model")
    target = into.state_dict()
    shapes = {name: tuple(value.shape) for name, value in sharded.state_dict().items()}
    wanted = {name: tuple(value.shape) for name, value in target.items()}
    if shapes != wanted:
        differ = sorted(set(shapes.items()) ^ set(wanted.items()))[:3]
        raise InputError(f"gather_full_model: the sharded module is not a copy of {type(into).__name__} "
                         f"(names or shapes differ: {differ}); shard a copy of it with fxmin.cycle.shard_copy")
    device = _communication_device(sharded)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    main = dist.get_rank() == 0
    with torch.no_grad():
        for name, value in target.items():
            buffer = (full[name].to(device, value.dtype) if main else
                      torch.empty(value.shape, dtype=value.dtype, device=device))
            dist.broadcast(buffer, src=0)
            value.copy_(buffer)
    return into


@contextlib.contextmanager
def sharded(model: nn.Module, shard: Callable[[nn.Module], object] | None = None):
    """Context manager for ``train(model, step)``: yields :func:`shard_copy` of ``model`` to train and,
    when the block ends without an error, writes the trained weights back into ``model`` on every rank
    (:func:`gather_full_model`). Under FSDP2 the masks are held through the optimizer:

    >>> def train(model, step):                                                       # doctest: +SKIP
    ...     with fxmin.cycle.sharded(model, shard=shard_layers) as net:
    ...         optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    ...         with fxmin.hold_masks(net, step.masks or {}, optimizer):
    ...             ...  # your loop over this rank's batches, on net
    """
    copy_ = shard_copy(model, shard)
    yield copy_
    gather_full_model(copy_, model)


def _sharded_parameters(module: nn.Module) -> list:
    from torch.distributed.tensor import DTensor
    return [p for p in module.parameters() if isinstance(p, DTensor)]


def _communication_device(module: nn.Module) -> torch.device:
    """The device the broadcast runs on: the one of the mesh the parameters are sharded over (the CPU for
    gloo, the current accelerator for NCCL)."""
    parameters = _sharded_parameters(module)
    if not parameters:
        raise InputError(f"gather_full_model: {type(module).__name__} has no sharded parameter; "
                         f"pass the module fully_shard was applied to (fxmin.cycle.shard_copy makes one)")
    kind = parameters[0].device_mesh.device_type
    return torch.device("cpu") if kind == "cpu" else torch.device(kind, torch.get_device_module(kind).current_device())


def _require_process_group(caller: str):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(f"{caller}: no torch.distributed process group; call "
                         f"torch.distributed.init_process_group first (torchrun sets up its environment)")
