"""A backend that answers at once: the dispatcher's benchmark engine and the daemon tests' engine.

Predictions are a cheap deterministic function of the inputs so tests can check that every pair
came back to the right query in the right place:
  by reference: every pair of a range [start, start+count) gets (start mod 2**20) / 2**20;
  by value:     a pair's prediction is its dense[:, 0].
The environment variable DLRM_NULL_DELAY_S (seconds per batch) makes batches slow, for tests of
batching, deadlines and draining.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from engines.backend import BatchStats

_SCALE = np.float32(1.0 / (1 << 20))


def null_ref_prediction(pair_starts: np.ndarray) -> np.ndarray:
    """The prediction the null backend gives every pair of a range starting at `pair_starts`."""
    return (np.asarray(pair_starts) & ((1 << 20) - 1)).astype(np.float32) * _SCALE


class NullBackend:
    def __init__(self, device: str = "null", artifact: str | Path = "") -> None:
        if artifact and not Path(artifact).exists():
            raise FileNotFoundError(f"model artifact {artifact} does not exist")
        self.device = device
        self._datasets: dict[str, Path] = {}
        self._delay_s = float(os.environ.get("DLRM_NULL_DELAY_S", "0") or 0)

    def register_dataset(self, name: str, path: Path) -> None:
        if not (Path(path) / "meta.json").is_file():
            raise FileNotFoundError(f"dataset {name}: {path}/meta.json not found")
        self._datasets[name] = Path(path)

    def infer_by_ref(
        self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray, out: np.ndarray
    ) -> BatchStats:
        if dataset not in self._datasets:
            raise KeyError(f"dataset {dataset!r} is not registered in this engine")
        if self._delay_s:
            time.sleep(self._delay_s)
        out[:] = np.repeat(null_ref_prediction(pair_starts), pair_counts)
        return BatchStats(hot_lookups=26 * len(out), cold_lookups=0)

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        if self._delay_s:
            time.sleep(self._delay_s)
        out[:] = dense[:, 0]
        return BatchStats(hot_lookups=26 * len(out), cold_lookups=0)

    def device_memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self._datasets.clear()
