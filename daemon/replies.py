"""Replies to clients on the dispatcher's ROUTER socket, and the counts every reply feeds.

Every answer leaves through `ReplySender`: results (one query, or several of one client finished by
the same batch in one InferResults message), acks, status, and errors. Each Error reply is counted once
(totals by code, the last 20 messages for `status`, dlrm_errors_total).

Memory per client is bounded. ZeroMQ holds at most PIPE_HWM replies for a client (ROUTER_MANDATORY: a
full pipe makes the send say EAGAIN instead of queueing without end); the replies after that wait in the
client's own backlog here, in order, and are pushed on at every I/O pass and tick. A client whose backlog
passes `max_client_backlog_bytes` (it stopped reading) gets CLIENT_NOT_READING errors instead of its
further results, and its new requests are refused with it; error replies past twice the bound are
dropped and counted (dlrm_dropped_queries_total{reason="client_not_reading"}). A disconnect frees it all.
"""
from __future__ import annotations

import collections
import errno
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from daemon.batcher import Query
from daemon.metrics import DaemonMetrics
from wire import messages as M
from wire.errors import ErrorCode

log = logging.getLogger("dlrm.dispatcher")
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_ZERO_COPY_MIN = 1 << 16
# Replies ZeroMQ queues per client (the ROUTER's SNDHWM): with the kernel's socket buffers, enough
# for a reader that keeps up; the rest wait in the backlog, which is bounded in bytes.
PIPE_HWM = 16


@dataclass
class _Backlog:
    """Replies of one client that ZeroMQ would not take yet: (header, private frame or None, bytes)."""

    items: collections.deque[tuple[bytes, np.ndarray | None, int]] = field(default_factory=collections.deque)
    nbytes: int = 0


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
    def __init__(self, router: zmq.Socket[Any], metrics: DaemonMetrics | None, totals: Totals,
                 max_backlog_bytes: int = 128 << 20) -> None:
        """`router` must have ROUTER_MANDATORY set (ClientSocket does): a full pipe raises EAGAIN."""
        self.router = router
        self.metrics = metrics
        self.totals = totals
        self.max_backlog_bytes = max_backlog_bytes
        self._backlogs: dict[bytes, _Backlog] = {}

    def send(self, client: bytes, msg: Any, frame: np.ndarray | None = None, owned: bool = False) -> None:
        header = M.encode(msg)
        if client in self._backlogs:  # keep the client's order: behind what already waits
            self._enqueue(client, header, frame, owned)
            return
        if not self._push(client, header, frame, owned):
            self._enqueue(client, header, frame, owned)

    def _push(self, client: bytes, header: bytes, frame: np.ndarray | None, owned: bool) -> bool:
        """Hand one reply to ZeroMQ; False when the client's pipe is full (nothing was sent). A client
        that is gone counts as sent (its reply is dropped, counted)."""
        # Plain int flags: pyzmq's enum arithmetic costs more than the send on this path.
        send = self.router.send
        try:
            send(client, _SNDMORE | _NOBLOCK)  # ROUTER_MANDATORY: EAGAIN here if its pipe is full
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            self._unreachable(client, exc)
            return True
        if frame is None:
            send(header)
        elif frame.nbytes < _ZERO_COPY_MIN:
            send(header, _SNDMORE)
            send(frame.data, 0)
        else:
            send(header, _SNDMORE)
            # A slot is reused at once, so hand ZeroMQ a private copy without copying again
            # (pyzmq's copy=True path is several times slower than np.copy here).
            send((frame if owned else frame.copy()).data, 0, copy=False)
        return True

    # ---- the per-client backlog ----
    def _enqueue(self, client: bytes, header: bytes, frame: np.ndarray | None, owned: bool) -> None:
        bl = self._backlogs.setdefault(client, _Backlog())
        nbytes = len(header) + (0 if frame is None else frame.nbytes)
        if bl.nbytes + nbytes > 2 * self.max_backlog_bytes:  # only errors get here (results are replaced)
            self.totals.counts["replies_dropped_not_reading"] += 1
            if self.metrics is not None:
                self.metrics.queries_dropped("client_not_reading", 1)
            return
        private = None if frame is None else (frame if owned else frame.copy())
        bl.items.append((header, private, nbytes))
        bl.nbytes += nbytes

    def backlog_bytes(self, client: bytes) -> int:
        bl = self._backlogs.get(client)
        return 0 if bl is None else bl.nbytes

    def not_reading(self, client: bytes, more_bytes: int = 0) -> bool:
        """The client's unread replies (with `more_bytes` more) pass max_client_backlog_bytes."""
        bl = self._backlogs.get(client)
        return bl is not None and bl.nbytes + more_bytes > self.max_backlog_bytes

    def flush(self) -> None:
        """Push each backlog on until ZeroMQ's pipe for that client is full again (every I/O pass)."""
        if not self._backlogs:
            return
        for client, bl in list(self._backlogs.items()):
            while bl.items:
                header, frame, nbytes = bl.items[0]
                if not self._push(client, header, frame, owned=True):  # backlog frames are private
                    break
                if client not in self._backlogs:  # gone while sending: _unreachable dropped the rest
                    break
                bl.items.popleft()
                bl.nbytes -= nbytes
            else:
                del self._backlogs[client]

    def forget(self, clients: set[bytes]) -> None:
        """Disconnected clients: their unread replies go."""
        for c in clients:
            self._backlogs.pop(c, None)

    def _unreachable(self, client: bytes, exc: zmq.ZMQError) -> None:
        # EHOSTUNREACH: the client is gone (ROUTER_MANDATORY says so instead of dropping silently).
        self._backlogs.pop(client, None)
        self.totals.counts["replies_to_gone_clients"] += 1
        if exc.errno != errno.EHOSTUNREACH:
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

    def _refuse_unread(self, qs: list[Query], nbytes: int) -> bool:
        """Past the backlog bound: answer CLIENT_NOT_READING instead of the results (True if so)."""
        client = qs[0].client
        if not self.not_reading(client, nbytes):
            return False
        for q in qs:
            self.error(client, q.request_id, ErrorCode.CLIENT_NOT_READING,
                       f"more than max_client_backlog_bytes={self.max_backlog_bytes} of replies to this "
                       f"client are unread ({self.backlog_bytes(client)} bytes): read replies as they come", q=q)
            q.frames = q.dense = q.sparse = q.result = None
        return True

    def result(self, q: Query, preds: np.ndarray, now: float, model: str = "") -> None:
        """`model`: the id of the model that computed `preds` (named in the reply)."""
        if q.client in self._backlogs and self._refuse_unread([q], preds.nbytes):
            return
        self.send(q.client, M.InferResult(request_id=q.request_id, num_pairs=q.num_pairs, model=model), preds,
                  owned=preds is q.result)
        self._count([q], now)

    def results(self, client: bytes, items: list[tuple[Query, np.ndarray, int]], preds: np.ndarray,
                now: float, model: str = "") -> None:
        """One InferResults message for several queries of one client finished by the same batch."""
        qs = [it[0] for it in items]
        if client in self._backlogs and self._refuse_unread(qs, 4 * sum(q.num_pairs for q in qs)):
            return
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
                                         num_pairs=[q.num_pairs for q in qs], model=model), frame, owned=not adjacent)
        self._count(qs, now)

    def written(self, client: bytes, qs: list[Query], now: float, model: str = "") -> None:
        """One InferWritten message for queries of one client whose predictions are in its output region."""
        self.send(client, M.InferWritten(request_ids=[q.request_id for q in qs], num_pairs=[q.num_pairs for q in qs],
                                         model=model))
        self.totals.counts["queries_written_to_regions"] += len(qs)
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
