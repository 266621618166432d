"""The result written to safetensors shards as the plan and the rewrite make it (an engine module).

NOTE [Results written as they are made]
A result larger than memory (a 70 B model's) cannot be held until the end of the pass.
``minimize(..., write_to=directory)`` hands each tensor of the result to :class:`ResultShards` where it is
made: a replacement layer's when its rule installs it (``PlanContext.replace_module``), a sliced model
constant when the plan records it, an unchanged tensor when the rewrite copies it. Each is staged in a
shard (:class:`fxmin.shards.ShardWriter`) and replaced in the result by a tensor of the same shape and
dtype on the meta device, so the pass holds one shard's tensors at a time, never the result. The
float64 values of folded constants (vectors) stay in the plan for the float64 build. When the rewrite
is done the shards and their index are written to a staging folder beside ``directory``; the result
module reads its weights from them (NOTE [Weights from files] in fxmin/weights.py), so verification
streams them like any other checkpoint; only a verified result is moved to ``directory``. An
interrupted or failed pass (Ctrl-C, a failed verification) removes the staging folder and leaves
``directory`` as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .shards import DEFAULT_SHARD_BYTES, ShardWriter, ShardedWeights


class ResultShards:
    """Where ``minimize(..., write_to=directory)`` writes the result: :meth:`store` each tensor as it is made,
    :meth:`close` when all are, :meth:`publish` once verified; :meth:`discard` on failure."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int | None = None):
        directory = Path(directory)
        if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                            or max_shard_bytes <= 0):
            raise InputError(f"shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise InputError(f"write_to={str(directory)!r} exists and is not an empty directory: minimize writes the "
                             "result's shards into a new (or empty) directory and never overwrites files; choose another")
        if not directory.parent.is_dir():
            raise InputError(f"write_to={str(directory)!r}: its parent directory does not exist")
        self.directory = directory
        self.staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.fxmin-", dir=directory.parent))
        self._writer = ShardWriter(self.staging, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)

    def store(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Stage ``tensor`` as ``name`` of the result; return its stand-in on the meta device (a Parameter
        stays a Parameter). A tensor already on the meta device is already stored."""
        if tensor.is_meta:
            return tensor
        self._writer.add(name, tensor)
        stand_in = torch.empty_like(tensor, device="meta")
        return nn.Parameter(stand_in, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else stand_in

    def store_module(self, prefix: str, module: nn.Module) -> None:
        """:meth:`store` every parameter and buffer of ``module`` (named under ``prefix``), in place; a tensor
        held under several names stays one tensor."""
        done: dict = {}
        for path, owner in module.named_modules(remove_duplicate=False):
            for table in (owner._parameters, owner._buffers):
                for name, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    if id(tensor) not in done:
                        done[id(tensor)] = (tensor, self.store(".".join(p for p in (prefix, path, name) if p), tensor))
                    table[name] = done[id(tensor)][1]

    def close(self) -> ShardedWeights:
        """Write the staged shards and the index (in the staging folder); the result's weights, as files."""
        self._writer.close()
        return ShardedWeights(self.staging)

    def publish(self) -> ShardedWeights:
        """Move the written shards to ``directory``; the result's weights there."""
        if self.directory.exists():
            self.directory.rmdir()  # empty, as checked when the pass began
        os.replace(self.staging, self.directory)
        return ShardedWeights(self.directory)

    def discard(self) -> None:
        """Remove everything staged: ``directory`` stays as it was."""
        self._writer.discard()
        shutil.rmtree(self.staging, ignore_errors=True)
