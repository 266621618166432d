"""Where the pass reads weights: one tensor at a time, by name, with the masks applied on load (a base module).

NOTE [Weights on demand]
The pass holds nothing beyond what the user holds: no masked copy of the model, no float64 copy
of its weights. The traced graph shares the model's tensors (unmasked); every reader of weight
values (the analysis, the plan, the rewrite, verification) asks a :class:`WeightSource` for one
tensor by its qualified name and gets it with its mask applied, in its own dtype, and lets it go.
A masked tensor is a fresh copy of that one tensor (``torch.where(mask, tensor, 0)``); an unmasked
one is the model's own tensor (read-only: nothing the pass does writes to it). Where only the
nonzero pattern matters (most of the analysis), ``nonzero`` gives it without a copy of the values,
and the plan loads only the rows and columns it keeps. Masks are matched to tensors by storage, so
a tied table (``wte.weight`` read again as ``lm_head.weight``) is masked under either name, and a
graph that re-registers the model's tensors under other module paths (the export front end) still
finds them. The narrow interface (``shape``, ``dtype``, ``load``) is what a source backed by
files (safetensors shards) implements as well.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np
import torch
import torch.fx
from torch import nn

from . import arrays
from .errors import InputError
from .memory import before_read

#: ``GraphModule.meta`` key of the :class:`WeightSource` a traced graph reads its weights from
META_KEY = "fxmin.weights"


class WeightSource(Protocol):
    """Tensors by qualified name (``"blocks.0.mlp.fc.weight"``): shape and dtype without loading, and
    ``load`` for the value as the pass must see it (masked, own dtype; never written to), whole or some
    rows and columns of it; ``nonzero`` for where that value is nonzero (what most of the analysis asks);
    ``raw`` for the value without its mask."""

    def shape(self, name: str) -> torch.Size: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def load(self, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor | None: ...
    def nonzero(self, name: str) -> np.ndarray | None: ...
    def raw(self, name: str) -> torch.Tensor: ...


def storage_key(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's values across ``detach()`` and ``nn.Parameter`` wrappers (on the meta
    device, where every storage is at address 0, the storage itself)."""
    storage = tensor.untyped_storage()
    where = storage._cdata if tensor.is_meta else storage.data_ptr()
    return (where, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)


class ModuleWeights:
    """The tensors of ``root`` by qualified name, each masked by the bool mask ``masks`` holds for its
    storage (:func:`storage_key`) when it holds one.

    >>> linear = nn.Linear(3, 2)
    >>> weights = ModuleWeights(linear, {storage_key(linear.weight): torch.zeros(2, 3, dtype=torch.bool)})
    >>> bool((weights.load("weight") == 0).all()), weights.load("bias") is not None
    (True, True)
    """

    def __init__(self, root: nn.Module, masks: Mapping[tuple, torch.Tensor] | None = None,
                 files: Mapping[str, torch.Tensor] | None = None, *, check_finite: bool = False):
        self.root = root
        self.masks = dict(masks or {})
        self.files = files
        self.check_finite = check_finite  # NOTE [Finite where first read]
        self._finite: set = set()  # storage keys checked finite as the masks leave them
        self._nonzero_counts: dict = {}  # storage key -> nonzero entries, from nonzero()
        self._masks = _MaskedLoads()
        self._owners: dict = {}  # module path -> the module of root there (root's modules are not replaced)
        self._file_names: dict = {}  # NOTE [Weights from files]: storage key of a meta tensor -> its name in files
        if files is not None:
            for name, tensor in (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)):
                if tensor.is_meta and name in files:
                    self._file_names.setdefault(storage_key(tensor), name)

    def tensor(self, name: str) -> torch.Tensor | None:
        """The tensor itself (unmasked), or None when ``name`` is not a tensor of ``root``."""
        path, _, leaf = name.rpartition(".")
        owner = self._owners.get(path)
        if owner is None:
            try:
                owner = self._owners[path] = self.root.get_submodule(path)
            except AttributeError:
                return None
        value = getattr(owner, leaf, None)
        return value if isinstance(value, torch.Tensor) else None

    def mask(self, name: str) -> torch.Tensor | None:
        tensor = self.tensor(name)
        return None if tensor is None else self._mask_of(tensor)

    def _mask_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return self.masks.get(storage_key(tensor)) if self.masks else None

    def shape(self, name: str) -> torch.Size:
        return self.tensor(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.tensor(name).dtype

    def load(self, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor | None:
        """The tensor as the pass reads it (masked, own dtype), or None when ``name`` is not a tensor of
        ``root``. ``rows`` / ``cols`` (int64 indices, or None for all): only those entries of dims 0 and 1
        (the tensor and its mask sliced alike, then masked)."""
        tensor = self.tensor(name)
        if tensor is None:
            return None
        mask = self._mask_of(tensor)
        tensor = self.raw(name, tensor)
        if mask is None:
            return sliced(tensor, rows, cols)
        return self._masks.load(storage_key(tensor), mask, tensor, rows, cols)

    def raw(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's values without its mask (read-only: it may be the model's own tensor). Every read
        goes through here: once enough has been read since, freed memory goes back to the system (NOTE
        [Freed memory] in fxmin/memory.py), so what a reader copies from it can reuse those pages."""
        tensor = self.tensor(name) if tensor is None else tensor
        before_read(tensor.numel() * tensor.element_size(), allocates=tensor.is_meta)
        value = self._from_files(name, tensor) if tensor.is_meta else tensor.detach()
        if self.check_finite:
            self._require_finite(name, tensor, value)
        return value

    def require_finite(self, name: str) -> None:
        """The tensor ``name`` as the masks leave it holds no NaN or inf, or :class:`InputError` (each tensor
        is checked once: NOTE [Finite where first read])."""
        tensor = self.tensor(name)
        self._require_finite(name, tensor, self.raw(name, tensor))

    def _require_finite(self, name: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key in self._finite or not value.is_floating_point():
            return
        self._finite.add(key)
        if all_finite(value):
            return  # finite before masking, so after (no masked copy needed)
        masked = self.load(name)
        if not all_finite(masked):
            count = int((~torch.isfinite(masked)).sum())
            raise InputError(f"'{name}' holds {count} NaN or inf value(s) that the masks keep: the masked model itself "
                             "computes non-finite outputs, so there is nothing exact to preserve. Fix those values "
                             "or mask them out")

    def nonzero(self, name: str) -> np.ndarray | None:
        """bool numpy array of the tensor's shape: where the value the pass reads (:meth:`load`) is nonzero,
        computed without a masked copy of the values (None when ``name`` is not a tensor of ``root``;
        NOTE [Bool work in numpy] in fxmin/arrays.py)."""
        tensor = self.tensor(name)
        if tensor is None:
            return None
        mask = self._mask_of(tensor)
        pattern = arrays.nonzero(self.raw(name, tensor))
        if mask is not None:
            np.logical_and(pattern, mask.numpy(), out=pattern)
        self._nonzero_counts[storage_key(tensor)] = int(np.count_nonzero(pattern))
        return pattern

    def count_nonzero(self, name: str) -> int:
        """How many entries of :meth:`load` are nonzero (remembered from the last :meth:`nonzero` of that tensor)."""
        key = storage_key(self.tensor(name))
        if key not in self._nonzero_counts:
            self.nonzero(name)
        return self._nonzero_counts[key]

    def stored_name(self, name: str, tensor: torch.Tensor | None = None) -> str:
        """The name under which ``files`` hold the meta tensor ``name`` (its own or one it is tied to), or
        :class:`InputError` saying that nothing holds it (NOTE [Weights from files])."""
        tensor = self.tensor(name) if tensor is None else tensor
        stored = self._file_names.get(storage_key(tensor))
        if stored is None:
            where = "no weights= were given" if self.files is None else "the weights given hold no tensor of that name"
            raise InputError(f"'{name}' is on the meta device (a model built without its weights) and {where}: pass "
                             "weights=fxmin.shards.ShardedWeights('checkpoint/') (safetensors files, the Hugging Face "
                             "layout), or build the model with its weights; a buffer no checkpoint holds (a rotary "
                             "table) stays real when the model is built under accelerate.init_empty_weights()")
        return stored

    def _from_files(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """NOTE [Weights from files]: a tensor the model holds on the meta device is read from ``files``
        (e.g. :class:`fxmin.shards.ShardedWeights`) under its own name or a name it is tied to."""
        stored = self.stored_name(name, tensor)
        value = self.files[stored]
        if tuple(value.shape) != tuple(tensor.shape):
            raise InputError(f"'{stored}' in the weights has shape {tuple(value.shape)}; the model's is "
                             f"{tuple(tensor.shape)}: the checkpoint is not this model's")
        return value.to(tensor.dtype)


class _MaskedLoads:
    """Slices of masked tensors, each masked only where its mask is not the same along the slice's rows.

    NOTE [Masked loads]
    A mask that prunes structure keeps or drops whole rows (output channels): then a slice needs no
    elementwise mask at all, only a copy with the rows that the mask drops zeroed (a copy and a fill
    cost less than gathering the kept rows apart). For each mask it loads (remembered by the tensor's storage) this keeps which
    rows the mask keeps whole and which it drops whole, and masks elementwise (``torch.where``) only a
    slice that has a row of neither kind.
    """

    def __init__(self):
        self._rows: dict = {}  # storage key -> (bool (rows,) kept whole, bool (rows,) dropped whole)

    def load(self, key: tuple, mask: torch.Tensor, tensor: torch.Tensor, rows: torch.Tensor | None,
             cols: torch.Tensor | None) -> torch.Tensor:
        """``tensor`` masked by ``mask`` (its storage key ``key``), only its ``rows`` and ``cols`` (as :func:`sliced`)."""
        if tensor.dim() == 0:
            return torch.where(mask, tensor, 0)
        if key not in self._rows:
            flat = mask.numpy().reshape(mask.shape[0], -1)
            self._rows[key] = (flat.all(axis=1), ~flat.any(axis=1))
        picked = slice(None) if rows is None else rows.numpy()
        whole, dropped = (kind[picked] for kind in self._rows[key])
        if whole.all():
            return sliced(tensor, rows, cols)
        if not (whole | dropped).all():  # some row is masked entry by entry
            kept, mask = sliced(tensor, rows, cols), _sliced_array(mask.numpy(), rows, cols)
            return torch.where(torch.from_numpy(mask), kept, 0)
        values = sliced(tensor, rows, cols)
        values = values.clone() if values is tensor else values
        return values.index_fill_(0, torch.from_numpy(np.nonzero(dropped)[0]), 0)


def sliced(tensor: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` with only the ``rows`` of dim 0 and the ``cols`` of dim 1 (int64 indices; None: all), the
    dim that keeps the smaller share sliced first (the copy between the two slices is then the smaller)."""
    if rows is not None and cols is not None and len(cols) * tensor.shape[0] < len(rows) * tensor.shape[1]:
        return tensor.index_select(1, cols).index_select(0, rows)
    if rows is not None:
        tensor = tensor.index_select(0, rows)
    return tensor if cols is None else tensor.index_select(1, cols)


def _sliced_array(array: np.ndarray, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> np.ndarray:
    """:func:`sliced` for a numpy array (a bool mask: NOTE [Bool work in numpy] in fxmin/arrays.py)."""
    if rows is not None:
        array = np.take(array, rows.numpy(), axis=0)
    return array if cols is None else np.take(array, cols.numpy(), axis=1)


class Unread:
    """A ``get_attr`` value not read yet: the attribute's name and the graph's own tensor (for its shape and
    dtype). NOTE [Weights read where they are used]."""

    __slots__ = ("target", "tensor")

    def __init__(self, target: str, tensor: torch.Tensor):
        self.target, self.tensor = target, tensor


def read_unread(value, load):
    """``value`` (a node's args or kwargs) with every :class:`Unread` in it replaced by ``load(target)``."""
    return torch.fx.node.map_aggregate(value, lambda item: load(item.target) if isinstance(item, Unread) else item)


# NOTE [Weights read where they are used]
# The export front end's graphs read every parameter through a ``get_attr`` node, and those come first
# in the graph: an interpreter that loaded each where its node stands would hold every weight of the
# model from the start of the run to each one's last use, the whole model at once (in float64, in a
# streamed verification). So the streamed runs give a ``get_attr`` of a tensor an :class:`Unread`
# marker and load the tensor only as the node that uses it runs, for that call (``read_unread``).


def call_loaded(module: nn.Module, target: str, load, args, kwargs):
    """``module(*args, **kwargs)`` with each of its parameters and buffers replaced, for this call only, by
    ``load(f"{target}.{name}")`` (a streamed run: NOTE [Streamed runs] in fxmin/streamed.py; a model whose
    weights are read from files: NOTE [Weights from files])."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    tensors = {name: load(f"{target}.{name}") for name, _ in named}
    return torch.func.functional_call(module, tensors, tuple(args), dict(kwargs), tie_weights=False)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, without a temporary of the tensor's size: a sum is finite when every
    entry is (NaN and inf propagate); only an overflowing sum is checked again, a block at a time."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    step = 1 << 22
    return all(bool(torch.isfinite(flat[start:start + step]).all()) for start in range(0, flat.numel(), step))


def weights_of(root: nn.Module) -> ModuleWeights:
    """The source ``root`` reads its weights from: the one :func:`attach` gave it, else its own
    tensors as they are."""
    meta = getattr(root, "meta", None)
    source = meta.get(META_KEY) if isinstance(meta, dict) else None
    return source if source is not None and source.root is root else ModuleWeights(root)


def attach(root: torch.fx.GraphModule, masks: Mapping[tuple, torch.Tensor],
           files: Mapping[str, torch.Tensor] | None = None, *, check_finite: bool = False) -> ModuleWeights:
    """Make ``root`` read its weights masked by ``masks`` (by storage) wherever the pass reads them, its
    meta-device tensors from ``files`` (NOTE [Weights from files]); ``check_finite``: each one checked
    finite where it is first read (NOTE [Finite where first read])."""
    source = ModuleWeights(root, masks, files, check_finite=check_finite)
    root.meta[META_KEY] = source
    return source


def materialize(root: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """``{qualified name: tensor}`` of every parameter and buffer of ``root``, each loaded through
    :func:`weights_of` (masked) and cast to ``dtype`` (floating ones; None: their own), one copy each;
    tied tensors stay one tensor."""
    source = weights_of(root)
    loaded: dict = {}
    out = {}
    for name, tensor in (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)):
        key = storage_key(tensor)
        if key not in loaded:
            value = source.load(name)
            target = dtype if dtype is not None and value.is_floating_point() else value.dtype
            copied = value.to(target) if value is not tensor and value.data_ptr() != tensor.data_ptr() else None
            loaded[key] = copied if copied is not None else value.to(target, copy=True)
        out[name] = loaded[key]
    return out


# NOTE [Finite where first read]
# A NaN or inf that the masks keep makes the masked model compute non-finite outputs (and a zero times
# an inf is no zero): there is nothing exact to preserve, and the pass says so. It checks each tensor, as
# the masks leave it, where it first reads it (``raw``, the one read every reader goes through: the
# analysis's patterns and sums, the plan's kept rows, the rewrite's copies), not in a walk of its own over
# the model before tracing: that walk read every weight once more from memory, or from the files of a
# model on the meta device, while the read that follows it here finds the tensor in the cache. Every
# tensor the result holds is read by the rewrite, and every one the analysis relies on by the analysis;
# a tensor the pass never reads is one the result does not compute with. The check sums the tensor
# (a sum is finite when every entry is) and masks it only when that sum is not finite.

# NOTE [Weights from files]
# A model built on the meta device (``with torch.device("meta")`` or ``accelerate.init_empty_weights``)
# holds shapes, not values; its values lie in files (safetensors shards, read one tensor at a time by
# fxmin.shards.ShardedWeights). The pass reads every weight through its source anyway, so such a tensor
# is read from the files when a reader asks for it, and let go: the analysis, the rewrite (which copies
# what it keeps into the result) and the streamed verification never hold the model's weights at once.
# A tied tensor (one meta tensor under two names) is found under whichever name the files hold;
# buffers the files do not hold stay the model's own (accelerate keeps buffers real by default).
