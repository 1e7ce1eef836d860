"""`--issue ring`: LoadGen's IssueQuery in C (issue_ring.c), drained by a Python thread in batches.

The C file is compiled at first use with the system C compiler (`cc`, which Triton needs on a GPU host
anyway) into a per-user cache, keyed by the source's hash, and loaded with ctypes. The SUT is LoadGen's C
`ConstructSUT` (found as in capi.py) with the C callbacks: LoadGen's issue thread never takes the GIL.
A pump thread calls `ring_take` (GIL released while it waits) and hands each batch of (response ids, sample
indices) to the driver's `issue_arrays`, which splits it into requests. Where there is no compiler or no
C API, `construct_ring_sut` returns None and the driver issues as before.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from loadgen_driver.capi import C_CONSTRUCT_SUT, C_DESTROY_SUT, C_REGISTER_ISSUE_THREAD, _addresses

log = logging.getLogger("loadgen_driver")
SOURCE = Path(__file__).with_name("issue_ring.c")
_ONE_RING = threading.Lock()  # the C ring is one per process


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dlrm-daemon"


def build(out_dir: Path | None = None) -> Path | None:
    """The compiled ring library (built now if absent); None, with the reason logged, where it cannot be."""
    try:
        src = SOURCE.read_bytes()
    except OSError as exc:
        log.warning("the issue ring's source is missing (%s); issuing through LoadGen's C API from Python", exc)
        return None
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"issue_ring-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler for the issue ring; issuing through LoadGen's C API from Python")
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE)], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, lib)  # atomic: a concurrent build leaves one whole library
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("building the issue ring failed (%s %s); issuing through LoadGen's C API from Python", exc,
                    detail.decode(errors="replace")[-300:])
        return None
    return lib


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.ring_open.argtypes, lib.ring_open.restype = [ctypes.c_size_t], ctypes.c_int
    lib.ring_take.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.ring_take.restype = ctypes.c_long
    lib.ring_issue.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
    lib.ring_issue.restype = None
    lib.ring_close.argtypes, lib.ring_close.restype = [], None
    lib.ring_counts.argtypes, lib.ring_counts.restype = [ctypes.c_void_p], None
    lib.ring_start_issue_threads.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.ring_start_issue_threads.restype = ctypes.c_int
    lib.ring_join_issue_threads.argtypes, lib.ring_join_issue_threads.restype = [ctypes.c_int], ctypes.c_int
    return lib


class IssuePump:
    """Drains the ring into `issue(ids uint64, indices int64)` on a thread of its own, `batch` at most."""

    def __init__(self, lib: ctypes.CDLL, issue: Callable[[np.ndarray, np.ndarray], None],
                 capacity: int = 1 << 22, batch: int = 1 << 20, interval_s: float = 0.0005) -> None:
        if not _ONE_RING.acquire(blocking=False):
            raise RuntimeError("one issue ring per process")
        if lib.ring_open(capacity) != 0:
            _ONE_RING.release()
            raise MemoryError(f"issue ring of {capacity} samples")
        self.lib = lib
        self._issue = issue
        self._ids = np.empty(batch, dtype=np.uint64)
        self._idx = np.empty(batch, dtype=np.int64)
        self.batches = 0
        self.interval_s = interval_s
        self._thread = threading.Thread(target=self._pump, name="lg-issue-ring", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        ids_p, idx_p, cap = self._ids.ctypes.data, self._idx.ctypes.data, len(self._ids)
        while True:
            t0 = time.monotonic()
            n = self.lib.ring_take(ids_p, idx_p, cap, 100)
            if n < 0:
                return
            if n:
                self.batches += 1
                try:
                    self._issue(self._ids[:n].copy(), self._idx[:n].copy())
                except Exception:  # the driver's issue records its own failures; this must not stop the pump
                    log.exception("issuing %d samples failed", n)
                # Let samples gather for at least `interval_s` per take: at millions of samples/s a take
                # per few hundred samples would be a request (and a dispatcher message) each.
                rest = self.interval_s - (time.monotonic() - t0)
                if rest > 0:
                    time.sleep(rest)

    def counts(self) -> tuple[int, int]:
        """(samples LoadGen issued into the ring, its IssueQuery calls)."""
        out = np.zeros(2, dtype=np.uint64)
        self.lib.ring_counts(out.ctypes.data)
        return int(out[0]), int(out[1])

    def close(self) -> None:
        """After the run: the pump hands over what is left, then stops."""
        self.lib.ring_close()
        self._thread.join()
        _ONE_RING.release()


class RingSut:
    """LoadGen's C ConstructSUT with the ring's C callbacks; `handle` goes to StartTestWithLogSettings.

    With `issue_threads` > 0 (and the C entry point found), that many C threads register themselves as
    LoadGen's issue threads: the run's TestSettings must then say `server_num_issue_query_threads` =
    `self.issue_threads` (Server only; LoadGen ignores them in the other scenarios, and they end with
    the test either way)."""

    def __init__(self, lib: ctypes.CDLL, issue: Callable[[np.ndarray, np.ndarray], None],
                 addrs: dict[bytes, int], issue_threads: int = 0) -> None:
        self.pump = IssuePump(lib, issue)
        self.lib = lib
        construct = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t,
                                     ctypes.c_void_p, ctypes.c_void_p)(addrs[C_CONSTRUCT_SUT])
        self._destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addrs[C_DESTROY_SUT])
        name = b"dlrm-daemon-loadgen-driver"
        issue_fn = ctypes.cast(lib.ring_issue, ctypes.c_void_p).value
        flush_fn = ctypes.cast(lib.ring_flush, ctypes.c_void_p).value
        self.handle = int(construct(0, name, len(name), issue_fn, flush_fn))
        self.issue_threads = 0
        register = addrs.get(C_REGISTER_ISSUE_THREAD)
        if issue_threads > 0 and register is not None:
            if lib.ring_start_issue_threads(issue_threads, register) == 0:
                self.issue_threads = issue_threads
            else:
                log.warning("could not start %d LoadGen issue threads; LoadGen issues on its own thread",
                            issue_threads)

    def destroy(self) -> None:
        if self.issue_threads:
            left = self.lib.ring_join_issue_threads(5000)
            if left:
                log.warning("%d LoadGen issue threads did not end with the test", left)
        self.pump.close()
        self._destroy(self.handle)


def construct_ring_sut(issue: Callable[[np.ndarray, np.ndarray], None], issue_threads: int = 0) -> RingSut | None:
    """A SUT whose IssueQuery is C, or None (no compiler, no LoadGen C API: reason logged); with
    `issue_threads`, LoadGen's issue threads too (see RingSut)."""
    path = build()
    if path is None:
        return None
    try:
        addrs = _addresses([C_CONSTRUCT_SUT, C_DESTROY_SUT])
        extra = _addresses([C_REGISTER_ISSUE_THREAD]) if issue_threads > 0 else None
    except (OSError, AttributeError, ValueError) as exc:
        log.info("LoadGen C API unavailable (%s)", exc)
        return None
    if addrs is None:
        return None
    if extra is not None:
        addrs.update(extra)
    elif issue_threads > 0:
        log.warning("LoadGen's RegisterIssueQueryThread not found; LoadGen issues on its own thread")
    return RingSut(load(path), issue, addrs, issue_threads)
