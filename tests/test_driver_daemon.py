"""loadgen_driver against a live dlrm-daemon (subprocess): null engines, a CPU engine, failures."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from formats.artifact import write_model_description
from formats.model_config import DLRMConfig
from engines.model import random_state_dict
from engines.null_backend import null_ref_prediction
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.dataset import Dataset
from formats.frequencies import write_row_frequencies
from loadgen_driver.accuracy import read_accuracy_log
from loadgen_driver.cli import main
from loadgen_driver.summary import read_summary
from wire.client import Client
from prepare.convert import convert
from test_daemon_support import DaemonProc, make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def null_setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("drvnull")
    ds = make_dataset(d / "ds", np.random.default_rng(3).integers(1, 20, size=400))
    art = d / "art"  # the null engine reads no model; the dispatcher wants table_rows
    write_model_description(art, DLRMConfig((50,) * 26))
    daemon = DaemonProc({"engines": ["null"], "model": str(art), "max_batch_pairs": 4096,
                         "max_pairs_per_query": 600})
    try:
        daemon.wait_serving()
        yield daemon, ds
    finally:
        daemon.terminate()


def _run(daemon: DaemonProc, ds: Path, out: Path, *extra: str) -> int:
    return main(["--dataset", str(ds), "--endpoint", daemon.endpoint, "--output-dir", str(out),
                 "--quiet", "--min-query-count", "200", *extra])


@pytest.mark.parametrize("scenario,extra", [("Offline", ["--min-duration-s", "0"]),
                                            ("Server", ["--min-duration-s", "1", "--latency-ms", "1000"])])
def test_performance_through_daemon(null_setup, tmp_path: Path, scenario: str,  # type: ignore[no-untyped-def]
                                    extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    daemon, ds = null_setup
    rc = _run(daemon, ds, tmp_path, "--scenario", scenario, "--target-qps", "1000",
              "--samples-per-request", "16", *extra)
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert read_summary(tmp_path).result == "VALID", printed.out
    assert "errors: 0 samples" in printed.out


def test_accuracy_log_matches_null_engine(null_setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    daemon, ds = null_setup
    assert _run(daemon, ds, tmp_path, "--scenario", "Offline", "--mode", "AccuracyOnly",
                "--samples-per-request", "16") == 0
    preds, labels, order = read_accuracy_log(tmp_path / "mlperf_log_accuracy.json")
    d = Dataset.open(ds)
    assert sorted(order.tolist()) == list(range(d.num_samples))
    pairs = np.concatenate([np.arange(d.sample_offsets[s], d.sample_offsets[s + 1]) for s in order])
    np.testing.assert_array_equal(preds, null_ref_prediction(pairs))
    np.testing.assert_array_equal(labels, d.labels[pairs])


def test_daemon_errors_fail_the_run(null_setup, tmp_path: Path,  # type: ignore[no-untyped-def]
                                    capsys: pytest.CaptureFixture[str]) -> None:
    daemon, _ = null_setup
    # The driver cuts requests within the daemon's max_pairs_per_query (600) by itself, but one sample
    # of 700 pairs goes alone and is refused (BAD_REQUEST); the others, sent 200 at a time, are answered.
    ds = make_dataset(tmp_path / "ds_one_big", np.array([5] * 50 + [700]))
    rc = _run(daemon, ds, tmp_path / "out", "--scenario", "Offline", "--min-duration-s", "0",
              "--target-qps", "1000", "--samples-per-request", "200")
    printed = capsys.readouterr()
    assert rc == 1
    assert "RUN FAILED" in printed.err and "BAD_REQUEST" in printed.err and "(1 samples; sample ids 50)" in printed.err
    done = re.search(r"driver: ([\d,]+) samples.*errors: ([\d,]+) samples", printed.out)
    assert done is not None, printed.out
    issued, failed = (int(g.replace(",", "")) for g in done.groups())
    assert 0 < failed < issued / 10, printed.out  # the 700-pair sample's requests alone


def test_daemon_down_fails_fast(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", np.full(10, 3))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Server",
                           "--dataset", str(ds), "--endpoint", f"ipc://{tmp_path}/nobody.sock",
                           "--timeout-s", "2", "--output-dir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "not answering" in proc.stderr and "nobody.sock" in proc.stderr
    assert time.monotonic() - t0 < 50


def test_accuracy_auc_equals_reference_on_cpu_engine(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = DLRMConfig.mlperf().scaled(1e-4, cap=1000)
    torch.save(random_state_dict(config, seed=5), tmp_path / "ckpt.pt")
    rng = np.random.default_rng(9)
    write_row_frequencies(tmp_path / "f.bin", [rng.random(r).astype(np.float32) for r in config.table_rows])
    convert(tmp_path / "ckpt.pt", tmp_path / "art", tmp_path / "f.bin")
    ds_path = make_dataset(tmp_path / "ds", rng.integers(1, 30, size=80), seed=4,
                           table_rows=config.table_rows)
    ds = Dataset.open(ds_path)
    ref = Int8Reference(Artifact.open(tmp_path / "art")).predict(np.asarray(ds.dense), np.asarray(ds.sparse))
    from sklearn.metrics import roc_auc_score

    expected_auc = roc_auc_score(ds.labels, ref)  # over all pairs, in dataset order
    daemon = DaemonProc({"engines": ["cpu"], "model": str(tmp_path / "art"), "max_batch_pairs": 512,
                         "heartbeat_timeout_s": 5.0})
    try:
        daemon.wait_serving(60)
        out = tmp_path / "logs"
        rc = main(["--scenario", "Offline", "--mode", "AccuracyOnly", "--dataset", str(ds_path),
                   "--endpoint", daemon.endpoint, "--output-dir", str(out), "--quiet",
                   "--samples-per-request", "8", "--fp32-auc", str(expected_auc)])
    finally:
        daemon.terminate()
    printed = capsys.readouterr().out
    assert rc == 0, printed
    preds, labels, order = read_accuracy_log(out / "mlperf_log_accuracy.json")
    pairs = np.concatenate([np.arange(ds.sample_offsets[s], ds.sample_offsets[s + 1]) for s in order])
    np.testing.assert_allclose(preds, ref[pairs], rtol=1e-5, atol=1e-6)
    assert f"AUC={100 * expected_auc:.3f}%" in printed
    assert "AUC ratio to fp32" in printed and "99%: PASS, 99.9%: PASS" in printed


def test_daemon_killed_mid_run_fails_not_hangs(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", np.full(200, 3))
    art = tmp_path / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    daemon = DaemonProc({"engines": ["null"], "model": str(art)})
    try:
        daemon.wait_serving()
        driver = subprocess.Popen(
            [sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Server", "--dataset", str(ds),
             "--endpoint", daemon.endpoint, "--target-qps", "500", "--min-duration-s", "4",
             "--min-query-count", "100", "--timeout-s", "1", "--latency-ms", "1000", "--quiet",
             "--output-dir", str(tmp_path / "o")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        detail = tmp_path / "o" / "mlperf_log_detail.txt"  # LoadGen writes it once the test starts
        end = time.monotonic() + 30
        while not detail.exists() and time.monotonic() < end and driver.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        daemon.proc.kill()
        out, err = driver.communicate(timeout=60)
    finally:
        daemon.close()
    assert driver.returncode == 1, out + err
    assert "RUN FAILED" in err and "no reply from the backend within 1 s" in err


def test_slow_daemon_is_not_a_failed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each request takes longer than --timeout-s on a working daemon (small batches, each 0.25 s):
    the driver asks the daemon, sees it working, and the run completes with every sample."""
    ds = make_dataset(tmp_path / "ds", np.full(60, 10))
    art = tmp_path / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    daemon = DaemonProc({"engines": ["null"], "model": str(art), "max_batch_pairs": 100,
                         "inflight_batches": 1}, env={"DLRM_NULL_DELAY_S": "0.25"})
    try:
        daemon.wait_serving()
        rc = main(["--scenario", "Offline", "--dataset", str(ds), "--endpoint", daemon.endpoint,
                   "--output-dir", str(tmp_path / "o"), "--quiet", "--min-query-count", "60",
                   "--min-duration-s", "0", "--target-qps", "10", "--samples-per-request", "30",
                   "--timeout-s", "1"])
    finally:
        daemon.terminate()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "errors: 0 samples" in out and "driver: 60 samples" in out, out
    # the summary's requests line: two requests of 30 samples, each at least its 0.25 s batches long
    trip = re.search(r"requests: 2, 30 samples each; round trip \(send to reply\) p50 ([\d.]+) ms, "
                     r"p99 ([\d.]+) ms, max ([\d.]+) ms", out)
    assert trip is not None, out
    p50, p99, top = (float(v) for v in trip.groups())
    assert 250 <= p50 <= p99 <= top < 60_000, out


def test_offline_stays_within_the_daemons_queue_bound(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Offline issues every sample at once; the driver's request window alone (64 requests of 30 samples,
    some 19,000 pairs) would overrun a daemon queue of 2,000 pairs behind a slow engine and come back
    OVERLOADED. By default the driver keeps its pairs in flight within the bound the daemon's status
    reports, and the run completes; with the pair bound off (0) the same run fails, as before."""
    ds = make_dataset(tmp_path / "ds", np.random.default_rng(5).integers(5, 16, size=300))
    art = tmp_path / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    daemon = DaemonProc({"engines": ["null"], "model": str(art), "max_batch_pairs": 500,
                         "inflight_batches": 1, "max_queue_pairs": 2000, "max_pairs_per_query": 600},
                        env={"DLRM_NULL_DELAY_S": "0.002"})
    args = ["--scenario", "Offline", "--dataset", str(ds), "--endpoint", daemon.endpoint, "--quiet",
            "--min-query-count", "1", "--min-duration-s", "1", "--target-qps", "5000",
            "--samples-per-request", "30"]
    try:
        daemon.wait_serving()
        rc = main([*args, "--output-dir", str(tmp_path / "bounded")])
        bounded = capsys.readouterr()
        rc_unbounded = main([*args, "--output-dir", str(tmp_path / "unbounded"), "--max-inflight-pairs", "0"])
        unbounded = capsys.readouterr()
    finally:
        daemon.terminate()
    assert rc == 0, bounded.out + bounded.err
    assert "errors: 0 samples" in bounded.out, bounded.out
    done = re.search(r"driver: ([\d,]+) samples", bounded.out)
    assert done is not None and int(done.group(1).replace(",", "")) >= 5000, bounded.out  # LoadGen adds 10%
    assert rc_unbounded == 1, unbounded.out
    assert "OVERLOADED" in unbounded.err, unbounded.err


@pytest.mark.parametrize("predictions,threads", [("region", "1"), ("reply", "1"), ("region", "3")])
def test_predictions_come_back_the_chosen_way(null_setup, tmp_path: Path, predictions: str,  # type: ignore[no-untyped-def]
                                              threads: str) -> None:
    """The default: engines write into the driver's output region (no prediction bytes in replies);
    `--predictions reply`: in the replies. Both give LoadGen the null engine's exact predictions, also
    with several completion threads (each poll's replies answered before the region room is reused)."""
    daemon, ds = null_setup
    with Client(daemon.endpoint) as c:
        before = c.status()["totals"]
    assert _run(daemon, ds, tmp_path, "--scenario", "Offline", "--mode", "AccuracyOnly",
                "--samples-per-request", "16", "--predictions", predictions, "--completion-threads", threads) == 0
    with Client(daemon.endpoint) as c:
        after = c.status()["totals"]
    written = after.get("queries_written_to_regions", 0) - before.get("queries_written_to_regions", 0)
    queries = after.get("queries", 0) - before.get("queries", 0)
    assert queries > 0
    assert written == (queries if predictions == "region" else 0)
    preds, _, order = read_accuracy_log(tmp_path / "mlperf_log_accuracy.json")
    d = Dataset.open(ds)
    pairs = np.concatenate([np.arange(d.sample_offsets[s], d.sample_offsets[s + 1]) for s in order])
    np.testing.assert_array_equal(preds, null_ref_prediction(pairs))


def test_a_refused_region_falls_back_to_replies(null_setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A daemon that refuses the driver's region (here: a file it does not accept, as a daemon on
    another host or an older one would): the driver says so and gets every prediction in the replies."""
    import loadgen_driver.backend as backend_module
    from wire.output_region import OutputRegion

    class MisnamedRegion(OutputRegion):
        def __init__(self, num_predictions: int) -> None:
            super().__init__(num_predictions)
            bad = self.path.with_name(self.path.name + "-misnamed")
            self.path.rename(bad)
            self.path = bad

    monkeypatch.setattr(backend_module, "OutputRegion", MisnamedRegion)
    daemon, ds = null_setup
    with Client(daemon.endpoint) as c:
        before = c.status()["totals"].get("queries_written_to_regions", 0)
    assert _run(daemon, ds, tmp_path, "--scenario", "Offline", "--mode", "AccuracyOnly",
                "--samples-per-request", "16") == 0
    assert "did not take the output region" in caplog.text
    with Client(daemon.endpoint) as c:
        assert c.status()["totals"].get("queries_written_to_regions", 0) == before
    preds, _, order = read_accuracy_log(tmp_path / "mlperf_log_accuracy.json")
    d = Dataset.open(ds)
    pairs = np.concatenate([np.arange(d.sample_offsets[s], d.sample_offsets[s + 1]) for s in order])
    np.testing.assert_array_equal(preds, null_ref_prediction(pairs))
