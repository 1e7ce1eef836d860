"""The engine backend boundary: what the engine process shell needs from a CPU, GPU or null backend.

The process shell (engines/process.py: control socket, heartbeats, shared memory) is backend-agnostic;
a backend only turns a batch of pairs into predictions. Every backend has the same typed surface,
`EngineBackend`: synchronous calls (`infer_by_*`, for direct use and tests) and pipelined ones
(`submit_by_*`, which return a handle whose wait() completes the batch: the GPU backend keeps several
batches in flight). Synchronous backends inherit `SynchronousBackend`, whose submits run the batch at
once. A TensorRT backend could be added behind this same interface where TensorRT exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class BatchStats:
    """Per-batch figures a backend reports back (exported as metrics by the dispatcher)."""

    hot_lookups: int  # embedding rows read from device memory (the hot tier)
    cold_lookups: int  # embedding rows read from host memory (the cold tier)


class PendingBatch(Protocol):
    """A submitted batch; wait() blocks until its predictions are in `out` (or raises its error)."""

    def wait(self) -> BatchStats: ...


@dataclass(frozen=True)
class CompletedBatch:
    """A batch a synchronous backend has already finished."""

    stats: BatchStats

    def wait(self) -> BatchStats:
        return self.stats


class EngineBackend(Protocol):
    """One model on one device. Implementations: engines.cpu_backend, engines.gpu_backend,
    engines.null_backend; engines.factory.create_backend makes one."""

    device: str

    def register_dataset(self, name: str, path: Path) -> None:
        """Make a dataset directory (formats.dataset) servable by reference."""
        ...

    def infer_by_ref(self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                     out: np.ndarray) -> BatchStats:
        """Predict the pairs [start, start+count) of each range, concatenated, into `out` (float32)."""
        ...

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        """Predict pairs given inline: dense float32 [n, 13] (log-transformed), sparse int32 [n, 26]."""
        ...

    def submit_by_ref(self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                      out: np.ndarray) -> PendingBatch:
        """Start a by-reference batch (asynchronously where the backend pipelines)."""
        ...

    def submit_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> PendingBatch:
        """Start a by-value batch (asynchronously where the backend pipelines)."""
        ...

    def pin_host_memory(self, buf: np.ndarray) -> bool:
        """Page-lock a host buffer for DMA (the engine's shared-memory region); False where none can."""
        ...

    def warm_up(self) -> None:
        """Run every path a served batch can take (kernels compiled, modules loaded) before ready."""
        ...

    def device_memory_bytes(self) -> int:
        """Bytes of device memory in use (0 on CPU)."""
        ...

    def close(self) -> None:
        """Release device and host resources."""
        ...


class SynchronousBackend:
    """Base of backends that compute a batch within the call: submits run it at once, nothing is
    page-locked, no device memory is held."""

    def infer_by_ref(self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                     out: np.ndarray) -> BatchStats:
        raise NotImplementedError

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        raise NotImplementedError

    def submit_by_ref(self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                      out: np.ndarray) -> PendingBatch:
        return CompletedBatch(self.infer_by_ref(dataset, pair_starts, pair_counts, out))

    def submit_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> PendingBatch:
        return CompletedBatch(self.infer_by_value(dense, sparse, out))

    def pin_host_memory(self, buf: np.ndarray) -> bool:
        return False

    def device_memory_bytes(self) -> int:
        return 0
