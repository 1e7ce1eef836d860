"""dlrm-prepare eval end to end: artifact + checkpoint + dataset -> predictions and AUC."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from engines.model import DLRM, random_state_dict
from formats.model_config import DLRMConfig
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.dataset import Dataset, write_dataset
from formats.trace import reference_sample_sizes
from prepare.cli import main as cli_main
from prepare.convert import convert

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=500)
N = 500


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ev")
    torch.save(random_state_dict(CONFIG, seed=3), d / "ckpt.pt")
    convert(d / "ckpt.pt", d / "art")
    rng = np.random.default_rng(0)
    dense = np.log1p(rng.integers(0, 1000, (N, 13))).astype(np.float32)
    sparse = np.stack([rng.integers(0, r, N) for r in CONFIG.table_rows], 1).astype(np.int32)
    labels = rng.integers(0, 2, N).astype(np.float32)
    write_dataset(d / "ds", labels, dense, sparse, reference_sample_sizes(N), CONFIG.table_rows, "unit")
    return d


def test_int8_and_fp32(setup: Path, capsys: pytest.CaptureFixture) -> None:
    d = setup
    ds = Dataset.open(d / "ds")
    assert cli_main(["eval", "--model", str(d / "art"), "--dataset", str(d / "ds"),
                     "--precision", "int8", "--out", str(d / "p8.npy"), "--batch-pairs", "333"]) == 0
    p8 = np.load(d / "p8.npy")
    expect8 = Int8Reference(Artifact.open(d / "art")).predict(np.asarray(ds.dense), np.asarray(ds.sparse))
    np.testing.assert_allclose(p8, expect8, rtol=1e-5, atol=1e-6)
    printed = float(capsys.readouterr().out.split("AUC ")[1].split()[0])
    assert printed == pytest.approx(roc_auc_score(ds.labels, p8), abs=1e-6)

    assert cli_main(["eval", "--checkpoint", str(d / "ckpt.pt"), "--model", str(d / "art"),
                     "--dataset", str(d / "ds"), "--precision", "fp32", "--out", str(d / "p32.npy"),
                     "--samples", "3"]) == 0
    p32 = np.load(d / "p32.npy")
    n3 = int(ds.sample_offsets[3])
    model = DLRM(CONFIG)
    model.load_state_dict(torch.load(d / "ckpt.pt"))
    with torch.no_grad():
        ref = model(torch.from_numpy(np.array(ds.dense[:n3])),
                    torch.from_numpy(np.asarray(ds.sparse[:n3], dtype=np.int64))).numpy()
    assert p32.shape == (n3,) and p32.dtype == np.float32
    np.testing.assert_allclose(p32, ref, rtol=1e-5, atol=1e-6)
    # int8 stays close to fp32 on the same pairs
    assert np.abs(p32 - p8[:n3]).max() < 0.05


def test_errors(setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = setup
    assert cli_main(["eval", "--dataset", str(d / "ds"), "--precision", "int8"]) == 1
    assert "needs --model" in capsys.readouterr().err
    assert cli_main(["eval", "--model", str(d / "art"), "--dataset", str(d / "ds"),
                     "--precision", "fp32"]) == 1
    assert "needs --checkpoint" in capsys.readouterr().err
    big = [r + 5 for r in CONFIG.table_rows]
    sparse = np.zeros((4, 26), np.int32)
    sparse[2, 7] = big[7] - 1
    write_dataset(tmp_path / "b", np.zeros(4, np.float32), np.zeros((4, 13), np.float32), sparse,
                  np.array([0, 4]), big, "too big")
    assert cli_main(["eval", "--model", str(d / "art"), "--dataset", str(tmp_path / "b")]) == 1
    assert "pair 2 has id" in capsys.readouterr().err


def test_criteo_to_eval_end_to_end(setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """TSV -> `dlrm-prepare criteo --model` -> `dlrm-prepare eval`."""
    rng = np.random.default_rng(4)
    hexes = rng.integers(0, 2 ** 32, (120, 26))
    lines = ["\t".join([str(i % 2)] + [str(int(v)) for v in rng.integers(-1, 500, 13)]
                       + ["%08x" % int(h) for h in row]) for i, row in enumerate(hexes)]
    (tmp_path / "day_23").write_text("\n".join(lines) + "\n")
    assert cli_main(["criteo", str(tmp_path / "day_23"), "--model", str(setup / "art"),
                     "--out", str(tmp_path / "ds")]) == 0
    ds = Dataset.open(tmp_path / "ds")
    np.testing.assert_array_equal(ds.sparse, hexes % np.array(CONFIG.table_rows))
    assert ds.table_rows == CONFIG.table_rows
    assert cli_main(["eval", "--model", str(setup / "art"), "--dataset", str(tmp_path / "ds"),
                     "--out", str(tmp_path / "p.npy")]) == 0
    expect = Int8Reference(Artifact.open(setup / "art")).predict(np.asarray(ds.dense), np.asarray(ds.sparse))
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expect, rtol=1e-5, atol=1e-6)
    printed = float(capsys.readouterr().out.split("AUC ")[1].split()[0])
    assert printed == pytest.approx(roc_auc_score(ds.labels, expect), abs=1e-5)
