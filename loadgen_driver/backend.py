"""The boundary between the LoadGen SUT and whatever computes predictions.

A backend takes batches of LoadGen sample indices (`send`) and hands back replies (`poll`). `send` is
called from LoadGen's issue thread and `poll` from the driver's completion thread, so each backend makes
those two safe to call concurrently. Two backends exist: `InProcessBackend` (in process, answers at once:
LoadGen's own ceiling and tests) and `DaemonBackend` (dlrm-daemon over ZeroMQ, wire/client.py).
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import zmq

from formats.pairs import pair_index
from wire import messages as M
from wire.client import Client, PipelinedClient, PipelinedReply
from wire.errors import DaemonError
from wire.output_region import OutputRegion

log = logging.getLogger("loadgen_driver")


class DriverBackendError(RuntimeError):
    """The backend cannot be used (daemon unreachable, dataset rejected, ...); message says why."""


@dataclass(frozen=True)
class BackendReply:
    """One answer to one `send`: predictions of the pairs of each sample in order, or an error."""

    request_id: int
    predictions: np.ndarray | None
    error: str | None = None


@dataclass(frozen=True)
class BackendLimits:
    """What a backend refuses beyond (0: no bound known); the driver stays within them."""

    queue_pairs: int = 0  # pairs queued at most (the daemon's max_queue_pairs): bounds pairs in flight
    query_pairs: int = 0  # pairs in one request at most (max_pairs_per_query): bounds a request's size


@dataclass(frozen=True)
class Liveness:
    """What a backend says of itself when replies are late."""

    reachable: bool  # it answered
    busy: bool  # it holds queued or in-flight work (so late replies are slow, not lost)
    detail: str  # for the log and the error message


class Backend(Protocol):
    limits: BackendLimits

    def load_samples(self, sample_ids: np.ndarray) -> None:
        """Make the samples (LoadGen's working set) servable by reference."""

    def unload_samples(self, sample_ids: np.ndarray) -> None:
        """Release the samples of `load_samples`."""

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        """Ask for predictions of the pairs of the samples (int64 sample indices); never blocks long."""

    def poll(self, timeout_ms: int) -> list[BackendReply]:
        """Replies that arrived, waiting up to `timeout_ms` for the first one. Their predictions stay
        valid until the next `poll` (a backend may hand out views of memory it then reuses)."""

    def liveness(self, timeout_s: float) -> Liveness:
        """Whether the backend is alive and working; called by the completion thread when replies are late."""

    def close(self) -> None:
        """Release sockets and threads."""


def drain(replies: "queue.SimpleQueue[BackendReply]", timeout_ms: int) -> list[BackendReply]:
    """Every reply queued now, waiting up to `timeout_ms` for the first (for backends whose replies
    arrive on other threads)."""
    try:
        first = replies.get(timeout=timeout_ms / 1000.0)
    except queue.Empty:
        return []
    out = [first]
    try:
        while True:
            out.append(replies.get_nowait())
    except queue.Empty:
        return out


class InProcessBackend:
    """Answers every request at once, in process.

    With `sample_offsets` the reply holds one prediction per pair (with `scores`, a fixed value derived
    from the pair index, so accuracy plumbing can be checked; else zeros); without, it is empty.
    """

    def __init__(self, sample_offsets: np.ndarray | None = None, scores: bool = True) -> None:
        self._offsets = None if sample_offsets is None else np.asarray(sample_offsets, dtype=np.int64)
        self._scores = scores  # False: zeros of the right length (cheap, for ceilings)
        self._replies: queue.SimpleQueue[BackendReply] = queue.SimpleQueue()
        self._empty = np.empty(0, dtype=np.float32)
        self.loaded = 0
        self.limits = BackendLimits()

    def load_samples(self, sample_ids: np.ndarray) -> None:
        self.loaded += len(sample_ids)

    def unload_samples(self, sample_ids: np.ndarray) -> None:
        self.loaded -= len(sample_ids)

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        if self._offsets is None:
            self._replies.put(BackendReply(request_id, self._empty))
            return
        starts = self._offsets[sample_ids]
        counts = self._offsets[sample_ids + 1] - starts
        if not self._scores:
            self._replies.put(BackendReply(request_id, np.zeros(int(counts.sum()), dtype=np.float32)))
            return
        pairs = pair_index(starts, counts)
        # A deterministic stand-in score in [0, 1): distinct per pair, so misplaced data shows.
        self._replies.put(BackendReply(request_id, ((pairs * 2654435761) % 1000003 / 1000003.0).astype(np.float32)))

    def poll(self, timeout_ms: int) -> list[BackendReply]:
        return drain(self._replies, timeout_ms)

    def liveness(self, timeout_s: float) -> Liveness:
        return Liveness(True, not self._replies.empty(), "in process")

    def close(self) -> None:
        pass


class DaemonBackend:
    """dlrm-daemon through wire.client.PipelinedClient (many requests in flight on one socket).

    The client's socket is single-threaded, so only the completion thread touches it: `send` (issue
    thread) queues the request and wakes that thread through an inproc socket; `poll` waits on both
    sockets, sends what is queued, then collects replies. A `send` costs a deque append and one
    inproc message, never a wait on a reply.

    With `sample_offsets` and `region` (the default) the predictions do not travel in the replies: the
    backend registers an output region (wire/output_region.py) and each request names a place in it,
    which the daemon's engines write; a request that finds no room there, or a daemon that refuses the
    region (another host, an older daemon), gets its predictions in the reply as before.
    """

    def __init__(self, endpoint: str, dataset_name: str, dataset_path: str, timeout_s: float = 10.0,
                 sample_offsets: np.ndarray | None = None, region: bool = True) -> None:
        self.dataset = dataset_name
        self.endpoint = endpoint
        self._control = Client(endpoint, timeout_s=timeout_s)
        try:
            status = self._control.status()
        except DaemonError as exc:
            self._control.close()
            raise DriverBackendError(f"daemon at {endpoint} is not answering ({exc}); is dlrm-daemon "
                                     f"running there?") from exc
        self.limits = BackendLimits(int(status.get("max_queue_pairs", 0)), int(status.get("max_pairs_per_query", 0)))
        self._call("RegisterDataset", self._control.register_dataset, dataset_name, dataset_path)
        self._offsets = None if sample_offsets is None else np.asarray(sample_offsets, dtype=np.int64)
        self.region: OutputRegion | None = None
        if region and self._offsets is not None:
            self.region = self._register_region(2 * self.limits.queue_pairs if self.limits.queue_pairs else 1 << 24)
        self._placed: dict[int, tuple[int, int]] = {}  # request id -> (region offset, pairs)
        self._release: list[int] = []  # region offsets of the replies the last poll returned
        self._client = PipelinedClient(endpoint)
        self._probe: Client | None = None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        addr = f"inproc://loadgen-driver-wake-{id(self)}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(addr)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.connect(addr)
        self._tx_lock = threading.Lock()  # the wake sender may be used by LoadGen's issue threads
        self._outbox: deque[tuple[int, np.ndarray, int]] = deque()
        self._poller = zmq.Poller()
        self._poller.register(self._client.socket, zmq.POLLIN)
        self._poller.register(self._wake_rx, zmq.POLLIN)

    def _register_region(self, num_predictions: int) -> OutputRegion | None:
        """An output region the daemon accepted, or None (predictions in the replies; the reason logged)."""
        try:
            region = OutputRegion(min(num_predictions, 1 << 28))
        except OSError as exc:
            log.warning("no output region (%s): predictions come back in the replies", exc)
            return None
        try:
            self._control.register_output(str(region.path), region.num_predictions)
        except DaemonError as exc:
            log.warning("the daemon did not take the output region (%s): predictions come back in the replies", exc)
            region.close()
            return None
        return region

    @staticmethod
    def _call(what: str, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except DaemonError as exc:
            raise DriverBackendError(f"daemon {what} failed: {exc}") from exc

    def load_samples(self, sample_ids: np.ndarray) -> None:
        self._call("LoadSamples", self._control.load_samples, self.dataset, sample_ids)

    def unload_samples(self, sample_ids: np.ndarray) -> None:
        self._call("UnloadSamples", self._control.unload_samples, self.dataset, sample_ids)

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        offset = -1
        if self.region is not None and self._offsets is not None and len(ids):
            pairs = int((self._offsets[ids + 1] - self._offsets[ids]).sum())
            at = self.region.ring.allocate(pairs)
            if at is not None:
                offset = at
                self._placed[request_id] = (at, pairs)
        self._outbox.append((request_id, ids, offset))
        with self._tx_lock:
            self._wake_tx.send(b"", zmq.NOBLOCK)

    def poll(self, timeout_ms: int) -> list[BackendReply]:
        if self._release:  # the caller is done with the last poll's predictions: their room is free
            assert self.region is not None
            for at in self._release:
                self.region.ring.free(at)
            self._release.clear()
        ready = dict(self._poller.poll(timeout_ms))
        if self._wake_rx in ready:
            try:
                while True:
                    self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                pass
        while self._outbox:
            rid, ids, at = self._outbox.popleft()
            try:
                # throughput work: LoadGen measures latency itself, and a refused sample fails the run
                if at >= 0:
                    assert self.region is not None
                    self._client.send_by_ref(rid, self.dataset, ids, M.NO_DEADLINE, str(self.region.path), at)
                else:
                    self._client.send_by_ref(rid, self.dataset, ids, deadline_s=M.NO_DEADLINE)
            except zmq.ZMQError as exc:
                self._settle(rid)
                return [BackendReply(rid, None, f"send failed: {exc}")]
        out = []
        for r in self._client.poll(0):
            # A failed request's room is never reused: a piece of it may still be computing elsewhere
            # and write there later (the ring then falls back to replies once it is full).
            placed = self._settle(r.request_id) if r.error is None else self._placed.pop(r.request_id, None)
            if r.written:
                if placed is None or self.region is None:
                    out.append(BackendReply(r.request_id, None, "the daemon wrote predictions to an output "
                                                                "region this request did not name"))
                else:
                    out.append(BackendReply(r.request_id, self.region.view(*placed)))
            else:
                out.append(_convert(r))
        return out

    def _settle(self, request_id: int) -> tuple[int, int] | None:
        """The request's place in the region (None: none), released at the next poll."""
        placed = self._placed.pop(request_id, None)
        if placed is not None:
            self._release.append(placed[0])
        return placed

    def liveness(self, timeout_s: float) -> Liveness:
        """The daemon's status over a socket of its own (the completion thread's; the control client
        belongs to LoadGen's thread)."""
        if self._probe is None:
            self._probe = Client(self.endpoint, timeout_s=timeout_s)
        try:
            st = self._probe.status()
        except DaemonError as exc:
            self._probe.close()
            self._probe = None
            return Liveness(False, False, str(exc))
        queued, inflight = int(st["queue_queries"]), int(st["inflight_batches"])
        return Liveness(True, queued + inflight > 0,
                        f"daemon {st['state']}: {queued} queries queued, {inflight} batches in flight")

    def close(self) -> None:
        self._client.close()
        if self.region is not None:
            try:
                self._control.unregister_output(str(self.region.path))
            except DaemonError:
                pass  # the daemon is gone or forgot it (it releases a disconnected client's regions)
            self.region.close()
        self._control.close()
        if self._probe is not None:
            self._probe.close()
        self._wake_tx.close(0)
        self._wake_rx.close(0)


def _convert(reply: PipelinedReply) -> BackendReply:
    error = None if reply.error is None else f"{type(reply.error).__name__}: {reply.error}"
    return BackendReply(int(reply.request_id), reply.predictions, error)
