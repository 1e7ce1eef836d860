"""engines/host_rows.py: which pages of the model file hold the cold rows (what a GPU engine with
host_rows = "shared" page-locks in place) and the view its kernel reads; the config key that asks for it;
on a GPU, the engine with shared cold rows against the int8 reference."""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from engines.host_rows import CUDA_HOST_REGISTER_READ_ONLY, HostRowsError, shared_cold_region, shared_cold_rows
from daemon.config import ConfigError, load_config
from wire.messages import HostRows


def _table(tmp_path: Path, rows: int, dim: int = 128) -> np.memmap:
    data = np.random.default_rng(3).integers(-128, 128, size=(rows, dim), dtype=np.int8)
    path = tmp_path / "embeddings.int8"
    data.tofile(path)
    return np.memmap(path, dtype=np.int8, mode="r", shape=(rows, dim))


@pytest.mark.parametrize("n_hot,n_cold", [(0, 1000), (33, 967), (32, 1), (999, 1), (500, 250)])
def test_region_covers_the_cold_rows_on_whole_pages(tmp_path: Path, n_hot: int, n_cold: int) -> None:
    emb = _table(tmp_path, 1000)
    region, cold = shared_cold_region(emb, n_hot, n_cold)
    page = mmap.PAGESIZE
    base = int(emb.ctypes.data)
    lo, hi = int(region.ctypes.data), int(region.ctypes.data) + region.nbytes
    assert (lo - base) % page == 0 and (hi - base) % page in (0, emb.nbytes % page)  # whole pages, or the file's end
    assert lo <= int(cold.ctypes.data) and int(cold.ctypes.data) + cold.nbytes <= hi  # the rows lie inside
    assert hi - lo < cold.nbytes + 2 * page  # and not much more
    assert np.shares_memory(cold, emb) and not cold.flags.writeable  # the file's pages, no copy
    np.testing.assert_array_equal(cold, np.asarray(emb)[n_hot:n_hot + n_cold])


def test_only_a_file_mapping_of_the_table_is_shared(tmp_path: Path) -> None:
    emb = _table(tmp_path, 100)
    with pytest.raises(HostRowsError):  # a private array: nothing to share
        shared_cold_region(np.asarray(emb).copy(), 10, 90)
    with pytest.raises(HostRowsError):
        shared_cold_region(emb, 10, 91)
    with pytest.raises(HostRowsError):
        shared_cold_region(emb, 10, 0)


class _Registry:
    """Stands in for HostRegistry where there is no CUDA (CI): records what it was asked to page-lock."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.calls: list[tuple[np.ndarray, int]] = []

    def register(self, buf: np.ndarray, flags: int = 0) -> bool:
        self.calls.append((buf, flags))
        return self.accept


def test_shared_rows_are_the_files_pages_or_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    emb = _table(tmp_path, 300)
    ok = _Registry(accept=True)
    cold = shared_cold_rows(ok, "cuda:0", emb, 100, 200)  # type: ignore[arg-type]
    assert cold is not None and cold.shape == (200, 128)
    np.testing.assert_array_equal(cold.numpy(), np.asarray(emb)[100:])
    assert np.shares_memory(cold.numpy(), emb)  # no copy: the mapping's own pages
    (region, flags), = ok.calls
    assert flags == CUDA_HOST_REGISTER_READ_ONLY and np.shares_memory(region, emb)
    refused = _Registry(accept=False)
    assert shared_cold_rows(refused, "cuda:0", emb, 100, 200) is None  # type: ignore[arg-type]
    assert "copying the cold rows instead" in caplog.text
    assert shared_cold_rows(ok, "cuda:0", np.asarray(emb).copy(), 100, 200) is None  # type: ignore[arg-type]


def test_the_config_key(tmp_path: Path) -> None:
    base = {"engines": "null"}  # no model needed: only the key is under test
    assert load_config(None, base, {}).host_rows is HostRows.PRIVATE
    cfg = tmp_path / "d.toml"
    cfg.write_text('host_rows = "shared"\nengines = ["null"]\n')
    assert load_config(cfg, {}, {}).host_rows is HostRows.SHARED
    assert load_config(None, base, {"DLRM_HOST_ROWS": "shared"}).host_rows is HostRows.SHARED
    with pytest.raises(ConfigError, match="host_rows"):
        load_config(None, base, {"DLRM_HOST_ROWS": "everywhere"})


def _mapped_file(address: int) -> str:
    """The file whose mapping holds `address` in this process ("" for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= address < hi:
            return parts[5].strip() if len(parts) > 5 else ""
    return ""


@pytest.mark.gpu
def test_gpu_engine_with_shared_cold_rows_matches_the_reference(tmp_path: Path) -> None:
    """Two engines on one GPU, both with the cold rows in the file's pages (page-locked twice, one copy),
    against the int8 reference; and the engine really reads the file's pages (no private copy)."""
    import torch

    from engines.gpu_backend import GpuBackend
    from engines.reference import Int8Reference
    from formats.artifact import Artifact
    from formats.model_config import DLRMConfig
    from test_daemon_support import make_cpu_artifact

    config = DLRMConfig.mlperf().scaled(2e-4, cap=4000)
    art_path = make_cpu_artifact(tmp_path, config, seed=9)
    art = Artifact.open(art_path)
    ref = Int8Reference(art, 0.3)
    rng = np.random.default_rng(2)
    dense = rng.random((3000, config.dense_features), dtype=np.float32)
    sparse = np.stack([rng.integers(0, r, 3000) for r in config.table_rows], axis=1).astype(np.int32)
    want = ref.predict(dense, sparse)
    engines = [GpuBackend("cuda:0", art_path, 0.3, max_batch_pairs=4096, host_rows="shared") for _ in range(2)]
    try:
        for eng in engines:
            assert eng.cold is not None and _mapped_file(eng.cold.data_ptr()).endswith("embeddings.int8")
            out = np.full(len(dense), np.nan, dtype=np.float32)
            stats = eng.infer_by_value(dense, sparse, out)
            np.testing.assert_allclose(out, want, atol=4e-3, rtol=0)  # test_gpu_backend.PRED_ATOL
            assert stats.cold_lookups > 0
    finally:
        for eng in engines:
            eng.close()
        torch.cuda.synchronize()

