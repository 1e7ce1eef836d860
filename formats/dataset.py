"""The preprocessed dataset directory (docs/ARCHITECTURE.md, "Dataset").

Every array is a little-endian ``.npy`` file, opened memory-mapped so a 12 GB test set costs no
RAM until touched. ``DatasetWriter`` streams chunks straight into the final files: it reserves a
fixed 128-byte ``.npy`` header, appends raw rows, and rewrites the header with the final shape in
``finish`` -- nothing is held in memory and nothing is copied twice.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from formats.trace import write_trace

FORMAT = "dlrm-dataset"
VERSION = 1
DENSE_FEATURES = 13
SPARSE_FEATURES = 26

# name -> (dtype, trailing shape)
_ARRAYS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "labels": (np.dtype("<f4"), ()),
    "dense": (np.dtype("<f4"), (DENSE_FEATURES,)),
    "sparse": (np.dtype("<i4"), (SPARSE_FEATURES,)),
}
_HEADER_BYTES = 128  # multiple of 64 (npy alignment); room for shapes up to ~10**40 rows


class DatasetError(ValueError):
    """A dataset directory is missing, malformed or inconsistent; the message names the file."""


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header padded to exactly ``_HEADER_BYTES``."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (dtype.str, shape)
    body_len = _HEADER_BYTES - 10
    if len(text) + 1 > body_len:
        raise DatasetError(f"shape {shape} does not fit the reserved .npy header")
    body = text.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


def _open_array(path: Path, dtype: np.dtype, tail: tuple[int, ...], rows: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npy file ({exc})") from exc
    if arr.dtype != dtype:
        raise DatasetError(f"{path}: dtype {arr.dtype}, expected {dtype}")
    if arr.shape != (rows, *tail):
        raise DatasetError(f"{path}: shape {arr.shape}, expected {(rows, *tail)}")
    return arr


@dataclass
class Dataset:
    """A validated, memory-mapped dataset. Pairs of sample ``s``: ``[offsets[s], offsets[s+1])``."""

    path: Path
    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    sample_offsets: np.ndarray
    num_pairs: int
    num_samples: int
    table_rows: tuple[int, ...]
    source: str
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: Path | str) -> "Dataset":
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"{meta_path}: missing (not a dataset directory, or unfinished)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{meta_path}: unreadable JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DatasetError(f"{meta_path}: format is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise DatasetError(f"{meta_path}: version {meta.get('version')!r}, expected {VERSION}")
        try:
            num_pairs = int(meta["num_pairs"])
            num_samples = int(meta["num_samples"])
            table_rows = tuple(int(r) for r in meta["table_rows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{meta_path}: bad or missing field ({exc})") from exc
        if len(table_rows) != SPARSE_FEATURES or min(table_rows) <= 0:
            raise DatasetError(f"{meta_path}: table_rows must be {SPARSE_FEATURES} positive ints")
        if num_pairs < 0 or num_samples < 0:
            raise DatasetError(f"{meta_path}: negative num_pairs or num_samples")
        arrays = {
            name: _open_array(path / f"{name}.npy", dt, tail, num_pairs)
            for name, (dt, tail) in _ARRAYS.items()
        }
        offsets = _open_array(path / "sample_offsets.npy", np.dtype("<i8"), (), num_samples + 1)
        offsets = np.asarray(offsets)
        if offsets[0] != 0 or offsets[-1] != num_pairs:
            raise DatasetError(
                f"{path / 'sample_offsets.npy'}: must run from 0 to num_pairs={num_pairs}, "
                f"got {int(offsets[0])}..{int(offsets[-1])}"
            )
        if num_samples and bool(np.any(np.diff(offsets) < 0)):
            raise DatasetError(f"{path / 'sample_offsets.npy'}: offsets decrease")
        return cls(path, arrays["labels"], arrays["dense"], arrays["sparse"], offsets,
                   num_pairs, num_samples, table_rows, str(meta.get("source", "")), meta)

    def sample_sizes(self) -> np.ndarray:
        """Pairs per sample, int64 ``[num_samples]``."""
        return np.diff(self.sample_offsets)

    def check_ids(self, chunk_pairs: int = 1 << 20) -> None:
        """Full scan: every sparse id lies in ``[0, table_rows[t])`` (not done by ``open``: slow)."""
        rows = np.asarray(self.table_rows, dtype=np.int64)
        for start in range(0, self.num_pairs, chunk_pairs):
            block = np.asarray(self.sparse[start:start + chunk_pairs])
            bad = (block < 0) | (block >= rows)
            if bad.any():
                r, t = np.argwhere(bad)[0]
                raise DatasetError(
                    f"{self.path / 'sparse.npy'}: pair {start + int(r)} table {int(t)} id "
                    f"{int(block[r, t])} outside [0, {int(rows[t])})"
                )


class DatasetWriter:
    """Streams pairs into a dataset directory; ``finish`` writes offsets, trace and meta.json.

    ``meta.json`` is written last, so an interrupted write never opens as a dataset.
    """

    def __init__(self, path: Path | str, table_rows: Sequence[int], source: str) -> None:
        self.path = Path(path)
        self.table_rows = tuple(int(r) for r in table_rows)
        if len(self.table_rows) != SPARSE_FEATURES or min(self.table_rows) <= 0:
            raise DatasetError(f"table_rows must be {SPARSE_FEATURES} positive ints")
        self.source = source
        self.num_pairs = 0
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "meta.json").unlink(missing_ok=True)
        self._files: dict[str, BinaryIO] = {}
        for name, (dt, tail) in _ARRAYS.items():
            f = open(self.path / f"{name}.npy", "wb")
            f.write(_npy_header(dt, (0, *tail)))
            self._files[name] = f

    def append(self, labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> None:
        n = len(labels)
        parts = {"labels": labels, "dense": dense, "sparse": sparse}
        for name, (dt, tail) in _ARRAYS.items():
            arr = np.asarray(parts[name])
            if arr.shape != (n, *tail):
                raise DatasetError(f"append: {name} has shape {arr.shape}, expected {(n, *tail)}")
            if name == "sparse" and n and (int(arr.min()) < 0
                                           or bool(np.any(arr.max(axis=0) >= self.table_rows))):
                raise DatasetError("append: sparse ids outside [0, table_rows)")
            self._files[name].write(np.ascontiguousarray(arr, dtype=dt).tobytes())
        self.num_pairs += n

    def finish(self, sample_offsets: np.ndarray) -> Path:
        offsets = np.asarray(sample_offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != self.num_pairs:
            raise DatasetError(
                f"finish: sample_offsets must run from 0 to num_pairs={self.num_pairs}"
            )
        if bool(np.any(np.diff(offsets) < 0)):
            raise DatasetError("finish: sample_offsets decrease")
        for name, (dt, tail) in _ARRAYS.items():
            f = self._files[name]
            f.seek(0)
            f.write(_npy_header(dt, (self.num_pairs, *tail)))
            f.close()
        self._files = {}
        np.save(self.path / "sample_offsets.npy", offsets.astype("<i8"), allow_pickle=False)
        write_trace(self.path / "trace.txt", offsets)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "num_pairs": self.num_pairs,
            "num_samples": len(offsets) - 1,
            "table_rows": list(self.table_rows),
            "source": self.source,
        }
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.path / "meta.json")
        return self.path

    def abort(self) -> None:
        """Close files without writing meta.json (the directory stays unopenable)."""
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._files:
            self.abort()


def write_dataset(path: Path | str, labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray,
                  sample_offsets: np.ndarray, table_rows: Sequence[int], source: str) -> Path:
    """Convenience for small in-memory datasets (tests, synthetic data)."""
    with DatasetWriter(path, table_rows, source) as w:
        w.append(labels, dense, sparse)
        return w.finish(sample_offsets)
