"""Weights in safetensors files, the Hugging Face layout: read one tensor at a time, write shards and an index.

A checkpoint directory holds ``model.safetensors``, or shards ``model-00001-of-00004.safetensors`` ... with
``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {name: file name}}``).

- :class:`ShardedWeights` opens such a directory and reads a tensor only when it is asked for (a mapping
  from names to tensors; ``shape`` and ``nbytes`` read the headers only).
- :func:`write_shards` writes ``(name, tensor)`` pairs as they come into shards of at most
  ``max_shard_bytes``, holding one shard's tensors at a time, then the index (:class:`ShardWriter` does the
  same for tensors handed over one call at a time).
- :func:`load_shards` fills a module's parameters and buffers from a directory, one tensor at a time;
  the module may live on the meta device (``torch.device("meta")`` or ``accelerate.init_empty_weights``).

Needs the ``safetensors`` package (``pip install fxmin[shards]``).
"""
from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: the shard size ``transformers``' ``save_pretrained`` uses by default
DEFAULT_SHARD_BYTES = 5 * 2**30


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise InputError("reading and writing safetensors shards needs the safetensors package: "
                         "pip install 'fxmin[shards]' (or pip install safetensors)") from error
    return safetensors


class ShardedWeights(Mapping):
    """The tensors of a safetensors checkpoint directory (or one ``.safetensors`` file), read lazily.

    >>> weights = ShardedWeights("checkpoint/")            # doctest: +SKIP
    >>> weights.shape("model.embed_tokens.weight")         # doctest: +SKIP
    (128256, 4096)
    >>> weights["model.norm.weight"]                       # doctest: +SKIP
    """

    def __init__(self, location: str | os.PathLike):
        safetensors = _safetensors()
        location = Path(location)
        if location.is_file():
            files = [location]
            self.directory = location.parent
        elif (location / INDEX_FILE).is_file():
            self.directory = location
            index = json.loads((location / INDEX_FILE).read_text())
            files = sorted({location / name for name in index["weight_map"].values()})
        elif (location / SINGLE_FILE).is_file():
            self.directory, files = location, [location / SINGLE_FILE]
        else:
            raise InputError(f"{location} holds no safetensors checkpoint: expected {SINGLE_FILE}, or shards with "
                             f"{INDEX_FILE} (the layout of transformers' save_pretrained)")
        self._file_of: dict[str, Path] = {}
        self._header: dict[str, tuple[tuple, str]] = {}
        for path in files:
            if not path.is_file():
                raise InputError(f"the index of {location} names {path.name}, which is missing")
            with safetensors.safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self._file_of[name] = path
                    self._header[name] = (tuple(view.get_shape()), view.get_dtype())
        self._safetensors = safetensors

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(name)
        with self._safetensors.safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (nothing is read)."""
        return self._header[name][0]

    def nbytes(self) -> int:
        """The bytes of all tensors, from the headers."""
        sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                 "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
        return sum(sizes.get(dtype, 4) * int(torch.Size(shape).numel()) for shape, dtype in self._header.values())


def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], directory: str | os.PathLike, *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``(name, tensor)`` pairs into ``directory`` as safetensors shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own) and the index; returns the index's path (or the single file's,
    when one shard holds everything). A tensor given again under another name (tied weights, as in a
    ``state_dict()``) is stored once, under its first name, as ``save_pretrained`` does; :func:`load_shards`
    ties it again. Only one shard's tensors are held at a time, so ``tensors`` may be a
    generator that slices one weight after another. Files appear only when complete: each shard is written
    under a temporary name and renamed, the index last (an interrupted write leaves no index)."""
    writer = ShardWriter(directory, max_shard_bytes=max_shard_bytes, metadata=metadata)
    try:
        for name, tensor in tensors:
            writer.add(name, tensor)
        return writer.close()
    finally:
        writer.discard()


class ShardWriter:
    """:func:`write_shards` one tensor at a time: ``add(name, tensor)`` as each is made, ``close()`` at the end
    (returns the index's or the single file's path); ``discard()`` removes what an unfinished writer staged.
    The shards are staged in a hidden folder inside ``directory`` and moved into place by ``close()``."""

    def __init__(self, directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None):
        self._safetensors = _safetensors()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes, self.metadata = max_shard_bytes, dict(metadata or {})
        self._staging = Path(tempfile.mkdtemp(prefix=".fxmin-shards-", dir=self.directory))
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set = set()
        self._batch: dict[str, torch.Tensor] = {}
        self._size = 0
        self._seen: dict = {}  # where a tensor's values live -> a weak reference to the tensor stored from there

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Stage ``tensor`` under ``name`` (once per name; a tensor given again under another name is stored once)."""
        if name in self._names:
            raise InputError(f"write_shards got the tensor {name!r} twice")
        self._names.add(name)
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if identity in self._seen and self._seen[identity]() is not None:
            return  # a tied tensor (lm_head.weight is wte.weight): stored once, under its first name
        self._seen[identity] = weakref.ref(tensor)  # a freed tensor's address may be reused by the next one
        tensor = tensor.detach().to("cpu").contiguous()
        if self._batch and self._size + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._batch[name] = tensor
        self._size += tensor.nbytes

    def _flush(self) -> None:
        if self._batch:
            path = self._staging / f"shard-{len(self._written):05d}.safetensors"
            self._safetensors.torch.save_file(self._batch, str(path), metadata={"format": "pt"})
            self._written.append((path, list(self._batch)))
        self._batch, self._size = {}, 0

    def close(self) -> Path:
        """Write what is staged, move the shards into place and write the index last; returns its path (or the
        single file's)."""
        self._flush()
        directory, written = self.directory, self._written
        try:
            if len(written) <= 1:
                final = directory / SINGLE_FILE
                if written:
                    os.replace(written[0][0], final)
                else:
                    self._safetensors.torch.save_file({}, str(final), metadata={"format": "pt"})
                return final
            count = len(written)
            weight_map = {}
            for number, (path, names) in enumerate(written, start=1):
                final_name = f"model-{number:05d}-of-{count:05d}.safetensors"
                os.replace(path, directory / final_name)
                weight_map.update(dict.fromkeys(names, final_name))
            index = {"metadata": {"total_size": sum((directory / f).stat().st_size for f in set(weight_map.values())),
                                  **self.metadata},
                     "weight_map": dict(sorted(weight_map.items()))}
            temporary = self._staging / INDEX_FILE
            temporary.write_text(json.dumps(index, indent=2))
            os.replace(temporary, directory / INDEX_FILE)
            return directory / INDEX_FILE
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the staging folder and what is in it (nothing once :meth:`close` has moved the shards)."""
        self._batch = {}
        if self._staging.exists():
            for leftover in self._staging.iterdir():
                leftover.unlink()
            self._staging.rmdir()


def load_shards(module: nn.Module, weights: Mapping[str, torch.Tensor] | str | os.PathLike, *,
                strict: bool = True) -> nn.Module:
    """Fill ``module``'s parameters and buffers (its state-dict names) from ``weights`` (a checkpoint
    directory or a mapping such as :class:`ShardedWeights`), one tensor at a time, in place; a module on
    the meta device gets real tensors; tied weights stay tied (one tensor, loaded once). ``strict``: every state-dict entry must be in ``weights`` and every
    tensor of ``weights`` must be one of the module's. Returns ``module``."""
    if not isinstance(weights, Mapping):
        weights = ShardedWeights(weights)
    groups: dict[int, list[str]] = {}  # tied weights: one tensor under several names, loaded once
    current: dict[int, torch.Tensor] = {}
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
        current[id(tensor)] = tensor
    missing = sorted(names[0] for names in groups.values() if not any(n in weights for n in names))
    known = {name for names in groups.values() for name in names}
    unexpected = sorted(name for name in weights if name not in known)
    if strict and (missing or unexpected):
        raise InputError(f"the checkpoint does not match the module: missing {missing[:5]}"
                         f"{' and more' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' and more' if len(unexpected) > 5 else ''}. Pass strict=False to load what matches")
    for key, names in groups.items():
        source = next((n for n in names if n in weights), None)
        if source is None:
            continue
        old, tensor = current[key], weights[source]
        if tuple(tensor.shape) != tuple(old.shape):
            raise InputError(f"{source}: the checkpoint holds shape {tuple(tensor.shape)}, the module {tuple(old.shape)}")
        tensor = tensor.to(old.dtype)
        if isinstance(old, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
        for name in names:
            owner, _, attribute = name.rpartition(".")
            holder = module.get_submodule(owner)
            if isinstance(tensor, nn.Parameter):
                setattr(holder, attribute, tensor)
            else:
                holder.register_buffer(attribute, tensor, persistent=attribute not in holder._non_persistent_buffers_set)
    return module
