"""A progress line for a pass: the phase running (trace, analysis, plan, rewrite, verify) and the time so far.

NOTE [Progress]
:func:`pass_progress` wraps :func:`fxmin.minimize`: it opens one tqdm bar for the call and makes it the
current one (a context variable, so nested or concurrent passes do not share it); each phase of the
engine is decorated with :func:`phase`, which names itself on the current bar, and the analysis ticks
it per node (:func:`tick`) so that the elapsed time moves during a long phase. Without a current bar
(a phase called on its own) they do nothing. The bar shows only after ``DELAY_S`` seconds, is off
when stderr is not a terminal or ``progress=False``, and is closed however the pass ends (an
exception, Ctrl-C).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys

from tqdm.auto import tqdm

from .errors import InputError

#: a pass shorter than this shows no bar
DELAY_S = 2.0

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("fxmin_progress", default=None)


def _enabled(progress: bool | None) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not isinstance(progress, bool):
        raise InputError(f"progress must be True, False or None (a bar when stderr is a terminal), got {progress!r}")
    return progress


def pass_progress(function):
    """Decorate a pass that takes a ``progress`` keyword (``None``: a bar when stderr is a terminal)."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        progress = signature.bind(*args, **kwargs).arguments.get("progress")
        bar = tqdm(desc="fxmin", unit=" steps", delay=DELAY_S, disable=not _enabled(progress), leave=False,
                   bar_format="fxmin {desc} [{elapsed}]")
        token = _CURRENT.set(bar)
        try:
            return function(*args, **kwargs)
        finally:
            _CURRENT.reset(token)
            bar.close()

    return wrapper


def phase(name: str):
    """Decorate one phase of the pass: it names itself on the current bar while it runs."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bar = _CURRENT.get()
            if bar is not None:
                bar.set_description_str(name, refresh=False)
                if not bar.disable and bar.format_dict["elapsed"] >= bar.delay:
                    bar.refresh()  # a new phase is shown at once, once the bar is (refresh ignores delay)
            return function(*args, **kwargs)

        return wrapper

    return decorate


def tick() -> None:
    """One step of work inside a phase: refreshes the elapsed time (tqdm rate-limits the redraw)."""
    bar = _CURRENT.get()
    if bar is not None:
        bar.update(1)
