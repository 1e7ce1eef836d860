"""Replies to clients on the dispatcher's ROUTER socket, and the counts every reply feeds.

Every answer leaves through `ReplySender`: results (one query, or several of one client finished by
the same batch in one InferResults message), acks, status, and errors. Each Error reply is counted once
(totals by code, the last 20 messages for `status`, dlrm_errors_total).
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any

import numpy as np
import zmq

from daemon.batcher import Query
from daemon.metrics import DaemonMetrics
from wire import messages as M
from wire.errors import ErrorCode

log = logging.getLogger("dlrm.dispatcher")
_SNDMORE = int(zmq.SNDMORE)
_ZERO_COPY_MIN = 1 << 16


class Totals:
    """Counts since start (by outcome and error code) and the rate marks `status` computes rates from."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.recent_errors: collections.deque[str] = collections.deque(maxlen=20)
        self.rate_marks: collections.deque[tuple[float, int, int, int, int]] = collections.deque(maxlen=11)

    def mark(self, now: float) -> None:
        """Once a second: the counts that rates over the last ten seconds are taken against."""
        if not self.rate_marks or now - self.rate_marks[-1][0] >= 1.0:
            c = self.counts
            self.rate_marks.append((now, c["queries"], c["samples"], c["pairs"], c["batches"]))

    def rates(self, now: float) -> dict[str, float]:
        if not self.rate_marks:
            return {}
        t0, q0, s0, p0, b0 = self.rate_marks[0]
        dt = max(1e-9, now - t0)
        c = self.counts
        return {"queries_per_s": (c["queries"] - q0) / dt, "samples_per_s": (c["samples"] - s0) / dt,
                "pairs_per_s": (c["pairs"] - p0) / dt, "batches_per_s": (c["batches"] - b0) / dt}


class ReplySender:
    def __init__(self, router: zmq.Socket[Any], metrics: DaemonMetrics | None, totals: Totals) -> None:
        self.router = router
        self.metrics = metrics
        self.totals = totals

    def send(self, client: bytes, msg: Any, frame: np.ndarray | None = None, owned: bool = False) -> None:
        # Plain int flags: pyzmq's enum arithmetic costs more than the send on this path.
        send = self.router.send
        try:
            send(client, _SNDMORE)
            if frame is None:
                send(M.encode(msg))
            else:
                send(M.encode(msg), _SNDMORE)
                if frame.nbytes < _ZERO_COPY_MIN:
                    send(frame.data, 0)
                else:
                    # A slot is reused at once, so hand ZeroMQ a private copy without copying again
                    # (pyzmq's copy=True path is several times slower than np.copy here).
                    send((frame.copy() if not owned else frame).data, 0, copy=False)
        except zmq.ZMQError as exc:
            log.warning("reply to a client failed: %s", exc)

    def error(self, client: bytes, request_id: int, code: ErrorCode, message: str, kind: str | None = None,
              q: Query | None = None) -> None:
        self.send(client, M.Error(request_id=request_id, code=code, message=message))
        self.totals.counts[code] += 1
        self.totals.recent_errors.append(f"{time.strftime('%H:%M:%S')} {code} request {request_id}: {message}")
        if self.metrics is not None:
            self.metrics.observe_error(code)
            if q is not None:
                self.metrics.observe_query(q.kind, code, q.num_samples, q.num_pairs, time.monotonic() - q.arrival)
            elif kind is not None:
                self.metrics.observe_query(kind, code, 0, 0, 0.0)

    def ack(self, client: bytes, request_id: int) -> None:
        self.send(client, M.Ack(request_id=request_id))

    def result(self, q: Query, preds: np.ndarray, now: float) -> None:
        self.send(q.client, M.InferResult(request_id=q.request_id, num_pairs=q.num_pairs), preds,
                  owned=preds is q.result)
        self._count([q], now)

    def results(self, client: bytes, items: list[tuple[Query, np.ndarray, int]], preds: np.ndarray,
                now: float) -> None:
        """One InferResults message for several queries of one client finished by the same batch."""
        qs = [it[0] for it in items]
        adjacent = items[0][2] >= 0
        end = items[0][2]
        for q, _, pos in items:  # per query, not per pair
            if pos != end:
                adjacent = False
                break
            end = pos + q.num_pairs
        if adjacent:
            frame: np.ndarray = preds[items[0][2]:end]  # adjacent in the slot: no gather
        else:
            frame = np.concatenate([it[1] for it in items])
        self.send(client, M.InferResults(request_ids=[q.request_id for q in qs],
                                         num_pairs=[q.num_pairs for q in qs]), frame, owned=not adjacent)
        self._count(qs, now)

    def _count(self, qs: list[Query], now: float) -> None:
        c = self.totals.counts
        c["queries"] += len(qs)
        for q in qs:
            c["samples"] += q.num_samples
            c["pairs"] += q.num_pairs
            q.frames = q.dense = q.sparse = q.result = None
            if self.metrics is not None:
                self.metrics.observe_query(q.kind, "ok", q.num_samples, q.num_pairs, now - q.arrival)
