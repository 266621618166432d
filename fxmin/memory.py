"""Freed memory given back to the system while the pass runs (a base module).

NOTE [Freed memory]
The pass reads one weight at a time and lets it go (NOTE [Weights on demand] in fxmin/weights.py),
so what it holds at any moment is the model, the part of the result built so far and one layer's
temporaries. But glibc's ``malloc`` returns the pages of a freed block to the system only when the
block was mapped on its own (at least ``M_MMAP_THRESHOLD`` bytes, a threshold glibc raises, up to
32 MiB, each time such a block is freed) or sits at the top of the heap. The pages of temporaries
freed between blocks the pass keeps (the sliced weights of the result) stay resident, and the next
layer's temporaries, of other sizes, need not fit in them: resident memory grows past what the pass
holds. ``malloc_trim(0)`` gives every whole free page inside the heap back (``madvise``; glibc 2.8 and
later). The pass calls it before it reads a tensor once it has read ``TRIM_BYTES`` since the last call
(:func:`before_read`): blocks above glibc's largest threshold are mapped on their own and go back when
freed, so what stays resident between calls is bounded by the temporaries of that much reading, and a
model of small layers is not walked over after each one. It calls it only when resident memory is
within that much (and the read to come) of its peak so far (``ru_maxrss``), and either has grown by that
much since the last trim (or since the pass began, :func:`new_baseline`) or the read to come allocates
that much (a tensor read from files). Every page given back costs a page fault again when the next
temporaries take it: free pages that a pass reuses without growing (what the process freed before the
pass, the last layer's temporaries) are worth keeping; growth says that the freed pages no longer fit what
comes next, and a tensor that large is mapped on its own, beside the free pages, which cannot take it. Below the peak, the pages kept cannot raise it before the
next check (a pass in a process that held more before, the second cycle of a loop, runs without
trimming). The streamed verification calls it before each block of a weight it casts to float64. It is
nothing at all where the C library is not glibc. It changes no allocation policy of the process, unlike
``mallopt(M_MMAP_THRESHOLD, ...)``, which would stay set for the user's program after the pass.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

try:
    import resource
except ImportError:  # not a Unix system: no ru_maxrss, and no glibc to trim
    resource = None

#: bytes read between two calls of :func:`release_freed` (glibc's largest ``M_MMAP_THRESHOLD``)
TRIM_BYTES = 32 << 20
_read_since_trim = 0


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim (musl)
        return None


_MALLOC_TRIM = _malloc_trim()


_floor: int | None = None  # the least resident memory seen by a check since the last trim


def release_freed() -> None:
    """Give the whole free pages of the C heap back to the system (NOTE [Freed memory]); a no-op
    where the C library has no ``malloc_trim``."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
        new_baseline()


def new_baseline() -> None:
    """Measure the growth that makes :func:`before_read` trim from the resident memory now (the start of a
    pass): what the process left free before it, the pass may reuse without giving it back first."""
    global _floor
    _floor = resident_bytes()[0]


def before_read(nbytes: int, *, allocates: bool = False) -> None:
    """Call before reading ``nbytes`` of a tensor (``allocates``: the read makes a new tensor of that size, as
    one from files does): once ``TRIM_BYTES`` have been read since the last check (this read included),
    :func:`release_freed` if resident memory is near its peak and has grown by that much since the last
    trim, or the read allocates that much (NOTE [Freed memory])."""
    global _read_since_trim, _floor
    _read_since_trim += nbytes
    if _read_since_trim < TRIM_BYTES:
        return
    _read_since_trim = 0
    resident, peak = resident_bytes()
    if resident is None:
        release_freed()
        return
    _floor = resident if _floor is None else min(_floor, resident)
    large = allocates and nbytes >= TRIM_BYTES
    if (resident >= _floor + TRIM_BYTES or large) and resident + TRIM_BYTES + nbytes >= peak:
        release_freed()


def resident_bytes() -> tuple[int | None, int | None]:
    """(resident memory of the process now, its peak so far) in bytes, or (None, None) where the system
    does not say (Linux's ``/proc/self/statm`` and ``ru_maxrss``)."""
    if resource is None:
        return None, None
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None, None
    return pages * _PAGE_BYTES, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
