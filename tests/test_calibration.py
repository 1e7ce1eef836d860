"""int8 top-MLP calibration (prepare/calibrate.py), its artifact file, and `eval --precision int8-mlp`."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prepare.calibrate import METHODS, CalibrationError, TailStats, calibrate, with_method  # noqa: E402
from formats.model_config import DLRMConfig  # noqa: E402
from engines.model import random_state_dict  # noqa: E402
from engines.reference import Int8MlpReference, Int8Reference  # noqa: E402
from formats.artifact import CALIBRATION, Artifact, ArtifactError, read_calibration, write_calibration  # noqa: E402
from formats.dataset import Dataset, write_dataset  # noqa: E402
from formats.trace import reference_sample_sizes  # noqa: E402
from engines.int8_top_mlp import alloc_scratch, top_mlp_int8, top_mlp_int8_reference  # noqa: E402
from formats.auc import roc_auc  # noqa: E402
from prepare.cli import main as cli_main  # noqa: E402
from prepare.convert import convert  # noqa: E402

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=500)
N = 600


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cal")
    torch.save(random_state_dict(CONFIG, seed=5), d / "ckpt.pt")
    convert(d / "ckpt.pt", d / "art")
    for name, seed in (("calib", 1), ("test", 2)):
        rng = np.random.default_rng(seed)
        dense = np.log1p(rng.integers(0, 1000, (N, 13))).astype(np.float32)
        sparse = np.stack([rng.integers(0, r, N) for r in CONFIG.table_rows], 1).astype(np.int32)
        labels = rng.integers(0, 2, N).astype(np.float32)
        write_dataset(d / name, labels, dense, sparse, reference_sample_sizes(N), CONFIG.table_rows, "unit")
    return d


def _fp32_activations(art: Artifact, ds: Dataset) -> list[np.ndarray]:
    """ReLU outputs of top layers 1..3 in float64 numpy (independent of the torch code under test)."""
    x = Int8Reference(art).top_input(np.asarray(ds.dense), np.asarray(ds.sparse)).double().numpy()
    acts = []
    for i in range(len(CONFIG.top_mlp) - 2):
        x = np.maximum(x @ art.mlp[f"top_l.{2 * i}.weight"].T.astype(np.float64) + art.mlp[f"top_l.{2 * i}.bias"], 0)
        acts.append(x)
    return acts


def test_tail_stats_exact_percentiles() -> None:
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
    values = rng.exponential(1.0, 200_003).astype(np.float32)
    st = TailStats(keep=300)
    for chunk in np.array_split(values, 7):
        st.update(torch.from_numpy(chunk))
    desc = np.sort(values)[::-1]
    assert st.max() == desc[0]
    for p in (99.9, 99.99):
        rank = int(np.ceil(values.size * (100 - p) / 100)) - 1
        assert st.percentile(p) == desc[rank]
    with pytest.raises(CalibrationError, match="largest values"):
        st.percentile(99.0)


def test_calibrate_round_trip(setup: Path) -> None:
    art = Artifact.open(setup / "art")
    assert art.calibration is None
    ds = Dataset.open(setup / "calib")
    cal = calibrate(art, ds, pairs=500, method="max", batch_pairs=128)
    assert cal.pairs == 500 and set(cal.observed) == set(METHODS)
    acts = _fp32_activations(art, Dataset.open(setup / "calib"))
    sub = [a[:500] for a in acts]
    for i, name in enumerate(("top_l.2", "top_l.4", "top_l.6")):
        assert cal.amax[name] == pytest.approx(sub[i].max(), rel=1e-5)
        assert cal.observed["p99.9"][name] <= cal.amax[name]
    write_calibration(setup / "art", cal)
    back = Artifact.open(setup / "art").calibration
    assert back == cal
    assert with_method(back, "p99.99").amax == cal.observed["p99.99"]
    # The artifact's own checks are untouched by the optional file.
    Artifact.open(setup / "art").verify_full()
    (setup / "art" / CALIBRATION).unlink()


def test_calibration_file_errors(setup: Path, tmp_path: Path) -> None:
    art_dir = tmp_path / "art"
    shutil.copytree(setup / "art", art_dir)
    art = Artifact.open(art_dir)
    cal = calibrate(art, Dataset.open(setup / "calib"), pairs=64)
    write_calibration(art_dir, cal)
    raw = json.loads((art_dir / CALIBRATION).read_text())
    for change, message in (({"mlp_sha256": "0" * 64}, "stale"), ({"version": 9}, "wrong version"),
                            ({"amax": {"top_l.2": -1.0}}, "positive"), ({"format": "x"}, "format")):
        (art_dir / CALIBRATION).write_text(json.dumps({**raw, **change}))
        with pytest.raises(ArtifactError, match=message):
            read_calibration(art_dir)
    (art_dir / CALIBRATION).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        Artifact.open(art_dir).calibration
    with pytest.raises(CalibrationError, match="unknown method"):
        calibrate(art, Dataset.open(setup / "calib"), method="p50")


def test_cli_calibrate_and_eval_int8_mlp(setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    art_dir = tmp_path / "art"
    shutil.copytree(setup / "art", art_dir)
    test_ds = setup / "test"
    assert cli_main(["eval", "--model", str(art_dir), "--dataset", str(test_ds), "--precision", "int8-mlp"]) == 1
    assert "no calibration.json" in capsys.readouterr().err
    assert cli_main(["calibrate", "--model", str(art_dir), "--dataset", str(setup / "calib"),
                     "--pairs", "400", "--batch-pairs", "100"]) == 0
    assert "p99.99" in capsys.readouterr().out
    assert cli_main(["eval", "--model", str(art_dir), "--dataset", str(test_ds), "--precision", "int8-mlp",
                     "--out", str(tmp_path / "p.npy"), "--batch-pairs", "250"]) == 0
    printed = float(capsys.readouterr().out.split("AUC ")[1].split()[0])
    got = np.load(tmp_path / "p.npy")
    ds = Dataset.open(test_ds)
    art = Artifact.open(art_dir)
    expect = Int8MlpReference(art).predict(np.asarray(ds.dense), np.asarray(ds.sparse))
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    assert printed == pytest.approx(roc_auc(np.asarray(ds.labels), got), abs=1e-6)
    int8 = Int8Reference(art).predict(np.asarray(ds.dense), np.asarray(ds.sparse))
    assert np.abs(got - int8).max() < 0.05, "the int8 MLP must track the fp32 MLP on the same tables"
    assert np.abs(got - int8).max() > 0, "the int8 MLP path must really be quantized"
    # Another recorded statistic, without re-calibrating.
    assert cli_main(["eval", "--model", str(art_dir), "--dataset", str(test_ds), "--precision", "int8-mlp",
                     "--calibration-method", "max", "--samples", "2"]) == 0


def test_kernel_chain_on_artifact_matches_eval_reference(setup: Path) -> None:
    """The Triton chain (interpreter on the CPU) on real top-MLP inputs of the artifact, default tiles."""
    art = Artifact.open(setup / "art")
    ds = Dataset.open(setup / "calib")
    cal = calibrate(art, ds, pairs=300)
    ref = Int8MlpReference(art, calibration=cal)
    n = 150
    x = ref.top_input(np.asarray(ds.dense[:n]), np.asarray(ds.sparse[:n]))
    x = torch.nn.functional.pad(x, (0, ref.quant.in_width_padded - x.shape[1])).half()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = ref.quant.to(dev)
    pred = top_mlp_int8(q, x.to(dev), scratch=alloc_scratch(q, n, dev)).cpu()
    expect = top_mlp_int8_reference(ref.quant, x)
    # Layer 1 sums fp16 products in fp32 in another order than the float64 reference: an activation on a
    # rounding boundary may move one int8 step; wrong scales or layouts move predictions by far more.
    assert float((pred - expect).abs().max()) < 5e-3
    assert float((pred - expect).abs().mean()) < 1e-4


@pytest.mark.slow
def test_demo_int8_mlp_keeps_999_of_fp32_auc(demo_data, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             capsys: pytest.CaptureFixture) -> None:
    """Accuracy target (REFERENCE: 99.9% of fp32 AUC) on the demo's planted model: calibrate on a training
    day, evaluate the first 150 samples of the test day (full-day figures: BENCHMARKS.md)."""
    syn, artifact, dataset = demo_data.synthetic, demo_data.artifact, demo_data.dataset
    manifest = json.loads((syn / "manifest.json").read_text())
    calib_ds = tmp_path / "calib_ds"
    assert cli_main(["criteo", str(syn / manifest["train_days"][-1]), "--model",
                     str(artifact), "--out", str(calib_ds)]) == 0
    art_dir = tmp_path / "art"
    shutil.copytree(artifact, art_dir)
    assert cli_main(["calibrate", "--model", str(art_dir), "--dataset", str(calib_ds), "--pairs", "30000"]) == 0
    capsys.readouterr()
    aucs = {}
    for precision, extra in (("fp32", ["--checkpoint", str(syn / "model.pt")]),
                             ("int8", ["--model", str(art_dir)]), ("int8-mlp", ["--model", str(art_dir)])):
        assert cli_main(["eval", "--dataset", str(dataset), "--precision", precision,
                         "--samples", "150", *extra]) == 0
        aucs[precision] = float(capsys.readouterr().out.split("AUC ")[1].split()[0])
    print(aucs)
    assert aucs["int8-mlp"] >= 0.999 * aucs["fp32"], aucs
    assert aucs["int8-mlp"] != aucs["int8"], "int8-mlp must run a different (quantized) MLP"
