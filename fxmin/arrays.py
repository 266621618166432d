"""Work on weights outside torch's tensors: where a tensor is nonzero, which columns of a table hold one
value (in numpy), and the analysis' float64 products (in torch).

NOTE [Bool work in numpy]
The pass asks a few bool questions of every weight and mask: where is it nonzero, which rows does a
mask keep or drop whole (NOTE [Masked loads] in fxmin/weights.py), which columns of a table hold one
value. On the CPU, torch's kernels that produce or reduce bool tensors (``!=``, ``.all()``,
``.any(dim)``, ``count_nonzero``) are several times slower than numpy's on the same memory
(docs/benchmarks.md, "Bool work on weights: torch against numpy"), and those questions
are most of what the analysis does with weights. So they are asked of numpy views of the tensors:
no copy, the same memory. numpy has no bfloat16, and its float16 compares are slow, so half-precision
tensors are read as their int16 bit patterns: a value is zero iff its bits other than the sign are
zero, and equal bits are equal values (the converse misses only ``-0 == +0``, which makes a caller keep
a column it could have dropped, never drop one it needs).

The float64 products of the analysis (what constant inputs add to a layer's outputs) run in torch
(:func:`product`), not numpy: numpy's go to OpenBLAS's own threads, which ignore
``torch.set_num_threads`` and keep spinning on other cores between the many small products (the same
section).
"""
from __future__ import annotations

import numpy as np
import torch

_BITS = {torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF)}


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of the CPU tensor ``tensor`` (no copy); float16 and bfloat16 as their int16 bit patterns."""
    tensor = tensor.detach()
    if tensor.dtype in _BITS:
        tensor = tensor.view(_BITS[tensor.dtype][0])
    return tensor.numpy()


#: elements of a half-precision tensor whose bits are tested at a time (their masked bits are a temporary)
_BLOCK = 1 << 22


def nonzero(tensor: torch.Tensor) -> np.ndarray:
    """bool numpy array of ``tensor``'s shape: where it is nonzero (NaN counts as nonzero)."""
    values = _host_array(tensor)
    if tensor.dtype not in _BITS:
        return values != 0
    flat = values.reshape(-1)
    found = np.empty(flat.shape, bool)
    for start in range(0, flat.size, _BLOCK):  # a block at a time: no temporary of the tensor's size
        np.not_equal(flat[start:start + _BLOCK] & _BITS[tensor.dtype][1], 0, out=found[start:start + _BLOCK])
    return found.reshape(values.shape)


def any_tap(pattern: np.ndarray) -> np.ndarray:
    """bool ``(out, in)`` of a bool ``(out, in, *taps)`` pattern: where any tap is True. One vectorized or
    per tap: numpy's ``any`` over short trailing axes reduces element by element."""
    flat = pattern.reshape(*pattern.shape[:2], -1)
    reads = flat[..., 0].copy()
    for tap in range(1, flat.shape[2]):
        reads |= flat[..., tap]
    return reads


def constant_columns(table: torch.Tensor) -> np.ndarray:
    """bool ``(columns,)`` of a 2-d ``table``: the columns where every row holds row 0's value (half precision
    compared bit for bit). Read a block of rows at a time, each block only in the columns still constant:
    a table with few constant columns is done after its first rows."""
    values = _host_array(table)
    candidates = np.arange(values.shape[1])
    for start in range(0, values.shape[0], _ROWS_PER_BLOCK):
        block = values[start:start + _ROWS_PER_BLOCK]
        if len(candidates) < values.shape[1]:
            block = block[:, candidates]
        candidates = candidates[(block == values[0, candidates]).all(axis=0)]
        if not len(candidates):
            break
    constant = np.zeros(values.shape[1], bool)
    constant[candidates] = True
    return constant


_ROWS_PER_BLOCK = 256


def product(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``matrix @ vector`` of float64 numpy arrays, computed by torch (under torch's thread settings)."""
    return (torch.from_numpy(np.ascontiguousarray(matrix)) @ torch.from_numpy(np.ascontiguousarray(vector))).numpy()
