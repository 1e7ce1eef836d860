"""Give freed heap back to the OS after bursts (glibc `malloc_trim`), at most once a minute, only when
the dispatcher has a momentary idle (nothing queued, nothing in flight).

Why: the dispatcher raises glibc's trim threshold so that MB-sized reply buffers are reused instead of
page-faulted afresh (`dispatcher._keep_large_allocations`), and ZeroMQ's I/O thread allocates from its
own arena. After a burst (a client flooding requests, then vanishing) the freed memory stays resident:
in a test, 8 floods took the dispatcher from 120 MB to 275 MB, and one `malloc_trim(0)` brought it to
81 MB; Python's own allocations stayed at 16-18 MB throughout (tracemalloc). That is retention, not a
leak, but it looks like one to an operator and to a memory limit. docs/RELIABILITY.md has the figures.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Callable

log = logging.getLogger("dlrm.memory")


def _libc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class IdleTrimmer:
    """`min_interval_s` (config key malloc_trim_interval_s, default 60; 0 turns it off)."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self._trim = _libc_trim() if min_interval_s > 0 else None
        self._last = time.monotonic()
        self.trims = 0
        self.last_trim_s = 0.0

    def tick(self, now: float, idle: bool) -> None:
        """Call from a periodic timer; `idle` = nothing queued and no batch in flight right now."""
        if self._trim is None or not idle or now - self._last < self.min_interval_s:
            return
        t0 = time.perf_counter()
        self._trim(0)
        self.last_trim_s = time.perf_counter() - t0
        self._last = now
        self.trims += 1
        log.debug("malloc_trim took %.1f ms", self.last_trim_s * 1e3)
