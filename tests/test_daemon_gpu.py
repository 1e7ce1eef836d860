"""The daemon with GPU engines (marker gpu: `make test-gpu` on the device machine): by-reference and
by-value answers equal the int8 reference within the GPU backend's fp16 tolerance, on every GPU, with
by-reference predictions in the replies and written into the client's output region."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wire.client import PipelinedClient
from wire.output_region import OutputRegion
from formats.model_config import DLRMConfig
from engines.model import random_state_dict
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.dataset import Dataset
from formats.frequencies import write_row_frequencies
from prepare.convert import convert
from test_daemon_support import DaemonProc, make_dataset

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=1000)
PRED_ATOL = 4e-3  # as tests/test_gpu_backend.py (fp16 MLP)


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_part", [1.0, 0.3])
def test_gpu_engines_match_reference(tmp_path: Path, gpu_part: float) -> None:
    torch.save(random_state_dict(CONFIG, seed=5), tmp_path / "ckpt.pt")
    rng = np.random.default_rng(9)
    write_row_frequencies(tmp_path / "f.bin", [rng.random(r).astype(np.float32) for r in CONFIG.table_rows])
    convert(tmp_path / "ckpt.pt", tmp_path / "art", tmp_path / "f.bin")
    make_dataset(tmp_path / "ds", rng.integers(100, 700, size=400), seed=4, table_rows=CONFIG.table_rows)
    ds = Dataset.open(tmp_path / "ds")
    ref = Int8Reference(Artifact.open(tmp_path / "art"), 1.0)
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    d = DaemonProc({"engines": devices, "model": str(tmp_path / "art"), "datasets": {"ds": str(tmp_path / "ds")},
                    "embedding_weights_on_gpu_part": gpu_part, "max_batch_pairs": 65536,
                    "heartbeat_timeout_s": 5.0})
    region: OutputRegion | None = None
    try:
        st = d.wait_serving(300)
        assert [e["state"] for e in st["engines"]] == ["ready"] * len(devices)
        queries = [rng.integers(0, ds.num_samples, size=int(rng.integers(1, 300))) for _ in range(60)]
        off = ds.sample_offsets
        region = OutputRegion(int(sum(off[ids + 1].sum() - off[ids].sum() for ids in queries)))
        owner = d.client(60)  # the region is registered while its registering client stays connected
        owner.register_output(str(region.path), region.num_predictions)
        pc = PipelinedClient(d.endpoint)
        placed: dict[int, tuple[int, int]] = {}
        at = 0
        for rid, ids in enumerate(queries):
            if rid % 2:  # every other query into the region (the engines write it), the rest in replies
                n = int(off[ids + 1].sum() - off[ids].sum())
                pc.send_by_ref(rid, "ds", ids, None, str(region.path), at)
                placed[rid] = (at, n)
                at += n
            else:
                pc.send_by_ref(rid, "ds", ids)
        got: dict[int, np.ndarray | None] = {}
        while len(got) < len(queries):
            replies = pc.poll(60_000)
            assert replies, "no reply in 60 s"
            for rep in replies:
                assert rep.error is None, rep.error
                assert rep.written == (rep.request_id in placed)
                got[rep.request_id] = region.view(*placed[rep.request_id]) if rep.written else rep.predictions
        pc.close()
        owner.close()
        for rid, ids in enumerate(queries[:12]):
            idx = np.concatenate([np.arange(off[s], off[s + 1]) for s in ids])
            np.testing.assert_allclose(got[rid], ref.predict(ds.dense[idx], ds.sparse[idx]), atol=PRED_ATOL, rtol=0)
        idx = rng.integers(0, ds.num_pairs, size=5000)
        with d.client(60) as c:
            out = c.infer_by_value(ds.dense[idx], ds.sparse[idx])
            st = c.status()
        np.testing.assert_allclose(out, ref.predict(ds.dense[idx], ds.sparse[idx]), atol=PRED_ATOL, rtol=0)
        assert all(e["device_memory_bytes"] > 0 and e["gpu_part"] == gpu_part for e in st["engines"])
    finally:
        assert d.terminate(60) == 0, d.log()
        if region is not None:
            region.close()
