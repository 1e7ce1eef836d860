"""Batching, as pure logic (no sockets, no clock of its own): unit-testable.

Queries wait in one FIFO bounded in pairs. A batch holds pairs of one key (a dataset by reference,
or "by value"), at most `max_batch_pairs`; a query larger than that is cut into pieces over several
batches and reassembled. The dispatcher asks `should_close(now, engine_idle)` whenever an engine slot
is free: a batch closes when it is full, when the engine is idle (close early rather than keep it
waiting), or when the oldest query has waited `max_queue_delay_s`. Queries whose deadline passes
while queued are handed back by `expire` (TIMEOUT); all array work is numpy, never per pair.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wire.errors import Overloaded
from wire.shm import SlotViews

BY_VALUE_KEY = ""
_NOTHING = np.empty(0, np.float32)


@dataclass(eq=False)
class Query:
    client: bytes
    request_id: int
    key: str  # dataset name (by reference) or BY_VALUE_KEY
    num_samples: int
    num_pairs: int
    arrival: float
    deadline: float | None = None  # absolute, same clock as `arrival`
    latency_budget_s: float | None = None  # what admission holds it to (daemon/admission.py); None: nothing
    starts: np.ndarray | None = None  # by reference: int64 pair range per sample, request order
    counts: np.ndarray | None = None
    dense: np.ndarray | None = None  # by value
    sparse: np.ndarray | None = None
    frames: Any = None  # keeps received zero-copy frames alive while their arrays are in use
    cursor: int = 0  # pairs handed to batches
    done_pairs: int = 0
    pieces_out: int = 0
    result: np.ndarray | None = None  # only for queries split over several batches
    finished: bool = False  # replied (result or error)
    model: str = ""  # the model that computes its first piece: its other pieces go to the same model
    output: str = ""  # an output region's path: engines write the predictions there (no reply bytes)
    output_offset: int = 0  # the element of that region where the query's first prediction goes
    _cum: np.ndarray | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "by_value" if self.key == BY_VALUE_KEY else "by_ref"

    def value_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """By value: (dense, sparse)."""
        assert self.dense is not None and self.sparse is not None
        return self.dense, self.sparse

    def ranges(self, off: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The pair ranges covering pairs [off, off+n) of this query (cut ranges at both ends)."""
        assert self.starts is not None and self.counts is not None
        if off == 0 and n == self.num_pairs:
            return self.starts, self.counts
        if self._cum is None:
            self._cum = np.cumsum(self.counts)
        cum = self._cum
        i0 = int(np.searchsorted(cum, off, side="right"))
        i1 = int(np.searchsorted(cum, off + n, side="left"))
        s = self.starts[i0:i1 + 1].copy()
        c = self.counts[i0:i1 + 1].copy()
        skip = off - int(cum[i0] - self.counts[i0])
        s[0] += skip
        c[0] -= skip
        c[-1] -= int(cum[i1]) - (off + n)
        return s, c


@dataclass(eq=False)
class Batch:
    batch_id: int
    key: str
    pieces: list[tuple[Query, int, int]]  # (query, pair offset in query, pairs)
    num_pairs: int
    oldest_arrival: float
    closed_at: float
    attempts: int = 1

    @property
    def kind(self) -> str:
        return "by_value" if self.key == BY_VALUE_KEY else "by_ref"


def fill_slot(batch: Batch, slot: SlotViews) -> int:
    """Write the batch's inputs into a slot; returns the number of ranges (0 by value)."""
    n = batch.num_pairs
    if batch.key == BY_VALUE_KEY:
        np.concatenate([q.value_rows()[0][o:o + k] for q, o, k in batch.pieces], out=slot.dense[:n])
        np.concatenate([q.value_rows()[1][o:o + k] for q, o, k in batch.pieces], out=slot.sparse[:n])
        return 0
    parts = [q.ranges(o, k) for q, o, k in batch.pieces]
    r = sum(len(s) for s, _ in parts)
    np.concatenate([s for s, _ in parts], out=slot.starts[:r])
    np.concatenate([c for _, c in parts], out=slot.counts[:r])
    return r


def output_segments(batch: Batch) -> list[tuple[str, int, int]]:
    """Where the engine writes the batch's predictions, in batch order: (region path, element offset,
    pairs), a path of "" meaning the slot at that batch position; adjacent runs merged (a client's
    consecutive requests sit side by side in its region). [] when everything goes to the slot.
    A query answered meanwhile (its client gone) writes into the slot: its region may be released."""
    segs: list[tuple[str, int, int]] = []
    pos = 0
    regions = False
    for q, off, k in batch.pieces:  # per query, not per pair
        path = q.output if not q.finished else ""
        start = q.output_offset + off if path else pos
        if segs and segs[-1][0] == path and segs[-1][1] + segs[-1][2] == start:
            segs[-1] = (path, segs[-1][1], segs[-1][2] + k)
        else:
            segs.append((path, start, k))
        regions = regions or bool(path)
        pos += k
    return segs if regions else []


WRITTEN = -2  # Batcher.complete's position for a query whose predictions an engine wrote to its region


class Batcher:
    def __init__(self, max_batch_pairs: int, max_queue_pairs: int, max_queue_delay_s: float) -> None:
        self.max_batch_pairs = max_batch_pairs
        self.max_queue_pairs = max_queue_pairs
        self.max_queue_delay_s = max_queue_delay_s
        self._queue: deque[Query] = deque()
        self._retry: deque[Batch] = deque()
        self._deadlines: list[tuple[float, int, Query]] = []
        self._seq = 0
        self._next_batch_id = 1
        self.queued_pairs = 0
        self.queued_queries = 0

    # ---- intake ----
    def submit(self, q: Query) -> None:
        """Queue a query, or raise Overloaded at once if the queue bound would be passed."""
        if self.queued_pairs + q.num_pairs > self.max_queue_pairs:
            raise Overloaded(
                f"queue holds {self.queued_pairs} pairs; {q.num_pairs} more would pass "
                f"max_queue_pairs={self.max_queue_pairs}")
        self._queue.append(q)
        self.queued_pairs += q.num_pairs
        self.queued_queries += 1
        if q.deadline is not None:
            self._seq += 1
            heapq.heappush(self._deadlines, (q.deadline, self._seq, q))

    def drop(self, q: Query) -> None:
        """Mark a query answered (error); its still-queued pairs leave the queue."""
        if q.finished:
            return
        q.finished = True
        left = q.num_pairs - q.cursor
        if left:
            self.queued_pairs -= left
            self.queued_queries -= 1
            q.cursor = q.num_pairs

    def drop_clients(self, clients: set[bytes]) -> int:
        """Drop the queued queries of clients that disconnected (nobody is left to answer); returns
        how many. Pieces already in flight finish and their replies are discarded by ZeroMQ."""
        n = 0
        for q in self._queue:
            if not q.finished and q.client in clients:
                self.drop(q)
                n += 1
        return n

    def expire(self, now: float) -> list[Query]:
        """Queries whose deadline has passed and that are not answered yet (to answer TIMEOUT)."""
        out: list[Query] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            q = heapq.heappop(self._deadlines)[2]
            if not q.finished:
                self.drop(q)
                out.append(q)
        return out

    def drain_all(self) -> list[Query]:
        """Every unanswered queued query (and those in retry batches), removed from the queue."""
        out = [q for q in self._queue if not q.finished]
        out += [q for b in self._retry for q, _, _ in b.pieces if not q.finished]
        for q in out:
            self.drop(q)
        self._queue.clear()
        self._retry.clear()
        return list(dict.fromkeys(out))

    # ---- batch formation ----
    def _head(self) -> Query | None:
        while self._queue and self._queue[0].finished:
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    def pending(self) -> bool:
        return bool(self._retry) or self.queued_pairs > 0

    def next_model(self) -> str:
        """The model the next batch must go to ("" = any): a retried batch's, or the head query's when it
        is partly dispatched, so that each query is computed by one model (also while two serve)."""
        for b in self._retry:
            for piece in b.pieces:
                if not piece[0].finished:
                    return piece[0].model
        head = self._head()
        return head.model if head is not None and head.cursor > 0 else ""

    def head_partial(self) -> bool:
        """The oldest queued query already has pieces in batches: the rest of it follows them before
        anything else (a model swap waits for this to be False, so no query is computed by two models)."""
        q = self._head()
        return q is not None and q.cursor > 0

    def should_close(self, now: float, engine_idle: bool) -> bool:
        if self._retry:
            return True
        if self.queued_pairs <= 0:
            return False
        if self.queued_pairs >= self.max_batch_pairs or engine_idle:
            return True
        head = self._head()
        return head is not None and now - head.arrival >= self.max_queue_delay_s

    def next_wakeup(self, engine_free: bool = True) -> float | None:
        """When a partial batch must close or a deadline passes, whichever is first; only the
        deadline when no engine slot is free (`engine_free` False: a freed slot wakes the caller)."""
        t: float | None = None
        head = self._head() if self.queued_pairs > 0 and engine_free else None
        if head is not None:
            t = head.arrival + self.max_queue_delay_s
        while self._deadlines and self._deadlines[0][2].finished:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            d = self._deadlines[0][0]
            t = d if t is None else min(t, d)
        return t

    def take(self, now: float) -> Batch | None:
        """The next batch: a batch to retry first, else up to max_batch_pairs queued pairs of one key."""
        while self._retry:
            b = self._retry.popleft()
            if any(not q.finished for q, _, _ in b.pieces):
                return b
        pieces: list[tuple[Query, int, int]] = []
        total = 0
        key: str | None = None
        oldest = now
        while total < self.max_batch_pairs:
            q = self._head()
            if q is None or (key is not None and q.key != key):
                break
            key = q.key
            oldest = min(oldest, q.arrival)
            k = min(q.num_pairs - q.cursor, self.max_batch_pairs - total)
            pieces.append((q, q.cursor, k))
            q.cursor += k
            q.pieces_out += 1
            total += k
            if q.cursor == q.num_pairs:
                self._queue.popleft()
                self.queued_queries -= 1
        if not pieces:
            return None
        self.queued_pairs -= total
        b = Batch(self._next_batch_id, key or BY_VALUE_KEY, pieces, total, oldest, now)
        self._next_batch_id += 1
        return b

    def retry(self, batch: Batch) -> None:
        """Queue a batch whose engine died, ahead of new work (it runs at most twice in all)."""
        batch.attempts += 1
        self._retry.append(batch)

    # ---- results ----
    @staticmethod
    def complete(batch: Batch, preds: np.ndarray) -> list[tuple[Query, np.ndarray, int]]:
        """Distribute a batch's predictions; returns (query, predictions, position in the batch or
        -1) for queries now complete. A query served by one piece gets a view of `preds` at its
        position (send it before the slot is reused); a reassembled one its own array (-1); one with an
        output region nothing to send (its engines wrote it there): an empty array and WRITTEN."""
        done: list[tuple[Query, np.ndarray, int]] = []
        pos = 0
        for q, off, n in batch.pieces:
            q.pieces_out -= 1
            if not q.finished:
                if q.output:
                    q.done_pairs += n
                    if q.done_pairs == q.num_pairs:
                        q.finished = True
                        done.append((q, _NOTHING, WRITTEN))
                elif n == q.num_pairs:
                    q.finished = True
                    done.append((q, preds[pos:pos + n], pos))
                else:
                    if q.result is None:
                        q.result = np.empty(q.num_pairs, np.float32)
                    q.result[off:off + n] = preds[pos:pos + n]
                    q.done_pairs += n
                    if q.done_pairs == q.num_pairs:
                        q.finished = True
                        done.append((q, q.result, -1))
            pos += n
        return done

    def fail(self, batch: Batch) -> list[Query]:
        """Unanswered queries of a failed batch (to answer with an error); they leave the queue."""
        out = [q for q, _, _ in batch.pieces if not q.finished]
        out = list(dict.fromkeys(out))
        for q in out:
            self.drop(q)
        return out
