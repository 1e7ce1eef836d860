"""CPU engine backend: the int8 reference forward over both tiers in host memory.

Its predictions follow the GPU engine's Placement (the same int8 rows in the same order), but it reads
every row from host memory and reports it so: all lookups are cold (tier "host"), none hot (a CPU
engine has no device tier; its hot-row hit ratio is 0, not the 1.0 a placement split would claim).
Datasets are memory-mapped (formats.dataset), and by-reference batches are gathered with array ops.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.backend import BatchStats, SynchronousBackend
from formats.pairs import check_ranges, pair_index
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.dataset import Dataset


class CpuBackendError(ValueError):
    """A request the backend cannot serve (unknown dataset, ranges out of bounds, bad shapes)."""


class CpuBackend(SynchronousBackend):
    def __init__(self, artifact_path: Path | str, gpu_part: float = 1.0, device: str = "cpu") -> None:
        self.device = device
        self.artifact = Artifact.open(Path(artifact_path))
        self.reference = Int8Reference(self.artifact, gpu_part)
        self.placement = self.reference.placement
        self.datasets: dict[str, Dataset] = {}

    def register_dataset(self, name: str, path: Path) -> None:
        ds = Dataset.open(Path(path))
        model_rows = self.artifact.config.table_rows
        too_big = [t for t, r in enumerate(ds.table_rows) if r > model_rows[t]]
        if too_big:
            raise CpuBackendError(
                f"dataset {name} ({path}): tables {too_big} have more ids "
                f"({[ds.table_rows[t] for t in too_big]}) than the model's rows ({[model_rows[t] for t in too_big]})"
            )
        self.datasets[name] = ds

    def infer_by_ref(self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                     out: np.ndarray) -> BatchStats:
        ds = self.datasets.get(dataset)
        if ds is None:
            raise CpuBackendError(f"dataset {dataset!r} is not registered")
        try:
            starts, counts = check_ranges(dataset, pair_starts, pair_counts, ds.num_pairs)
        except ValueError as exc:
            raise CpuBackendError(str(exc)) from exc
        idx = pair_index(starts, counts)
        return self._run(np.asarray(ds.dense[idx]), np.asarray(ds.sparse[idx]), out)

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        n = len(dense)
        if dense.shape != (n, self.artifact.config.dense_features) or len(sparse) != n:
            raise CpuBackendError(f"dense must be [n, {self.artifact.config.dense_features}] and sparse [n, 26], "
                               f"got {list(dense.shape)} and {list(sparse.shape)}")
        try:
            self.placement.check_sparse(np.asarray(sparse))
        except ValueError as exc:
            raise CpuBackendError(str(exc)) from exc
        return self._run(dense, sparse, out)

    def _run(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        n = len(dense)
        if out.dtype != np.float32 or out.shape[0] < n:
            raise CpuBackendError(f"out must be float32 with at least {n} entries, got {out.dtype}{list(out.shape)}")
        if n == 0:
            return BatchStats(0, 0)
        positions = self.placement.positions(sparse)
        out[:n] = self.reference.predict_positions(dense, positions)
        return BatchStats(hot_lookups=0, cold_lookups=int(positions.size))

    def warm_up(self) -> None:
        """One small batch before the engine says it is ready (first-call costs of torch's kernels)."""
        n = 64
        self.infer_by_value(np.zeros((n, self.artifact.config.dense_features), np.float32),
                            np.zeros((n, self.artifact.config.num_tables), np.int32), np.empty(n, np.float32))

    def close(self) -> None:
        self.datasets.clear()
