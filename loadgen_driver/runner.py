"""One LoadGen test: QSL + SUT over a backend, logs into an output directory."""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlperf_loadgen as lg
import numpy as np

from loadgen_driver import capi, issue_ring
from loadgen_driver.backend import Backend
from loadgen_driver.sut import DriverSUT, SutStats

log = logging.getLogger("loadgen_driver")


@dataclass
class RunResult:
    stats: SutStats
    wall_s: float
    output_dir: Path
    completion: str  # "capi" (one C call per batch) or "python" (QuerySampleResponse per sample)
    issue: str  # "ring" (C IssueQuery, issue_ring.c), "capi" (C-API SUT, numpy ids), "fast", "slow"


class Progress:
    """A live line on stderr: completed samples, current rate, errors. Off when not a tty or quiet."""

    def __init__(self, stats: SutStats, enabled: bool, interval_s: float = 1.0) -> None:
        self.stats = stats
        self.enabled = enabled
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lg-progress", daemon=True)

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\n")

    def _loop(self) -> None:
        last_n, last_t = 0, time.monotonic()
        while not self._stop.wait(self.interval_s):
            n, t = self.stats.completed_samples, time.monotonic()
            rate = (n - last_n) / max(t - last_t, 1e-9)
            last_n, last_t = n, t
            sys.stderr.write(
                f"\r[loadgen_driver] {n:,} samples done, {rate:,.0f} samples/s, "
                f"errors {self.stats.error_samples:,}   "
            )
            sys.stderr.flush()


_tests_started = 0  # LoadGen tests run by this process (see issue_threads)


def run_test(
    backend: Backend,
    settings: lg.TestSettings,
    num_samples: int,
    output_dir: Path,
    sample_offsets: np.ndarray | None,
    labels: np.ndarray | None = None,
    samples_per_request: int = 2048,
    max_inflight: int = 64,
    reply_timeout_s: float = 30.0,
    issue: str = "capi",
    progress: bool = False,
    completion: str = "capi",
    max_inflight_pairs: int | None = None,
    issue_threads: int = 0,
    completion_threads: int = 1,
) -> RunResult:
    """Run LoadGen to the end; the SUT has completed every sample (with data or as an error).

    `max_inflight_pairs` None keeps the pairs in flight within the backend's queue bound (none if it
    has none); 0 bounds requests only. `issue_threads` (Server with the ring): LoadGen issues its queries
    on that many C threads of the ring's (settings.server_num_issue_query_threads is set to match)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    pair_bound = backend.limits.queue_pairs if max_inflight_pairs is None else max_inflight_pairs
    sut = DriverSUT(backend, sample_offsets, labels, samples_per_request, max_inflight, reply_timeout_s,
                    capi=capi.load() if completion == "capi" else None, max_inflight_pairs=pair_bound,
                    max_request_pairs=backend.limits.query_pairs, completion_threads=completion_threads)
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(output_dir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False
    perf_count = settings.performance_sample_count_override or num_samples
    qsl = lg.ConstructQSL(num_samples, min(perf_count, num_samples), sut.load_samples, sut.unload_samples)
    c_sut: capi.CSut | issue_ring.RingSut | None = None
    used = issue
    global _tests_started
    if issue_threads and _tests_started:
        # LoadGen's issue-thread controller is a process-wide singleton that ends its threads for good at
        # the end of a test: registered in a later test, they would leave it waiting for ever.
        log.warning("LoadGen issue threads serve only the first test of a process; this run issues on "
                    "LoadGen's own thread")
        issue_threads = 0
    _tests_started += 1
    if issue == "ring":  # IssueQuery in C, drained by a Python thread (issue_ring.py)
        server = settings.scenario == lg.TestScenario.Server
        ring = issue_ring.construct_ring_sut(sut.issue_arrays, issue_threads if server else 0)
        if ring is None:
            issue = "capi"
        else:
            c_sut = ring
            settings.server_num_issue_query_threads = ring.issue_threads
            if ring.issue_threads:
                used = f"ring, {ring.issue_threads} LoadGen issue threads"
    if issue == "capi":
        c_sut = capi.construct_sut(sut.issue_arrays, sut.flush)
        used = "capi" if c_sut is not None else "fast"
    if c_sut is not None:
        handle = c_sut.handle
    elif issue == "slow":
        handle = lg.ConstructSUT(sut.issue, sut.flush)
    else:
        handle = lg.ConstructFastSUT(sut.issue_fast, sut.flush)
    sut.start()
    t0 = time.monotonic()
    try:
        with Progress(sut.stats, progress):
            lg.StartTestWithLogSettings(handle, qsl, settings, log_settings)
    finally:
        wall = time.monotonic() - t0
        sut.stop()
        if c_sut is not None:
            c_sut.destroy()
        else:
            (lg.DestroySUT if issue == "slow" else lg.DestroyFastSUT)(handle)
        lg.DestroyQSL(qsl)
    return RunResult(sut.stats, wall, output_dir, "capi" if sut.capi is not None else "python", used)
