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
later). The pass calls it before it reads a large tensor: cheap when nothing is free (a walk over the
free lists), and nothing at all where the C library is not glibc. It changes no allocation policy of
the process, unlike ``mallopt(M_MMAP_THRESHOLD, ...)``, which would stay set for the user's program
after the pass.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: tensors of at least this many bytes are read after :func:`release_freed`
LARGE_BYTES = 1 << 20


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no C library by that name, or one without malloc_trim (musl)
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed() -> None:
    """Give the whole free pages of the C heap back to the system (NOTE [Freed memory]); a no-op
    where the C library has no ``malloc_trim``."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
