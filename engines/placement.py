"""Hot/cold placement (REFERENCE "Hot/cold split"): which artifact rows live in device memory.

The artifact stores rows most-accessed first, so the split needs no rewrite: rows [0, n_hot) of
`embeddings.int8` are hot (device memory), the rest cold (host memory); a lookup of global row g is hot
iff row_position[g] < n_hot. CPU and GPU engines share this code so their hot/cold counts agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from formats.artifact import Artifact


def hot_rows(total_rows: int, gpu_part: float) -> int:
    """ceil(gpu_part * total_rows), exact (no float rounding up of 0.3 * 10 to 4)."""
    if not (0.0 < gpu_part <= 1.0) or math.isnan(gpu_part):
        raise ValueError(f"gpu_part must be in (0, 1], got {gpu_part}")
    return min(total_rows, math.ceil(Fraction(gpu_part) * total_rows))


@dataclass(frozen=True)
class Placement:
    n_hot: int
    row_position: np.ndarray  # int32 [total_rows]: global row -> row of embeddings.int8
    table_offsets: np.ndarray  # int64 [T+1]
    gpu_part: float = 1.0

    @classmethod
    def from_artifact(cls, artifact: Artifact, gpu_part: float) -> "Placement":
        return cls(hot_rows(artifact.total_rows, gpu_part), artifact.row_position, artifact.table_offsets,
                   float(gpu_part))

    @property
    def total_rows(self) -> int:
        return int(self.table_offsets[-1])

    @property
    def n_cold(self) -> int:
        return self.total_rows - self.n_hot

    def positions(self, sparse: np.ndarray) -> np.ndarray:
        """[n, T] per-table ids -> [n, T] int64 rows of embeddings.int8."""
        num_tables = len(self.table_offsets) - 1
        globals_ = np.asarray(sparse, dtype=np.int64) + self.table_offsets[None, :num_tables]
        return self.row_position[globals_].astype(np.int64, copy=False)

    def lookup_counts(self, positions: np.ndarray) -> tuple[int, int]:
        """(hot, cold) lookups of a batch of positions."""
        hot = int(np.count_nonzero(positions < self.n_hot))
        return hot, int(positions.size) - hot

    def check_sparse(self, sparse: np.ndarray) -> None:
        """ValueError unless sparse is [n, T] with every id inside its table."""
        num_tables = len(self.table_offsets) - 1
        if sparse.ndim != 2 or sparse.shape[1] != num_tables:
            raise ValueError(f"sparse must be [n, {num_tables}], got {list(sparse.shape)}")
        if sparse.size == 0:
            return
        rows = np.diff(self.table_offsets)
        bad = (sparse < 0) | (sparse >= rows[None, :])
        if bad.any():
            pair, table = np.argwhere(bad)[0]
            raise ValueError(
                f"sparse id {int(sparse[pair, table])} of pair {pair} is outside table {table} "
                f"({int(rows[table])} rows)"
            )
