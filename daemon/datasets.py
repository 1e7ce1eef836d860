"""The dispatcher's view of registered datasets: sample -> pair-range mapping and the loaded set."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daemon.errors import BadRequest


@dataclass(eq=False)
class DatasetEntry:
    name: str
    path: str
    starts: np.ndarray  # int64 [num_samples]: first pair of each sample
    ends: np.ndarray  # int64 [num_samples]
    num_samples: int
    num_pairs: int
    has_empty: bool  # some sample has no pairs (such ranges are dropped before batching)
    state: str = "ready"  # registering | ready
    loaded: np.ndarray | None = None  # bool [num_samples]; None = every sample servable
    waiting: set[str] = field(default_factory=set)  # engines that have not added it yet
    waiters: list[tuple[bytes, int]] = field(default_factory=list)  # (client, request_id) to Ack

    def pair_ranges(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Validated sample ids -> (starts, counts) per sample in request order, total pairs."""
        if len(ids) == 0:
            return ids, ids, 0
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_samples:
            bad = lo if lo < 0 else hi
            raise BadRequest(f"sample id {bad} out of range [0, {self.num_samples}) of dataset {self.name!r}")
        if self.loaded is not None:
            ok = self.loaded[ids]
            if not ok.all():
                first = int(ids[int(np.argmin(ok))])
                raise BadRequest(f"sample id {first} of dataset {self.name!r} is not loaded (LoadSamples)")
        starts = self.starts[ids]
        counts = self.ends[ids] - starts
        total = int(counts.sum())
        if self.has_empty:
            keep = counts > 0
            starts, counts = starts[keep], counts[keep]
        return starts, counts, total

    def set_loaded(self, ids: np.ndarray, value: bool) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise BadRequest(f"sample ids out of range [0, {self.num_samples}) of dataset {self.name!r}")
        if self.loaded is None:
            if value:
                return
            self.loaded = np.ones(self.num_samples, dtype=bool)
        self.loaded[ids] = value


def open_dataset(name: str, path: str, model_table_rows: tuple[int, ...] | None) -> DatasetEntry:
    """Open and validate a dataset directory; BadRequest names what is wrong."""
    from formats.dataset import Dataset, DatasetError

    try:
        ds = Dataset.open(Path(path))
    except (DatasetError, OSError, ValueError) as exc:
        raise BadRequest(f"dataset {name!r} at {path}: {exc}") from None
    if model_table_rows is not None:
        too_big = [t for t, (d, m) in enumerate(zip(ds.table_rows, model_table_rows)) if d > m]
        if too_big:
            t = too_big[0]
            raise BadRequest(f"dataset {name!r}: table {t} has ids up to {ds.table_rows[t]} but the model "
                             f"table has {model_table_rows[t]} rows")
    offsets = np.ascontiguousarray(ds.sample_offsets, dtype=np.int64)
    counts = np.diff(offsets)
    return DatasetEntry(name=name, path=str(path), starts=offsets[:-1].copy(), ends=offsets[1:].copy(),
                        num_samples=ds.num_samples, num_pairs=ds.num_pairs,
                        has_empty=bool(ds.num_samples and counts.min() == 0))


def model_table_rows(artifact: str) -> tuple[int, ...] | None:
    """The model's table sizes from the artifact's meta.json (None without an artifact)."""
    if not artifact:
        return None
    meta = Path(artifact) / "meta.json"
    if not meta.is_file():
        return None
    return tuple(int(r) for r in json.loads(meta.read_text())["table_rows"])


def artifact_meta_problem(artifact: str) -> str | None:
    """What is wrong with an artifact's meta.json, naming the file (None when it is readable and has
    a table_rows list); the full checks run when an engine opens the artifact."""
    meta = Path(artifact) / "meta.json"
    try:
        raw = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{meta}: unreadable ({exc})"
    rows = raw.get("table_rows") if isinstance(raw, dict) else None
    if not (isinstance(rows, list) and rows and all(
            isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in rows)):
        return f"{meta}: no valid 'table_rows' list of positive integers"
    return None
