"""The engine spec's max_batch_pairs and slots reach the GPU backend (which otherwise cuts batches at
65,536 and keeps its own default of batches in flight).

No GPU here, so GpuBackend is replaced by a recorder: the only stand-in in the daemon tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")


def test_factory_passes_max_batch_pairs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import engines.gpu_backend as gb
    from engines.factory import create_backend
    from wire.messages import MlpPrecision

    seen: list[tuple[Any, ...]] = []

    class Recorder:
        def __init__(self, device: str, artifact: Any, gpu_part: float = 1.0, max_batch_pairs: int = 65536,
                     inflight: int = 4, mlp_precision: str = "default") -> None:
            seen.append((device, artifact, gpu_part, max_batch_pairs, inflight, mlp_precision))

    monkeypatch.setattr(gb, "GpuBackend", Recorder)
    create_backend("cuda:1", tmp_path, gpu_part=0.3, max_batch_pairs=262144, inflight=3,
                   mlp_precision=MlpPrecision.INT8)
    assert seen == [("cuda:1", tmp_path, 0.3, 262144, 3, "int8")]
    create_backend("cuda:0", tmp_path, gpu_part=1.0)  # no value: the backend's own defaults
    assert seen[-1] == ("cuda:0", tmp_path, 1.0, 65536, 4, "default")
