"""Artifact write/open: layout, remap permutation, and refusal of damaged artifacts naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from formats.model_config import DLRMConfig
from formats.artifact import Artifact, ArtifactError, sampled_sha256, write_artifact

CONFIG = DLRMConfig(table_rows=(5, 3, 7) + (2,) * 23, embedding_dim=16, bottom_mlp=(32, 16),
                    top_mlp=(8, 1))


def make(path: Path, order: np.ndarray | None = None, chunked: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    tables = [rng.integers(-127, 128, size=(r, 16)).astype(np.int8) for r in CONFIG.table_rows]
    mlp = {k: rng.standard_normal(s).astype(np.float32) for k, s in CONFIG.expected_shapes().items()
           if not k.startswith("emb_l.")}
    scales = np.arange(1, 27, dtype=np.float32) / 100
    if chunked:
        items = [(t, s, tab[s:s + 2]) for t, tab in enumerate(tables) for s in range(0, len(tab), 2)]
    else:
        items = list(enumerate(tables))
    write_artifact(path, CONFIG, iter(items), scales, mlp, order)
    return tables


@pytest.mark.parametrize("chunked", [False, True])
def test_round_trip_with_frequency_order(tmp_path: Path, chunked: bool) -> None:
    total = CONFIG.total_rows
    order = np.random.default_rng(5).permutation(total)
    tables = make(tmp_path / "a", order, chunked)
    art = Artifact.open(tmp_path / "a")
    assert art.config == CONFIG and art.total_rows == total
    assert art.table_offsets.tolist()[:4] == [0, 5, 8, 15]
    np.testing.assert_array_equal(art.row_order, order)
    np.testing.assert_array_equal(art.row_position[art.row_order], np.arange(total))
    everything = np.concatenate(tables)
    # File row p holds global row row_order[p]; global row g sits at file row row_position[g].
    np.testing.assert_array_equal(np.asarray(art.embeddings), everything[order])
    np.testing.assert_array_equal(art.embeddings[art.row_position[6]], tables[1][1])
    assert art.scales[25] == np.float32(0.26)
    assert set(art.mlp) == set(CONFIG.mlp_keys())
    art.verify_full()


def test_natural_order_default(tmp_path: Path) -> None:
    tables = make(tmp_path / "a")
    art = Artifact.open(tmp_path / "a")
    np.testing.assert_array_equal(art.row_order, np.arange(CONFIG.total_rows))
    np.testing.assert_array_equal(np.asarray(art.embeddings), np.concatenate(tables))


def test_refuses_incomplete_or_damaged(tmp_path: Path) -> None:
    make(tmp_path / "a")
    art_dir = tmp_path / "a"
    emb = art_dir / "embeddings.int8"
    good = emb.read_bytes()

    emb.write_bytes(good[:-16])
    with pytest.raises(ArtifactError, match=r"embeddings\.int8: truncated"):
        Artifact.open(art_dir)
    emb.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    with pytest.raises(ArtifactError, match=r"embeddings\.int8: bad checksum"):
        Artifact.open(art_dir)
    emb.write_bytes(good)
    Artifact.open(art_dir)

    (art_dir / "scales.npy").rename(art_dir / "x")
    with pytest.raises(ArtifactError, match=r"scales\.npy: missing file"):
        Artifact.open(art_dir)
    (art_dir / "x").rename(art_dir / "scales.npy")

    meta = json.loads((art_dir / "meta.json").read_text())
    (art_dir / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ArtifactError, match=r"meta\.json: wrong version 99"):
        Artifact.open(art_dir)
    (art_dir / "meta.json").unlink()
    with pytest.raises(ArtifactError, match=r"meta\.json: missing file"):
        Artifact.open(art_dir)


def test_verify_full_catches_what_sampling_misses(tmp_path: Path) -> None:
    make(tmp_path / "a")
    art = Artifact.open(tmp_path / "a")
    with open(tmp_path / "a" / "row_order.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    with pytest.raises(ArtifactError, match=r"row_order\.npy: bad checksum"):
        art.verify_full()


def test_sampled_hash_of_large_file_reads_64_blocks(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(100 << 20)
    before = sampled_sha256(big)
    with open(big, "r+b") as f:  # a byte inside the first sampled block changes the hash
        f.seek(10)
        f.write(b"\x01")
    assert sampled_sha256(big) != before


def test_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="permutation"):
        make(tmp_path / "a", np.zeros(CONFIG.total_rows, dtype=np.int64))
    with pytest.raises(ArtifactError, match="missing file"):
        Artifact.open(tmp_path / "a")  # the failed write left no meta.json
