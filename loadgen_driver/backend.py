"""The boundary between the LoadGen SUT and whatever computes predictions.

A backend takes batches of LoadGen sample indices (`send`) and hands back replies (`poll`). `send` is
called from LoadGen's issue thread and `poll` from the driver's completion thread, so each backend makes
those two safe to call concurrently. Two backends exist: `NullBackend` (in process, answers at once:
LoadGen's own ceiling and tests) and `DaemonBackend` (dlrm-daemon over ZeroMQ, daemon/client.py).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class BackendError(RuntimeError):
    """The backend cannot be used (daemon unreachable, dataset rejected, ...); message says why."""


@dataclass(frozen=True)
class Reply:
    """One answer to one `send`: predictions of the pairs of each sample in order, or an error."""

    request_id: int
    predictions: np.ndarray | None
    error: str | None = None


class Backend(Protocol):
    def load_samples(self, sample_ids: np.ndarray) -> None:
        """Make the samples (LoadGen's working set) servable by reference."""

    def unload_samples(self, sample_ids: np.ndarray) -> None:
        """Release the samples of `load_samples`."""

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        """Ask for predictions of the pairs of the samples (int64 sample indices); never blocks long."""

    def poll(self, timeout_ms: int) -> list[Reply]:
        """Replies that arrived, waiting up to `timeout_ms` for the first one."""

    def close(self) -> None:
        """Release sockets and threads."""


class NullBackend:
    """Answers every request at once, in process.

    With `sample_offsets` the reply holds one prediction per pair (with `scores`, a fixed value derived
    from the pair index, so accuracy plumbing can be checked; else zeros); without, it is empty.
    """

    def __init__(self, sample_offsets: np.ndarray | None = None, scores: bool = True) -> None:
        self._offsets = None if sample_offsets is None else np.asarray(sample_offsets, dtype=np.int64)
        self._scores = scores  # False: zeros of the right length (cheap, for ceilings)
        self._replies: queue.SimpleQueue[Reply] = queue.SimpleQueue()
        self._empty = np.empty(0, dtype=np.float32)
        self.loaded = 0

    def load_samples(self, sample_ids: np.ndarray) -> None:
        self.loaded += len(sample_ids)

    def unload_samples(self, sample_ids: np.ndarray) -> None:
        self.loaded -= len(sample_ids)

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        if self._offsets is None:
            self._replies.put(Reply(request_id, self._empty))
            return
        from engines.backend import pair_index

        starts = self._offsets[sample_ids]
        counts = self._offsets[sample_ids + 1] - starts
        if not self._scores:
            self._replies.put(Reply(request_id, np.zeros(int(counts.sum()), dtype=np.float32)))
            return
        pairs = pair_index(starts, counts)
        # A deterministic stand-in score in [0, 1): distinct per pair, so misplaced data shows.
        self._replies.put(Reply(request_id, ((pairs * 2654435761) % 1000003 / 1000003.0).astype(np.float32)))

    def poll(self, timeout_ms: int) -> list[Reply]:
        try:
            first = self._replies.get(timeout=timeout_ms / 1000.0)
        except queue.Empty:
            return []
        out = [first]
        try:
            while True:
                out.append(self._replies.get_nowait())
        except queue.Empty:
            return out

    def close(self) -> None:
        pass


class DaemonBackend:
    """dlrm-daemon through daemon.client.PipelinedClient (many requests in flight on one socket).

    ZeroMQ sockets are not thread-safe: one lock serialises `send` (issue thread) and `poll`
    (completion thread); `poll` holds it only for a non-blocking receive and waits outside it.
    """

    def __init__(self, endpoint: str, dataset_name: str, dataset_path: str, timeout_s: float = 10.0) -> None:
        try:
            from daemon.client import Client, PipelinedClient
            from daemon.errors import DaemonError
        except ImportError as exc:  # the daemon package is part of this project; say what is missing
            raise BackendError(f"daemon client library unavailable: {exc}") from exc
        self._daemon_error = DaemonError
        self.dataset = dataset_name
        try:
            self._control = Client(endpoint, timeout_s=timeout_s)
            self._control.status()
            self._control.register_dataset(dataset_name, dataset_path)
        except DaemonError as exc:
            raise BackendError(f"daemon at {endpoint}: {type(exc).__name__}: {exc}") from exc
        self._client = PipelinedClient(endpoint)
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def _call(self, what: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except self._daemon_error as exc:
            raise BackendError(f"daemon {what} failed: {type(exc).__name__}: {exc}") from exc

    def load_samples(self, sample_ids: np.ndarray) -> None:
        self._call("LoadSamples", self._control.load_samples, self.dataset, sample_ids)

    def unload_samples(self, sample_ids: np.ndarray) -> None:
        self._call("UnloadSamples", self._control.unload_samples, self.dataset, sample_ids)

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        with self._lock:
            self._client.send_by_ref(request_id, self.dataset, sample_ids)
        self._wake.set()

    def poll(self, timeout_ms: int) -> list[Reply]:
        waited = 0.0
        step_ms = 0  # first try without waiting, then short waits so senders get the lock
        while True:
            with self._lock:
                got = self._client.poll(step_ms)
            if got:
                return [_convert(r) for r in got]
            if waited >= timeout_ms:
                return []
            step_ms = 1
            waited += 1.0

    def close(self) -> None:
        self._client.close()
        self._control.close()


def _convert(reply) -> Reply:  # type: ignore[no-untyped-def]
    error = getattr(reply, "error", None)
    if error is not None and not isinstance(error, str):
        error = f"{type(error).__name__}: {error}"
    return Reply(int(reply.request_id), getattr(reply, "predictions", None), error)
