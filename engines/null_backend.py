"""A backend that answers at once: the dispatcher's benchmark engine and the daemon tests' engine.

Predictions are a cheap deterministic function of the inputs so tests can check that every pair
came back to the right query in the right place, however the dispatcher cut and packed it:
  by reference: pair p of the dataset gets (p mod 2**20) / 2**20;
  by value:     a pair's prediction is its dense[:, 0].
Environment (test and benchmark hooks, read at start):
  DLRM_NULL_DELAY_S  seconds to sleep per batch (tests of batching, deadlines and draining); the
                     sleep releases the GIL, so heartbeats go on: a batch stuck in a backend call;
  DLRM_NULL_GIL_S    seconds to compute per batch while holding the GIL (a GIL-heavy backend that
                     starves the engine's heartbeat thread, though the process is alive);
  DLRM_NULL_SPIN_S   seconds to compute per batch in plain Python (the GIL is shared as usual, so
                     heartbeats go on: a slow batch that is making progress, as a CPU engine's on a
                     loaded host);
                     all three skip the first batch (the engine's warm-up at load): they model serving.
  DLRM_NULL_FILL=0   by reference, leave the output slot as it is: the dispatcher benchmark measures
                     the dispatcher's ceiling, not numpy writing predictions.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from engines.backend import BatchStats, SynchronousBackend

_SCALE = np.float32(1.0 / (1 << 20))


_MASK = (1 << 20) - 1


def null_ref_prediction(pairs: np.ndarray) -> np.ndarray:
    """The null backend's by-reference prediction for dataset pair indices `pairs`."""
    return (np.asarray(pairs) & _MASK).astype(np.float32) * _SCALE


class NullBackend(SynchronousBackend):
    def __init__(self, device: str = "null", artifact: str | Path = "") -> None:
        if artifact and not Path(artifact).exists():
            raise FileNotFoundError(f"model artifact {artifact} does not exist")
        self.device = device
        self._datasets: dict[str, Path] = {}
        self._delay_s = float(os.environ.get("DLRM_NULL_DELAY_S", "0") or 0)
        self._gil_s = float(os.environ.get("DLRM_NULL_GIL_S", "0") or 0)
        self._spin_s = float(os.environ.get("DLRM_NULL_SPIN_S", "0") or 0)
        self._warm = False
        self._fill = os.environ.get("DLRM_NULL_FILL", "1") != "0"
        self._arange = np.arange(0, dtype=np.int32)

    def register_dataset(self, name: str, path: Path) -> None:
        if not (Path(path) / "meta.json").is_file():
            raise FileNotFoundError(f"dataset {name}: {path}/meta.json not found")
        self._datasets[name] = Path(path)

    def infer_by_ref(
        self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray, out: np.ndarray
    ) -> BatchStats:
        if dataset not in self._datasets:
            raise KeyError(f"dataset {dataset!r} is not registered in this engine")
        self._stall()
        if self._fill and len(out):
            # pair index = start of its range + position in the range, in int32 modulo 2**20
            counts = np.asarray(pair_counts, dtype=np.int64)
            base = ((np.asarray(pair_starts, np.int64) - (np.cumsum(counts) - counts)) & _MASK).astype(np.int32)
            idx = np.repeat(base, counts)
            if len(self._arange) < len(idx):
                self._arange = np.arange(len(idx), dtype=np.int32)
            idx += self._arange[:len(idx)]
            idx &= _MASK
            np.multiply(idx, _SCALE, out=out, casting="unsafe")
        return BatchStats(hot_lookups=26 * len(out), cold_lookups=0)

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        self._stall()
        out[:] = dense[:, 0]
        return BatchStats(hot_lookups=26 * len(out), cold_lookups=0)

    def _stall(self) -> None:
        if not self._warm:
            self._warm = True
            return
        if self._delay_s:
            time.sleep(self._delay_s)
        if self._spin_s:
            end = time.monotonic() + self._spin_s
            while time.monotonic() < end:
                pass
        if self._gil_s:
            # A long switch interval keeps the GIL with this thread while it spins (Python code
            # would otherwise hand it over every 5 ms): other threads of the process stall.
            old = sys.getswitchinterval()
            sys.setswitchinterval(self._gil_s + 1.0)
            try:
                end = time.monotonic() + self._gil_s
                while time.monotonic() < end:
                    pass
            finally:
                sys.setswitchinterval(old)

    def warm_up(self) -> None:
        """Nothing to warm; the first batch after it is the first served one (the stall hooks skip it)."""
        self._stall()

    def close(self) -> None:
        self._datasets.clear()
