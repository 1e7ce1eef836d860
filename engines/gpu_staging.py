"""Batches in flight on one GPU: staging sets, tickets and the pending handle a submit returns.

A GPU engine keeps several batches in flight (issue 4: input copies, compute and output copies of
consecutive batches overlap). Each in-flight batch owns one `StagingSet`: pinned host buffers for what
cannot be copied straight from where it lies, device buffers its inputs land in (on the copy stream),
and two events. A set goes back to the free pool only when the batch's predictions have reached their
destination on the host, so a set is never overwritten while the GPU or the host still reads it.

Host memory registered with cudaHostRegister (the engine's shared-memory slots) is read and written by
DMA directly: `HostRegistry` knows which address ranges are registered.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from engines.backend import BatchStats

log = logging.getLogger("dlrm.engine.gpu")


def _clear_last_error() -> None:
    """cudaGetLastError through cuda-bindings where it is installed (torch's own bindings lack it)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        return
    runtime.cudaGetLastError()


class HostRegistry:
    """Address ranges of host memory pinned with cudaHostRegister (page-locked, device-mapped)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._ranges: list[tuple[int, int]] = []

    def register(self, buf: np.ndarray, flags: int = 0) -> bool:
        """Page-lock `buf`'s memory for DMA (cudaHostRegister `flags`: 0 maps it for every device under
        unified addressing); False (and a warning) where the driver refuses."""
        ptr, size = int(buf.ctypes.data), int(buf.nbytes)
        if size == 0 or self.contains(buf):
            return size > 0
        rt = torch.cuda.cudart()
        # The runtime's current device first: a library that drives CUDA through the driver API
        # (nvmath's cuda.core) may leave another context current, and the register then fails with
        # "invalid device ordinal" (seen on an H200 after the fp8 top MLP was planned).
        torch.cuda.set_device(self.device)
        err = rt.cudaHostRegister(ptr, size, flags)
        if err != rt.cudaError.success:
            # Clear the runtime's last error: left set, it would be reported by the next kernel launch
            # check of any later torch operation, as that operation's failure.
            _clear_last_error()
            log.warning("cudaHostRegister of %d bytes at %#x failed (%s): copies go through pinned staging",
                        size, ptr, err)
            return False
        self._ranges.append((ptr, ptr + size))
        return True

    def contains(self, arr: np.ndarray) -> bool:
        """Whether a C-contiguous array lies wholly in registered memory."""
        if not arr.flags.c_contiguous:
            return False
        lo = int(arr.ctypes.data)
        hi = lo + int(arr.nbytes)
        return any(a <= lo and hi <= b for a, b in self._ranges)

    def unregister_all(self) -> None:
        rt = torch.cuda.cudart()
        for lo, _ in self._ranges:
            rt.cudaHostUnregister(lo)
        self._ranges.clear()


class StagingSet:
    """Buffers of one batch in flight (max_pairs pairs)."""

    def __init__(self, max_pairs: int, dense: int, tables: int, counts_len: int, device: torch.device) -> None:
        self.max_pairs = max_pairs
        self._dense, self._tables = dense, tables
        self.pred_host = torch.empty(max_pairs, dtype=torch.float32, pin_memory=True)
        self.counts_host = torch.empty(counts_len, dtype=torch.int64, pin_memory=True)
        # by reference: r starts then r counts (or the pair indices of a request cut on the host)
        self.ranges_host = torch.empty(2 * max_pairs, dtype=torch.int64, pin_memory=True)
        self.ranges_dev = torch.empty(2 * max_pairs, dtype=torch.int64, device=device)
        self.dense_dev = torch.empty((max_pairs, dense), dtype=torch.float32, device=device)
        self.sparse_dev = torch.empty((max_pairs, tables), dtype=torch.int32, device=device)
        self._dense_host: torch.Tensor | None = None
        self._sparse_host: torch.Tensor | None = None
        self.cold_stage: Any = None  # the engine's cold-row staging of this set (gpu_backend._ColdStage)
        self.copied = torch.cuda.Event()  # inputs are on the device (copy stream)
        # Predictions and counts are on the host (compute stream). Blocking: a thread waiting for it sleeps
        # instead of spinning, so a hung device shows as no CPU progress to the supervisor (daemon/
        # supervisor.py), and waiting threads leave the cores to the work that needs them.
        self.done = torch.cuda.Event(blocking=True)

    def host_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned by-value staging, allocated on first use (only unregistered callers need it)."""
        if self._dense_host is None or self._sparse_host is None:
            self._dense_host = torch.empty((self.max_pairs, self._dense), dtype=torch.float32, pin_memory=True)
            self._sparse_host = torch.empty((self.max_pairs, self._tables), dtype=torch.int32, pin_memory=True)
        return self._dense_host, self._sparse_host


@dataclass(eq=False)
class Ticket:
    """One device batch in flight: its set, its size, where its predictions go, whose request it is."""

    staging: StagingSet
    n: int
    out: np.ndarray  # float32 [n] destination on the host
    direct: bool  # predictions were copied by DMA straight into `out`
    owner: "GpuPending"
    staged: int = 0  # cold lookups read from rows staged on the device (counted hot by the kernel)
    finished: bool = False


FinishFn = Callable[[Ticket], tuple[int, int]]


class InFlight:
    """The staging sets and the device batches in flight, in submission order.

    A batch takes a free set at submit. When none is free, the submitting thread finishes the oldest
    batch in flight itself (its owner's wait() then finds it done), so a single-threaded caller can
    submit more device batches than there are sets without waiting for itself.
    """

    def __init__(self, sets: list[StagingSet], finish: FinishFn) -> None:
        self._free: queue.SimpleQueue[StagingSet] = queue.SimpleQueue()
        for s in sets:
            self._free.put(s)
        self.size = len(sets)
        self._finish_fn = finish
        self._tickets: deque[Ticket] = deque()
        self._queue_lock = threading.Lock()  # short: the ticket queue
        self._finish_lock = threading.Lock()  # held across a CUDA event wait: never taken by add()

    def take(self) -> StagingSet:
        while True:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                pass
            with self._queue_lock:
                oldest = self._tickets[0] if self._tickets else None
            if oldest is None:  # every set is between take() and add() in another thread
                return self._free.get()
            self.finish(oldest)

    def give(self, s: StagingSet) -> None:
        self._free.put(s)

    def add(self, ticket: Ticket) -> None:
        with self._queue_lock:
            self._tickets.append(ticket)
        ticket.owner.tickets.append(ticket)

    def finish(self, t: Ticket) -> None:
        """Complete one device batch (once): wait for it, place its predictions, free its set."""
        with self._finish_lock:
            if t.finished:
                return
            try:
                hot, cold = self._finish_fn(t)
                t.owner.hot += hot
                t.owner.cold += cold
            except Exception as exc:  # the request fails; its other batches still complete
                t.owner.error = t.owner.error or exc
            finally:
                t.finished = True
                with self._queue_lock:
                    self._tickets.remove(t)


class GpuPending:
    """The handle a GPU submit returns; `wait()` blocks until every device batch of the request is done.

    Waiting releases the GIL (CUDA event synchronize), so an engine's completion thread can wait while
    its work thread submits the next batch.
    """

    def __init__(self, inflight: InFlight) -> None:
        self._inflight = inflight
        self.tickets: list[Ticket] = []
        self.hot = 0
        self.cold = 0
        self.error: Exception | None = None

    def wait(self) -> BatchStats:
        for t in self.tickets:
            self._inflight.finish(t)
        if self.error is not None:
            raise self.error
        return BatchStats(self.hot, self.cold)
