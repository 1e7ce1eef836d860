"""The engine backend boundary: what an engine process shell needs from a CPU or GPU backend.

The process shell (ZeroMQ control socket, heartbeats, shared memory) is backend-agnostic; a backend
only turns a batch of pairs into predictions. A TensorRT backend could be added behind this same
interface where TensorRT exists. A backend may also pipeline: `submit_by_ref`/`submit_by_value` return
a handle whose wait() completes the batch (the GPU backend keeps several batches in flight); the
module-level adapters below give synchronous backends the same shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class BatchStats:
    """Per-batch figures a backend reports back (exported as metrics by the dispatcher)."""

    hot_lookups: int  # embedding rows read from device memory (or the hot tier on CPU)
    cold_lookups: int  # embedding rows read from host memory (the cold tier)


class EngineBackend(Protocol):
    """One model on one device. Implementations: engines.cpu_backend, engines.gpu_backend."""

    device: str

    def register_dataset(self, name: str, path: Path) -> None:
        """Make a dataset directory (formats.dataset) servable by reference.

        The CPU backend memory-maps it; the GPU backend copies dense/sparse onto the device.
        """

    def infer_by_ref(
        self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray, out: np.ndarray
    ) -> BatchStats:
        """Predict the pairs [start, start+count) of each range, concatenated, into `out` (float32)."""

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        """Predict pairs given inline: dense float32 [n, 13] (log-transformed), sparse int32 [n, 26]."""

    def warm_up(self) -> None:
        """Run every path a served batch can take (kernels compiled, modules loaded) before ready."""

    def device_memory_bytes(self) -> int:
        """Bytes of device memory in use (0 on CPU)."""

    def close(self) -> None:
        """Release device and host resources."""


class PendingBatch(Protocol):
    """A submitted batch; wait() blocks until its predictions are in `out` (or raises its error)."""

    def wait(self) -> BatchStats: ...


@dataclass(frozen=True)
class CompletedBatch:
    """A batch a synchronous backend has already finished."""

    stats: BatchStats

    def wait(self) -> BatchStats:
        return self.stats


def submit_by_ref(backend: EngineBackend, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                  out: np.ndarray) -> PendingBatch:
    """Start a by-reference batch: asynchronously where the backend pipelines (GPU), else run it now."""
    submit = getattr(backend, "submit_by_ref", None)
    if submit is not None:
        return submit(dataset, pair_starts, pair_counts, out)
    return CompletedBatch(backend.infer_by_ref(dataset, pair_starts, pair_counts, out))


def submit_by_value(backend: EngineBackend, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> PendingBatch:
    """Start a by-value batch: asynchronously where the backend pipelines (GPU), else run it now."""
    submit = getattr(backend, "submit_by_value", None)
    if submit is not None:
        return submit(dense, sparse, out)
    return CompletedBatch(backend.infer_by_value(dense, sparse, out))


def pin_host_memory(backend: EngineBackend, buf: np.ndarray) -> bool:
    """Page-lock a host buffer for a backend that can DMA from it (GPU); False where none can."""
    pin = getattr(backend, "pin_host_memory", None)
    return bool(pin(buf)) if pin is not None else False


def check_ranges(dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                 num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 (starts, counts) of by-reference ranges; ValueError unless they lie in the dataset's pairs."""
    starts = np.asarray(pair_starts, dtype=np.int64)
    counts = np.asarray(pair_counts, dtype=np.int64)
    if starts.shape != counts.shape or starts.ndim != 1:
        raise ValueError(f"pair starts and counts must be 1-D of one length, got {starts.shape}, {counts.shape}")
    if starts.size and (starts.min() < 0 or counts.min() < 0 or (starts + counts).max() > num_pairs):
        raise ValueError(f"pair ranges outside dataset {dataset!r} ({num_pairs} pairs)")
    return starts, counts


def pair_index(pair_starts: np.ndarray, pair_counts: np.ndarray) -> np.ndarray:
    """Concatenated pair indices of the ranges [start, start+count), without a Python loop."""
    counts = np.asarray(pair_counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    # Each range contributes start, start+1, ...: a running arange shifted per range.
    shifts = np.repeat(np.asarray(pair_starts, dtype=np.int64) - (np.cumsum(counts) - counts), counts)
    return np.arange(total, dtype=np.int64) + shifts
