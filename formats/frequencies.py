"""``row_frequencies.bin`` (REFERENCE): int32 table count, then per table an int32 row count followed by
one float32 access count per row; and the global frequency order used for the hot/cold split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


class FrequencyError(ValueError):
    """A row_frequencies.bin file is truncated or inconsistent; the message names the file."""


def write_row_frequencies(path: Path | str, counts: Sequence[np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(np.int32(len(counts)).astype("<i4").tobytes())
        for c in counts:
            c = np.asarray(c)
            if c.ndim != 1:
                raise FrequencyError(f"{path}: counts must be 1-D per table, got shape {c.shape}")
            f.write(np.int32(len(c)).astype("<i4").tobytes())
            f.write(np.ascontiguousarray(c, dtype="<f4").tobytes())


def read_row_frequencies(path: Path | str) -> list[np.ndarray]:
    """Per-table float32 counts. Reads into memory (187 M rows -> 750 MB)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        raw = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as exc:
        raise FrequencyError(f"{path}: unreadable ({exc})") from exc
    pos = 0

    def take_i32(what: str) -> int:
        nonlocal pos
        if pos + 4 > size:
            raise FrequencyError(f"{path}: truncated at byte {pos} reading {what}")
        v = int(raw[pos:pos + 4].view("<i4")[0])
        pos += 4
        return v

    n_tables = take_i32("table count")
    if n_tables < 0:
        raise FrequencyError(f"{path}: negative table count {n_tables}")
    out: list[np.ndarray] = []
    for t in range(n_tables):
        rows = take_i32(f"row count of table {t}")
        if rows < 0 or pos + 4 * rows > size:
            raise FrequencyError(f"{path}: table {t} claims {rows} rows, file too short")
        out.append(np.array(raw[pos:pos + 4 * rows].view("<f4"), dtype=np.float32))
        pos += 4 * rows
    if pos != size:
        raise FrequencyError(f"{path}: {size - pos} trailing bytes after {n_tables} tables")
    return out


def frequency_order(counts: Sequence[np.ndarray]) -> np.ndarray:
    """Global rows (``table_offset[t] + id``, int64), most frequent first (REFERENCE hot/cold rule).

    Counts are normalised per table (count / table total; an all-zero table stays zero) so that
    small, heavily hit tables compete fairly with huge ones. Ties keep the natural global order
    (stable sort), so the result is deterministic.
    """
    parts = []
    for c in counts:
        c = np.asarray(c, dtype=np.float64)
        total = c.sum()
        parts.append(c / total if total > 0 else np.zeros_like(c))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    norm = np.concatenate(parts)
    del parts
    np.negative(norm, out=norm)
    return np.argsort(norm, kind="stable").astype(np.int64, copy=False)
