"""The LoadGen system under test: batches of sample ids out to a backend, predictions back to LoadGen.

Threads: LoadGen's issue thread calls `issue` (splits a query into requests of `samples_per_request`
samples, sends each, waits for room in the window: `max_inflight` requests and, where the backend has a
queue bound, `max_inflight_pairs` pairs, so Offline's one huge query never overruns the daemon's
`max_queue_pairs` and comes back OVERLOADED); the completion thread polls the
backend and completes each reply's samples with one `QuerySamplesComplete` call. Memory stays bounded:
only the in-flight requests' id arrays are held (numpy, no per-sample Python objects beyond one batch).
The one per-sample Python step is building LoadGen's `QuerySampleResponse` (Python binding); with
`capi` (loadgen_driver/capi.py) the batch is completed by one C call and no per-sample object exists.
Its cost is measured either way (`SutStats.complete_seconds`).

Timeouts judge progress, not age: Offline issues every sample at once, so a request may wait long
behind others (or compute long, 550k pairs on a CPU engine) on a slow but healthy daemon. When no
reply has come for `reply_timeout_s` while requests are pending, the driver asks the backend whether
it is alive (`Backend.liveness`: the daemon's status): busy with queued or in-flight work means slow,
and the wait goes on; idle means the pending requests were lost, and they fail; no answer means the
daemon has stopped answering: the pending requests fail, and the samples LoadGen issues afterwards are
completed as failures without being sent (counted as `unsent_samples`). A failed request never stops
the others: each error is counted once, by samples.
"""
from __future__ import annotations

import logging
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlperf_loadgen as lg
import numpy as np

from formats.pairs import pair_index
from loadgen_driver.backend import Backend
from loadgen_driver.capi import CComplete

log = logging.getLogger("loadgen_driver")
MAX_LOGGED_ERRORS = 10


@dataclass
class SutStats:
    """What the run did, read by the summary and the progress line."""

    issued_samples: int = 0
    completed_samples: int = 0
    completed_pairs: int = 0
    requests: int = 0
    error_samples: int = 0  # samples completed without a prediction (failed or never sent)
    unsent_samples: int = 0  # of those, samples not sent because the daemon had stopped answering
    error_events: int = 0  # failed requests (and other errors), all counted
    errors: list[str] = field(default_factory=list)  # the first MAX_LOGGED_ERRORS messages
    warnings: list[str] = field(default_factory=list)  # problems that do not fail the run
    complete_seconds: float = 0.0  # building responses + QuerySamplesComplete, summed
    # seconds from each answered request's send to its reply's arrival (8 bytes a request): how much of
    # LoadGen's latency the daemon's path takes, against the driver's and LoadGen's own share
    round_trip_s: array = field(default_factory=lambda: array("d"))

    def complete_ns_per_sample(self) -> float:
        return 1e9 * self.complete_seconds / max(1, self.completed_samples)

    def requests_line(self) -> str:
        """Requests sent, their mean size and the round trip's percentiles (the summary's line)."""
        line = f"requests: {self.requests:,}, {self.issued_samples / max(1, self.requests):,.0f} samples each"
        if len(self.round_trip_s):
            p50, p99, top = np.percentile(np.frombuffer(self.round_trip_s, dtype=np.float64), [50, 99, 100]) * 1e3
            line += f"; round trip (send to reply) p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {top:.2f} ms"
        return line


def request_ends(num_samples: int, max_samples: int, counts: np.ndarray | None = None,
                 max_pairs: int = 0) -> list[int]:
    """Where a query's samples are cut into requests (each request's end index): runs of at most
    `max_samples` samples and, with `counts` (pairs per sample) and `max_pairs` > 0, at most `max_pairs`
    pairs, so no request passes the daemon's max_pairs_per_query. A sample larger than `max_pairs` goes
    alone (the daemon then refuses it with its own message)."""
    if num_samples <= 0:
        return []
    if counts is None or max_pairs <= 0:
        return [*range(max_samples, num_samples, max_samples), num_samples]
    cum = np.cumsum(counts, dtype=np.int64)
    ends: list[int] = []
    start = base = 0
    while start < num_samples:  # once per request, not per sample
        end = min(start + max_samples, num_samples)
        if cum[end - 1] - base > max_pairs:
            end = max(start + 1, int(np.searchsorted(cum, base + max_pairs, side="right")))
        ends.append(end)
        base, start = int(cum[end - 1]), end
    return ends


class InflightWindow:
    """Room for at most `max_requests` requests and, when `max_pairs` > 0, `max_pairs` pairs in flight.

    A request is let through whenever nothing is in flight, however many pairs it has: one larger than
    the pair bound would otherwise wait for ever (the daemon judges it by its own limits then).
    """

    def __init__(self, max_requests: int, max_pairs: int = 0) -> None:
        self.max_requests = max(1, max_requests)
        self.max_pairs = max(0, max_pairs)
        self.requests = 0
        self.pairs = 0
        self._cond = threading.Condition()

    def _fits(self, pairs: int) -> bool:
        if self.requests >= self.max_requests:
            return False
        return not (self.max_pairs and self.requests and self.pairs + pairs > self.max_pairs)

    def acquire(self, pairs: int, timeout_s: float) -> bool:
        """Take room for one request of `pairs` pairs; False when none came within `timeout_s`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._fits(pairs), timeout_s):
                return False
            self.requests += 1
            self.pairs += pairs
            return True

    def release(self, pairs: int) -> None:
        with self._cond:
            self.requests -= 1
            self.pairs -= pairs
            self._cond.notify_all()


class DriverSUT:
    """LoadGen SUT + QSL callbacks over a `Backend`.

    `sample_offsets` (int64 [S+1]) maps a sample to its pairs; None means replies carry no data (the
    null ceiling). With `labels`, each sample's response is float32 [prediction, label] per pair, the
    layout the MLCommons accuracy-dlrm.py script reads by default.
    """

    def __init__(
        self,
        backend: Backend,
        sample_offsets: np.ndarray | None,
        labels: np.ndarray | None = None,
        samples_per_request: int = 2048,
        max_inflight: int = 64,
        reply_timeout_s: float = 30.0,
        poll_ms: int = 50,
        capi: CComplete | None = None,
        max_inflight_pairs: int = 0,
        max_request_pairs: int = 0,
        completion_threads: int = 1,
    ) -> None:
        self.backend = backend
        self.offsets = None if sample_offsets is None else np.asarray(sample_offsets, dtype=np.int64)
        self.labels = labels
        self.samples_per_request = max(1, samples_per_request)
        self.max_request_pairs = max_request_pairs  # 0: requests bounded by samples only
        self.reply_timeout_s = reply_timeout_s
        self.poll_ms = poll_ms
        self.capi = capi  # None: one QuerySampleResponse object per sample (the Python binding)
        self.stats = SutStats()
        self.unreachable = threading.Event()  # no reply for reply_timeout_s: send nothing more
        # pairs are counted only where sample_offsets say how many a sample has
        self._window = InflightWindow(max_inflight, max_inflight_pairs if self.offsets is not None else 0)
        # Insertion order is send order: the first entry is the oldest request in flight.
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, float, int, np.ndarray | None]] = {}
        self._last_reply_at = time.monotonic()
        self._lock = threading.Lock()
        self._next_id = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._complete_loop, name="lg-complete", daemon=True)
        # With several completion threads, the replies of each poll are split among them: LoadGen's own
        # per-sample completion work (C++, run with the GIL released) then proceeds on several cores.
        self.completion_threads = max(1, completion_threads)
        self._helpers = (ThreadPoolExecutor(self.completion_threads - 1, thread_name_prefix="lg-complete")
                         if self.completion_threads > 1 else None)
        self._stats_lock = threading.Lock()

    # -- LoadGen callbacks ---------------------------------------------------------------------
    def issue_fast(self, response_ids: list[int], sample_indices: list[int]) -> None:
        """ConstructFastSUT's IssueQuery: parallel lists of LoadGen response ids and sample indices."""
        ids = np.array(response_ids, dtype=np.uint64)
        idx = np.array(sample_indices, dtype=np.int64)
        del response_ids, sample_indices  # the lists are LoadGen's; drop our reference early
        self.issue_arrays(ids, idx)

    def issue_arrays(self, ids: np.ndarray, idx: np.ndarray) -> None:
        """IssueQuery with numpy arrays (the C-API SUT of capi.py calls this directly, with views of
        LoadGen's memory that live only during the call: what is kept is copied here). Offline's one
        query of millions of samples is cut and sent a chunk at a time, so the first requests leave
        at once instead of after array passes over the whole query."""
        self.stats.issued_samples += len(ids)
        chunk = max(self.samples_per_request, 64 * self.samples_per_request)
        for a in range(0, len(ids), chunk):
            c_ids, c_idx = np.array(ids[a:a + chunk], np.uint64), np.array(idx[a:a + chunk], np.int64)
            counts = None if self.offsets is None else self.offsets[c_idx + 1] - self.offsets[c_idx]
            start = 0
            for end in request_ends(len(c_ids), self.samples_per_request, counts, self.max_request_pairs):
                self._send(c_ids[start:end], c_idx[start:end], None if counts is None else counts[start:end])
                start = end

    def issue(self, query_samples: list[Any]) -> None:
        """ConstructSUT's IssueQuery (QuerySample objects), for comparison with the fast path."""
        self.issue_fast([q.id for q in query_samples], [q.index for q in query_samples])

    def flush(self) -> None:
        pass

    def load_samples(self, sample_indices: list[int]) -> None:
        # An exception must not escape into LoadGen's C++ caller: record it, fail the run.
        try:
            self.backend.load_samples(np.array(sample_indices, dtype=np.int64))
        except Exception as exc:
            self._record(f"LoadSamples of {len(sample_indices)} samples failed: {exc}")

    def unload_samples(self, sample_indices: list[int]) -> None:
        # After the run: a failed unload leaves samples marked servable in the daemon, which harms no
        # result, so it is a warning, not a failed run.
        try:
            self.backend.unload_samples(np.array(sample_indices, dtype=np.int64))
        except Exception as exc:
            message = f"UnloadSamples of {len(sample_indices)} samples failed: {exc}"
            self.stats.warnings.append(message)
            log.warning("%s", message)

    # -- sending -------------------------------------------------------------------------------
    def _release(self, entry: tuple[np.ndarray, np.ndarray, float, int, np.ndarray | None]) -> None:
        self._window.release(entry[3])

    def _send(self, ids: np.ndarray, idx: np.ndarray, counts: np.ndarray | None) -> None:
        """`counts`: pairs per sample (None without sample offsets), kept for the completion."""
        pairs = 0 if counts is None else int(counts.sum())
        acquired = False
        while not self.unreachable.is_set():
            acquired = self._window.acquire(pairs, timeout_s=1.0)
            if acquired:
                break
        if self.unreachable.is_set():
            with self._stats_lock:
                self.stats.error_samples += len(ids)
                self.stats.unsent_samples += len(ids)
            self._complete_empty(ids)
            if acquired:
                self._window.release(pairs)
            return
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = (ids, idx, time.monotonic(), pairs, counts)
        self.stats.requests += 1
        try:
            self.backend.send(rid, idx)
        except Exception as exc:  # a send failure is an error of these samples, reported like any other
            with self._lock:
                entry = self._pending.pop(rid, None)
            if entry is not None:
                self._fail(entry, f"send failed: {type(exc).__name__}: {exc}")
                self._release(entry)

    # -- completing ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_timeout_s: float = 60.0) -> None:
        """Wait for every in-flight request (LoadGen has returned, so normally none), then stop."""
        deadline = time.monotonic() + drain_timeout_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(timeout=5.0)
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)

    def _complete_loop(self) -> None:
        while not self._stop.is_set():
            try:
                replies = self.backend.poll(self.poll_ms)
            except Exception as exc:
                self._fail_all(f"backend poll failed: {type(exc).__name__}: {exc}")
                time.sleep(0.1)
                continue
            if replies:
                self._last_reply_at = time.monotonic()
            if self._helpers is not None and len(replies) > 1:
                # A reply's predictions stay valid until the next poll: every share is answered first.
                k = min(self.completion_threads, len(replies))
                shares = [self._helpers.submit(self._answer, replies[i::k]) for i in range(1, k)]
                self._answer(replies[::k])
                for share in shares:
                    share.result()
            else:
                self._answer(replies)
            self._check_timeouts()

    def _answer(self, replies: list[Any]) -> None:
        for reply in replies:
            with self._lock:
                entry = self._pending.pop(reply.request_id, None)
            if entry is None:
                self._record(f"reply for unknown request {reply.request_id} ignored")
                continue
            # The daemon is done with these pairs: the window opens before LoadGen's completion call (a few
            # ms for a large request), so the issue side can send the next request meanwhile. The
            # predictions stay valid until the next poll (the backend frees their place only then).
            self._release(entry)
            self.stats.round_trip_s.append(time.monotonic() - entry[2])
            if reply.error is not None or reply.predictions is None:
                self._fail(entry, f"daemon error: {reply.error}")
            else:
                self._complete(entry, reply.predictions)

    def _complete(self, entry: tuple[np.ndarray, np.ndarray, float, int, np.ndarray | None], preds: np.ndarray) -> None:
        ids, idx = entry[0], entry[1]
        t0 = time.perf_counter()
        if self.offsets is None:
            self._complete_empty(ids)
            pairs = 0
        else:
            counts = entry[4] if entry[4] is not None else self.offsets[idx + 1] - self.offsets[idx]
            pairs = entry[3]
            preds = np.ascontiguousarray(preds, dtype=np.float32)
            if preds.shape != (pairs,):
                self._fail(entry, f"reply has {preds.size} predictions, expected {pairs}")
                return
            if self.labels is not None:
                buf = np.empty((pairs, 2), dtype=np.float32)
                buf[:, 0] = preds
                buf[:, 1] = self.labels[pair_index(self.offsets[idx], counts)]
                width = 8
            else:
                buf, width = preds, 4
            sizes = counts * width
            ptrs = buf.ctypes.data + (np.cumsum(sizes) - sizes)
            # buf stays referenced until LoadGen has copied what it logs (inside the call).
            if self.capi is not None:
                self.capi.complete(ids, ptrs, sizes)
            else:
                responses = [
                    lg.QuerySampleResponse(i, p, s)
                    for i, p, s in zip(ids.tolist(), ptrs.tolist(), sizes.tolist())
                ]
                lg.QuerySamplesComplete(responses)
            del buf
        with self._stats_lock:
            self.stats.complete_seconds += time.perf_counter() - t0
            self.stats.completed_samples += len(ids)
            self.stats.completed_pairs += pairs

    def _complete_empty(self, ids: np.ndarray) -> None:
        if self.capi is not None:
            self.capi.complete(ids, 0, 0)
        else:
            lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids.tolist()])

    def _record(self, message: str) -> None:
        with self._stats_lock:  # completion threads may record at once
            self.stats.error_events += 1
            events, logged = self.stats.error_events, len(self.stats.errors)
            if logged < MAX_LOGGED_ERRORS:
                self.stats.errors.append(message)
        # The first errors are logged with their sample ids; later ones only counted (a dead engine
        # would otherwise print one line per in-flight request).
        if logged < MAX_LOGGED_ERRORS:
            log.error("%s", message)
        elif events == MAX_LOGGED_ERRORS + 1:
            log.error("further errors are counted, not logged")

    def _fail(self, entry: tuple[np.ndarray, np.ndarray, float, int, np.ndarray | None], why: str) -> None:
        """Count and log the samples, then complete them without data so LoadGen can finish."""
        ids, idx = entry[0], entry[1]
        with self._stats_lock:
            self.stats.error_samples += len(ids)
        shown = ",".join(str(i) for i in idx[:16].tolist()) + (",..." if len(idx) > 16 else "")
        self._record(f"{why} ({len(idx)} samples; sample ids {shown})")
        self._complete_empty(ids)

    def _fail_all(self, why: str) -> None:
        with self._lock:
            entries = list(self._pending.values())
            self._pending.clear()
        for entry in entries:
            self._fail(entry, why)
            self._release(entry)

    def _check_timeouts(self) -> None:
        with self._lock:
            head = next(iter(self._pending.values()), None)
            waiting = len(self._pending)
        if head is None:
            return
        silent = time.monotonic() - max(self._last_reply_at, head[2])
        if silent <= self.reply_timeout_s:
            return
        live = self.backend.liveness(min(self.reply_timeout_s, 5.0))
        if live.reachable and live.busy:
            log.info("no reply for %.1f s, but the backend is working (%s): waiting on", silent, live.detail)
            self._last_reply_at = time.monotonic()
            return
        if live.reachable:
            why = f"the backend is idle ({live.detail}): {waiting} pending requests were lost"
        else:
            self.unreachable.set()
            why = (f"the backend does not answer ({live.detail}): {waiting} pending requests fail and later "
                   "samples are not sent")
        self._fail_all(f"no reply from the backend within {self.reply_timeout_s:g} s; {why}")
