"""Placement (hot/cold split + remap) and the int8 reference: placement never changes a prediction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from formats.model_config import DLRMConfig
from engines.model import random_state_dict
from engines.placement import Placement, hot_rows
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.frequencies import write_row_frequencies
from prepare.convert import convert

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=1000)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    d = tmp_path_factory.mktemp("pl")
    torch.save(random_state_dict(CONFIG, seed=7), d / "ckpt.pt")
    rng = np.random.default_rng(3)
    write_row_frequencies(d / "f.bin", [rng.zipf(1.5, size=r).astype(np.float32) for r in CONFIG.table_rows])
    convert(d / "ckpt.pt", d / "art", d / "f.bin")
    return Artifact.open(d / "art")


def inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = np.log1p(rng.integers(0, 3000, size=(n, 13))).astype(np.float32)
    sparse = np.stack([rng.integers(0, r, size=n) for r in CONFIG.table_rows], axis=1).astype(np.int32)
    return dense, sparse


def test_hot_rows_rule() -> None:
    assert hot_rows(10, 0.3) == 3  # float 0.3*10 is 3.0000000000000004: no spurious round-up
    assert hot_rows(10, 0.31) == 4 and hot_rows(7, 1.0) == 7 and hot_rows(1000, 1e-9) == 1
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="gpu_part"):
            hot_rows(10, bad)


def test_positions_and_counts(artifact: Artifact) -> None:
    p = Placement.from_artifact(artifact, 0.3)
    assert p.n_hot == int(np.ceil(0.3 * artifact.total_rows))
    _, sparse = inputs(200)
    pos = p.positions(sparse)
    assert pos.dtype == np.int64 and pos.shape == (200, 26)
    offsets = artifact.table_offsets
    for t in (0, 13, 25):  # independent per-table computation
        np.testing.assert_array_equal(pos[:, t], artifact.row_position[offsets[t] + sparse[:, t]])
    hot, cold = p.lookup_counts(pos)
    assert hot == int((pos < p.n_hot).sum()) and hot + cold == 200 * 26 and cold > 0
    assert Placement.from_artifact(artifact, 1.0).lookup_counts(pos) == (200 * 26, 0)
    with pytest.raises(ValueError, match="outside table 5"):
        bad = sparse.copy()
        bad[3, 5] = CONFIG.table_rows[5]
        p.check_sparse(bad)


def test_hot_tier_is_the_file_prefix(artifact: Artifact) -> None:
    # The most frequent rows (row_order's head) are exactly the hot ones: the split needs no rewrite.
    p = Placement.from_artifact(artifact, 0.3)
    hot_share_of_rows = p.n_hot / artifact.total_rows
    first = artifact.row_order[: p.n_hot]
    assert (artifact.row_position[first] < p.n_hot).all()
    assert 0.29 < hot_share_of_rows < 0.31


def test_placement_changes_no_prediction(artifact: Artifact) -> None:
    dense, sparse = inputs(300, seed=1)
    full = Int8Reference(artifact, 1.0).predict(dense, sparse)
    split = Int8Reference(artifact, 0.3)
    assert split.placement.lookup_counts(split.placement.positions(sparse))[1] > 0
    np.testing.assert_array_equal(split.predict(dense, sparse), full)
    np.testing.assert_array_equal(Int8Reference(artifact, 1e-6).predict(dense, sparse), full)


def test_int8_reference_dequantizes_rows(artifact: Artifact) -> None:
    ref = Int8Reference(artifact, 0.5)
    _, sparse = inputs(50, seed=2)
    rows = ref.gather(ref.placement.positions(sparse))
    g = artifact.table_offsets[:26] + sparse
    np.testing.assert_array_equal(rows, np.asarray(artifact.embeddings)[artifact.row_position[g]])
