"""Memory given back once the local store empties: glibc's `malloc_trim(0)`, scheduled off the
hot path.

CPython frees the many small objects of drained requests into glibc's heap, which keeps the
pages: after a burst to the store's limit is drained the daemon's RSS stayed ~98 MB above its
idle size with nothing held (issue 24; bench/trim.py measures it). `malloc_trim(0)` returns the
free pages to the kernel. It walks the heap, so it never runs inside a request: when a commit
finds the store empty, EmptyTrim schedules one trim with `loop.call_later`, at most one per
`min_interval_s`, and the trim is skipped if the store holds something again by then.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import platform
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("sidecar.local")

# How long the store must stay empty before the trim, and the least time between two trims.
TRIM_DELAY_S = 1.0
TRIM_MIN_INTERVAL_S = 30.0

Trim = Callable[[], object]
Schedule = Callable[[float, Callable[[], None]], asyncio.TimerHandle]


@functools.cache  # platform.libc_ver reads the interpreter's binary
def glibc_malloc_trim() -> Trim | None:
    """`malloc_trim(0)` of this process's C library when it is glibc; None elsewhere (musl,
    macOS), where there is nothing to call."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def _call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
    return asyncio.get_running_loop().call_later(delay, callback)


class EmptyTrim:
    """Schedules `trim` once the store it watches becomes empty (see the module's docstring).

    `held` is asked again when the trim is due; `schedule` and `monotonic` are seams for tests.
    """

    def __init__(
        self,
        trim: Trim | None,
        held: Callable[[], int],
        *,
        delay_s: float = TRIM_DELAY_S,
        min_interval_s: float = TRIM_MIN_INTERVAL_S,
        schedule: Schedule = _call_later,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trim = trim
        self._held = held
        self._delay_s = delay_s
        self._min_interval_s = min_interval_s
        self._schedule = schedule
        self._monotonic = monotonic
        self._handle: asyncio.TimerHandle | None = None
        self._last: float | None = None
        # Whether the store held something since the last trim: an idle store is not trimmed
        # again and again.
        self._dirty = False
        self.trims = 0

    def note(self, held: int) -> None:
        """After a change: how many requests the store holds now. Cheap: one comparison while
        the store holds something."""
        if held:
            self._dirty = True
            return
        if not self._dirty or self._handle is not None or self._trim is None:
            return
        delay = self._delay_s
        if self._last is not None:
            delay = max(delay, self._last + self._min_interval_s - self._monotonic())
        self._handle = self._schedule(delay, self._run)

    def _run(self) -> None:
        self._handle = None
        if self._held() or self._trim is None:
            return  # refilled meanwhile: its next emptying schedules again
        began = self._monotonic()
        self._trim()
        self._last = self._monotonic()
        self._dirty = False
        self.trims += 1
        log.info("memory_trimmed", seconds=round(self._last - began, 4))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
