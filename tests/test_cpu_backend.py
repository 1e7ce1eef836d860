"""CpuBackend: by-reference and by-value inference equal the int8 reference; errors are typed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.backend import EngineBackend
from engines.cpu_backend import CpuBackendError, CpuBackend
from engines.factory import create_backend
from formats.model_config import DLRMConfig
from engines.model import random_state_dict
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.dataset import write_dataset
from formats.frequencies import write_row_frequencies
from prepare.convert import convert

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=1000)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cpu")
    torch.save(random_state_dict(CONFIG, seed=5), d / "ckpt.pt")
    rng = np.random.default_rng(9)
    write_row_frequencies(d / "f.bin", [rng.random(r).astype(np.float32) for r in CONFIG.table_rows])
    convert(d / "ckpt.pt", d / "art", d / "f.bin")
    n = 400
    offsets = np.array([0, 100, 150, 400], dtype=np.int64)
    sparse = np.stack([rng.integers(0, r, size=n) for r in CONFIG.table_rows], axis=1).astype(np.int32)
    dense = np.log1p(rng.integers(0, 2000, size=(n, 13))).astype(np.float32)
    labels = rng.integers(0, 2, size=n).astype(np.float32)
    write_dataset(d / "ds", labels, dense, sparse, offsets, CONFIG.table_rows, "test")
    return d / "art", d / "ds"


def test_by_ref_equals_reference(paths: tuple[Path, Path]) -> None:
    art, ds = paths
    backend: EngineBackend = create_backend("cpu", art, gpu_part=0.3)
    assert isinstance(backend, CpuBackend) and backend.device_memory_bytes() == 0
    backend.register_dataset("test", ds)
    starts, counts = np.array([150, 10, 0]), np.array([5, 90, 0])
    out = np.full(200, -1, dtype=np.float32)
    stats = backend.infer_by_ref("test", starts, counts, out)
    data = backend.datasets["test"]  # type: ignore[attr-defined]
    idx = np.r_[150:155, 10:100]
    expected = Int8Reference(Artifact.open(art), 1.0).predict(data.dense[idx], data.sparse[idx])
    np.testing.assert_array_equal(out[:95], expected)
    assert (out[95:] == -1).all()
    # every row read from host memory, reported so (gpu_part only shapes the GPU engine's split)
    assert (stats.hot_lookups, stats.cold_lookups) == (0, 95 * 26)
    backend.close()


def test_by_value_and_errors(paths: tuple[Path, Path]) -> None:
    art, ds = paths
    backend = CpuBackend(art, 1.0)
    backend.register_dataset("test", ds)
    data = backend.datasets["test"]
    out = np.empty(7, dtype=np.float32)
    stats = backend.infer_by_value(np.asarray(data.dense[:7]), np.asarray(data.sparse[:7]), out)
    assert (stats.hot_lookups, stats.cold_lookups) == (0, 7 * 26)  # not "all hot" at gpu_part 1.0
    ref = np.empty(7, dtype=np.float32)
    backend.infer_by_ref("test", np.array([0]), np.array([7]), ref)
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(CpuBackendError, match="not registered"):
        backend.infer_by_ref("nope", np.array([0]), np.array([1]), out)
    with pytest.raises(CpuBackendError, match="outside dataset"):
        backend.infer_by_ref("test", np.array([399]), np.array([2]), out)
    bad = np.asarray(data.sparse[:2]).copy()
    bad[1, 0] = -1
    with pytest.raises(CpuBackendError, match="outside table 0"):
        backend.infer_by_value(np.asarray(data.dense[:2]), bad, out)
    with pytest.raises(CpuBackendError, match="at least 7"):
        backend.infer_by_value(np.asarray(data.dense[:7]), np.asarray(data.sparse[:7]), out[:3])
    with pytest.raises(ValueError, match="unknown device"):
        create_backend("tpu", art, gpu_part=1.0)


def test_check_ranges_refuses_bad_ranges() -> None:
    from formats.pairs import check_ranges

    starts, counts = check_ranges("d", [0, 5], [5, 5], 10)
    assert starts.dtype == counts.dtype == np.int64
    for s, c, why in (([0], [11], "outside"), ([-1], [1], "outside"), ([3], [-1], "outside"),
                      ([0, 1], [1], "one length")):
        with pytest.raises(ValueError, match=why):
            check_ranges("d", s, c, 10)
