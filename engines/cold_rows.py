"""A by-reference batch's cold embedding rows, gathered by the engine's CPU for one copy to the device.

Why (issue 13, `embedding_weights_on_gpu_part = 0.3` on the full-size model, H100): end to end the engine
served 69% of its all-on-device rate. The fused gather reads the 0.5% of lookups whose rows sit in pinned
host memory zero-copy, one PCIe round trip per row inside the kernel, and the kernel's programs wait for
them; a device pass that copies them first (kernels/cold_stage.py) waits for the same round trips. The rows
a by-reference dataset looks up are known as soon as it is registered, so the host can find a batch's cold
rows with no device work at all: this module keeps, per dataset, its cold lookups sorted by pair, and
answers for a batch of pair ranges which host rows to copy and where each goes in the batch. The engine
gathers them into pinned memory (numpy `take`, no Python loop over pairs) and copies them to the device on
its copy stream while the previous batch computes; the forward then reads only device memory
(engines/gpu_backend.py, `cold_gather = "host"`).

Pure numpy and no state beyond the index: tested against a brute-force plan on the CPU.
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class ColdPlan:
    """The cold lookups of one batch, in batch order, at most the capacity asked for."""

    rows: np.ndarray  # int64 [k]: cold row (file position - first cold position) of each staged lookup
    flat: np.ndarray  # int64 [k]: its place in the batch's [n, tables] lookups, batch_row * tables + table
    total: int  # the batch's cold lookups; total - k of them (past the capacity) are not in the plan

    @property
    def staged(self) -> int:
        return int(self.rows.size)


_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ColdLookups:
    """Every lookup of a dataset whose row is cold, sorted by (pair, table), with each pair's first entry."""

    first: np.ndarray  # int32/int64 [pairs + 1]: entries [first[p], first[p + 1]) are pair p's
    flat: np.ndarray  # int64 [c]: pair * tables + table of each entry, increasing
    row: np.ndarray  # int64 [c]: its cold row
    tables: int

    @classmethod
    def from_chunks(cls, chunks: Iterable[tuple[int, np.ndarray, np.ndarray]], tables: int,
                    pairs: int) -> "ColdLookups":
        """From (first pair of the chunk, flat indices pair_in_chunk * tables + table of its cold lookups in
        increasing order, their cold rows) per chunk of consecutive pairs, chunks in pair order, of a
        dataset of `pairs` pairs."""
        if tables < 1:
            raise ValueError(f"tables must be positive, got {tables}")
        flats, rows = [], []
        for first_pair, flat, row in chunks:
            flats.append(np.asarray(flat, dtype=np.int64) + int(first_pair) * tables)
            rows.append(np.asarray(row, dtype=np.int64))
        flat_all = np.concatenate(flats) if flats else _EMPTY
        if flat_all.size and (bool((np.diff(flat_all) <= 0).any()) or flat_all[0] < 0
                              or flat_all[-1] >= pairs * tables):
            raise ValueError("cold lookups must come in pair order, within the dataset's pairs")
        counts = np.bincount(flat_all // tables, minlength=pairs)
        # int32 where the entries allow: 4 bytes a pair (220 MB for the full-size 55 M-pair dataset)
        first = np.zeros(pairs + 1, dtype=np.int32 if flat_all.size < 2**31 else np.int64)
        first[1:] = np.cumsum(counts)
        return cls(first, flat_all, np.concatenate(rows) if rows else _EMPTY, tables)

    @classmethod
    def from_positions(cls, positions: np.ndarray, first_cold: int) -> "ColdLookups":
        """From a dataset's file positions [pairs, tables] (rows >= first_cold are cold)."""
        positions = np.asarray(positions)
        cold = positions.reshape(-1) >= first_cold
        flat = np.flatnonzero(cold)
        return cls.from_chunks([(0, flat, positions.reshape(-1)[flat].astype(np.int64) - first_cold)],
                               positions.shape[1], positions.shape[0])

    @property
    def count(self) -> int:
        return int(self.flat.size)

    @property
    def nbytes(self) -> int:
        return int(self.first.nbytes + self.flat.nbytes + self.row.nbytes)

    def plan(self, starts: np.ndarray, counts: np.ndarray, capacity: int) -> ColdPlan:
        """The cold lookups of the batch made of pair ranges [starts[i], starts[i] + counts[i]), laid out one
        after another (range i's first pair is batch row counts[:i].sum()); the first `capacity` of them."""
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        lo = self.first[starts].astype(np.int64)
        lens = self.first[starts + counts] - lo
        total = int(lens.sum())
        k = min(total, max(int(capacity), 0))
        if k == 0:
            return ColdPlan(_EMPTY, _EMPTY, total)
        ends = np.cumsum(lens)
        which = np.repeat(np.arange(lens.size), lens)[:k]  # the range of each planned lookup
        idx = lo[which] + np.arange(k, dtype=np.int64) - (ends - lens)[which]
        # an entry's place in the batch: its flat index moved from its range's first pair to the batch row
        shift = (np.cumsum(counts) - counts - starts) * self.tables
        return ColdPlan(self.row[idx], self.flat[idx] + shift[which], total)


def gather_rows(cold: np.ndarray, plan: ColdPlan, out: np.ndarray, pool: Executor | None = None,
                workers: int = 1, min_rows_per_task: int = 4096) -> np.ndarray:
    """Copy the plan's rows of `cold` ([rows, dim]) into out[:k] (pinned staging) and return that view.
    With `pool` (of `workers` threads), a large plan is split over them: each row is a random read of host memory (a cache
    and TLB miss), and numpy's take releases the GIL, so threads overlap more of them."""
    k = plan.staged
    if k > out.shape[0]:
        raise ValueError(f"plan of {k} rows does not fit {out.shape[0]}")
    view = out[:k]
    tasks = 1 if pool is None else max(1, min(workers, k // max(min_rows_per_task, 1)))
    # mode="clip": the rows are valid by construction, and "raise" would buffer the whole output first
    if tasks <= 1 or pool is None:
        if k:
            np.take(cold, plan.rows, axis=0, out=view, mode="clip")
        return view
    bounds = np.linspace(0, k, tasks + 1).astype(np.int64)
    futures = [pool.submit(np.take, cold, plan.rows[a:b], 0, view[a:b], "clip")
               for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()
    return view
