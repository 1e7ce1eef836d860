"""The daemon with a real CPU engine: predictions equal the int8 reference, by reference and by value."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from wire.client import PipelinedClient
from wire.errors import BadRequest
from formats.model_config import DLRMConfig
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.dataset import Dataset
from test_daemon_support import DaemonProc, guarded, make_cpu_artifact, make_dataset

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=1000)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dcpu")
    make_cpu_artifact(d, CONFIG, seed=5)
    rng = np.random.default_rng(9)
    sizes = rng.integers(1, 40, size=60)
    make_dataset(d / "ds", sizes, seed=4, table_rows=CONFIG.table_rows)
    return d / "art", d / "ds"


def test_cpu_engine_matches_reference(paths: tuple[Path, Path]) -> None:
    art, ds_path = paths
    ds = Dataset.open(ds_path)
    ref = Int8Reference(Artifact.open(art), 1.0)
    d = DaemonProc({"engines": ["cpu"], "model": str(art), "datasets": {"ds": str(ds_path)},
                    "embedding_weights_on_gpu_part": 0.5, "max_batch_pairs": 256, "inflight_batches": 2,
                    "heartbeat_timeout_s": 5.0})
    try:
        d.wait_serving(60)
        rng = np.random.default_rng(2)
        queries = [rng.integers(0, ds.num_samples, size=int(rng.integers(1, 6))) for _ in range(20)]
        got: dict[int, np.ndarray] = {}
        errors: list[str] = []

        def by_value(seed: int) -> None:
            r = np.random.default_rng(seed)
            with d.client(60) as c:
                for _ in range(2):
                    idx = r.integers(0, ds.num_pairs, size=int(r.integers(1, 700)))
                    out = c.infer_by_value(ds.dense[idx], ds.sparse[idx])
                    if not np.allclose(out, ref.predict(ds.dense[idx], ds.sparse[idx]), rtol=1e-5, atol=1e-6):
                        errors.append("by value mismatch")

        threads = [threading.Thread(target=guarded(by_value, errors), args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        pc = PipelinedClient(d.endpoint)
        for rid, ids in enumerate(queries):
            pc.send_by_ref(rid, "ds", ids)
        while len(got) < len(queries):
            replies = pc.poll(30_000)
            assert replies, "no reply in 30 s"
            for rep in replies:
                assert rep.error is None, rep.error
                got[rep.request_id] = rep.predictions
        pc.close()
        for t in threads:
            t.join(120)
        assert not errors
        off = ds.sample_offsets
        for rid, ids in enumerate(queries):
            idx = np.concatenate([np.arange(off[s], off[s + 1]) for s in ids])
            np.testing.assert_allclose(got[rid], ref.predict(ds.dense[idx], ds.sparse[idx]), rtol=1e-5, atol=1e-6)
        with d.client() as c:
            with pytest.raises(BadRequest, match="outside"):  # the model's table sizes bound ids
                c.infer_by_value(np.zeros((1, 13), np.float32), np.full((1, 26), 10**6, np.int32))
            st = c.status()
        assert st["engines"][0]["state"] == "ready" and st["totals"]["queries"] >= 24
    finally:
        assert d.terminate() == 0, d.log()
