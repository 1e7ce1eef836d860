"""The engine backend boundary: what an engine process shell needs from a CPU or GPU backend.

The process shell (ZeroMQ control socket, heartbeats, shared memory) is backend-agnostic; a backend
only turns a batch of pairs into predictions. A TensorRT backend could be added behind this same
interface where TensorRT exists.
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

    def device_memory_bytes(self) -> int:
        """Bytes of device memory in use (0 on CPU)."""

    def close(self) -> None:
        """Release device and host resources."""


def pair_index(pair_starts: np.ndarray, pair_counts: np.ndarray) -> np.ndarray:
    """Concatenated pair indices of the ranges [start, start+count), without a Python loop."""
    counts = np.asarray(pair_counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    # Each range contributes start, start+1, ...: a running arange shifted per range.
    shifts = np.repeat(np.asarray(pair_starts, dtype=np.int64) - (np.cumsum(counts) - counts), counts)
    return np.arange(total, dtype=np.int64) + shifts
