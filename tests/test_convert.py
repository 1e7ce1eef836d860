"""`dlrm-prepare model`: checkpoint -> artifact, frequency order, and the models on both sides agree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from formats.model_config import DLRMConfig
from engines.model import random_state_dict
from engines.reference import Fp32Reference, Int8Reference
from formats.artifact import Artifact
from formats.frequencies import write_row_frequencies
from prepare.convert import convert

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=2000)  # 26 tables, real dims, ~9k rows


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, list[np.ndarray]]:
    d = tmp_path_factory.mktemp("conv")
    state = random_state_dict(CONFIG, seed=11)
    torch.save({"state_dict": state}, d / "ckpt.pt")
    rng = np.random.default_rng(2)
    counts = [rng.integers(0, 50, size=r).astype(np.float32) for r in CONFIG.table_rows]
    write_row_frequencies(d / "freq.bin", counts)
    convert(d / "ckpt.pt", d / "art", d / "freq.bin")
    return d / "ckpt.pt", d / "art", state, counts


def test_rows_quantized_and_permuted(converted) -> None:
    _, art_dir, state, counts = converted
    art = Artifact.open(art_dir)
    assert art.config == CONFIG
    for t in (0, 5, 17, 25):
        w = state[f"emb_l.{t}.weight"].numpy()
        scale = np.float32(np.abs(w).max()) / np.float32(127.5)
        assert art.scales[t] == scale
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        g = art.table_offsets[t] + np.arange(CONFIG.table_rows[t])
        np.testing.assert_array_equal(art.embeddings[art.row_position[g]], q)
    # Frequency order: normalized per-table counts never increase along the file.
    norm = np.concatenate([c / c.sum() for c in counts])
    along_file = norm[art.row_order]
    assert (np.diff(along_file) <= 1e-12).all()
    assert art.row_order[0] == int(np.argmax(norm))
    np.testing.assert_array_equal(art.mlp["top_l.8.weight"], state["top_l.8.weight"].numpy())


def test_round_trip_predictions(converted) -> None:
    ckpt, art_dir, state, _ = converted
    rng = np.random.default_rng(4)
    n = 512
    dense = np.log1p(rng.integers(0, 5000, size=(n, 13))).astype(np.float32)
    sparse = np.stack([rng.integers(0, r, size=n) for r in CONFIG.table_rows], axis=1).astype(np.int32)
    original = Fp32Reference(state).predict(dense, sparse)
    from_file = Fp32Reference(ckpt).predict(dense, sparse)
    np.testing.assert_allclose(from_file, original, rtol=0, atol=1e-5)
    int8 = Int8Reference(Artifact.open(art_dir)).predict(dense, sparse)
    # Measured on this random model (4096 pairs, seeds 11/12): max |int8 - fp32| 1.5e-3 / 1.7e-3,
    # mean 4e-4 (probabilities 0.07..0.30). Bound: 5e-3.
    assert np.abs(int8 - original).max() < 5e-3
    assert np.abs(int8 - original).max() > 0  # really quantized


def test_table_size_mismatch_refused(tmp_path: Path, converted) -> None:
    ckpt, _, _, counts = converted
    write_row_frequencies(tmp_path / "f.bin", counts[:25] + [np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="do not match"):
        convert(ckpt, tmp_path / "art", tmp_path / "f.bin")


def test_cli_model_verify_and_errors(tmp_path: Path, converted, capsys, monkeypatch) -> None:
    from prepare import cli

    ckpt, _, _, _ = converted
    assert cli.main(["model", "--checkpoint", str(ckpt), "--out", str(tmp_path / "art")]) == 0
    art = Artifact.open(tmp_path / "art")
    np.testing.assert_array_equal(art.row_order, np.arange(CONFIG.total_rows))  # no frequencies
    assert cli.main(["verify", str(tmp_path / "art")]) == 0
    assert "OK" in capsys.readouterr().out
    with open(tmp_path / "art" / "mlp.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    assert cli.main(["verify", str(tmp_path / "art")]) == 1
    assert "mlp.npz: bad checksum" in capsys.readouterr().err
    assert cli.main(["model", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "none.pt: no such checkpoint" in capsys.readouterr().err
    monkeypatch.setitem(cli.SUBCOMMANDS, "eval", ("prepare.not_written_yet", "x"))
    assert cli.main(["eval", "--help"]) == 2
    assert "prepare.not_written_yet cannot be imported" in capsys.readouterr().err
    assert cli.main(["bogus"]) == 2
