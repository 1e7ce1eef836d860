"""formats.dataset: streaming writer round trip and validation errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from formats.dataset import Dataset, DatasetError, DatasetWriter, write_dataset
from formats.trace import read_trace

ROWS = [5] * 26


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, n).astype(np.float32), rng.random((n, 13), dtype=np.float32),
            rng.integers(0, 5, (n, 26)).astype(np.int32))


def test_streaming_round_trip(tmp_path: Path) -> None:
    chunks = [_data(n, s) for s, n in enumerate([7, 0, 30, 1])]
    with DatasetWriter(tmp_path / "ds", ROWS, "unit") as w:
        for c in chunks:
            w.append(*c)
        offsets = np.array([0, 10, 10, 38], dtype=np.int64)
        w.finish(offsets)
    ds = Dataset.open(tmp_path / "ds")
    assert ds.num_pairs == 38 and ds.num_samples == 3 and ds.table_rows == tuple(ROWS)
    for i, name in enumerate(["labels", "dense", "sparse"]):
        np.testing.assert_array_equal(getattr(ds, name), np.concatenate([c[i] for c in chunks]))
    assert isinstance(ds.dense, np.memmap)
    np.testing.assert_array_equal(ds.sample_offsets, offsets)
    np.testing.assert_array_equal(read_trace(tmp_path / "ds" / "trace.txt"), offsets)
    np.testing.assert_array_equal(ds.sample_sizes(), [10, 0, 28])
    ds.check_ids()
    # plain np.load agrees (the reserved header is a valid .npy header)
    assert np.load(tmp_path / "ds" / "sparse.npy").shape == (38, 26)


def test_empty_dataset(tmp_path: Path) -> None:
    write_dataset(tmp_path, *_data(0), np.zeros(1, np.int64), ROWS, "empty")
    ds = Dataset.open(tmp_path)
    assert ds.num_pairs == 0 and ds.num_samples == 0


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    w = DatasetWriter(tmp_path, ROWS, "x")
    lab, den, sp = _data(4)
    with pytest.raises(DatasetError, match="dense"):
        w.append(lab, den[:, :12], sp)
    sp[0, 3] = 5
    with pytest.raises(DatasetError, match="table_rows"):
        w.append(lab, den, sp)
    sp[0, 3] = 0
    w.append(lab, den, sp)
    with pytest.raises(DatasetError, match="num_pairs=4"):
        w.finish(np.array([0, 3]))
    w.abort()
    with pytest.raises(DatasetError, match="meta.json"):
        Dataset.open(tmp_path)  # unfinished: no meta.json


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "d", *_data(10), np.array([0, 4, 10]), ROWS, "unit")
    return tmp_path / "d"


def _edit_meta(path: Path, **kw: object) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta.update(kw)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,match", [
    ({"format": "other"}, "format"),
    ({"version": 2}, "version"),
    ({"num_pairs": 11}, "labels.npy: shape"),
    ({"table_rows": [5] * 25}, "table_rows"),
    ({"num_samples": 3}, "sample_offsets.npy: shape"),
])
def test_open_rejects_bad_meta(good: Path, edit: dict, match: str) -> None:
    _edit_meta(good, **edit)
    with pytest.raises(DatasetError, match=match):
        Dataset.open(good)


def test_open_rejects_bad_offsets_and_files(good: Path) -> None:
    np.save(good / "sample_offsets.npy", np.array([0, 6, 4, 10]))
    _edit_meta(good, num_samples=3)
    with pytest.raises(DatasetError, match="decrease"):
        Dataset.open(good)
    np.save(good / "sample_offsets.npy", np.array([1, 4, 10]))
    _edit_meta(good, num_samples=2)
    with pytest.raises(DatasetError, match="from 0 to num_pairs"):
        Dataset.open(good)
    np.save(good / "sample_offsets.npy", np.array([0, 4, 10]))
    np.save(good / "dense.npy", np.zeros((10, 13), np.float64))
    with pytest.raises(DatasetError, match="dense.npy: dtype"):
        Dataset.open(good)
    np.save(good / "dense.npy", np.zeros((10, 13), np.float32))
    (good / "sparse.npy").unlink()
    with pytest.raises(DatasetError, match="sparse.npy: missing"):
        Dataset.open(good)


def test_check_ids_finds_out_of_range(good: Path) -> None:
    sp = np.load(good / "sparse.npy")
    sp[7, 2] = 9
    np.save(good / "sparse.npy", sp)
    with pytest.raises(DatasetError, match="pair 7 table 2 id 9"):
        Dataset.open(good).check_ids(chunk_pairs=3)
