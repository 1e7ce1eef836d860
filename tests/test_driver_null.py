"""loadgen_driver through the real LoadGen with the in-process null backend (no daemon)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from formats.dataset import Dataset, DatasetWriter
from loadgen_driver.accuracy import read_accuracy_log, score_accuracy_log
from loadgen_driver.backend import InProcessBackend
from loadgen_driver.cli import main
from loadgen_driver.sut import InflightWindow, request_ends
from loadgen_driver.settings import RunSettings, build_test_settings
from loadgen_driver.summary import read_summary

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(path: Path, num_samples: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, num_samples)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    table_rows = [50] * 26
    w = DatasetWriter(path, table_rows, "test")
    w.append(rng.integers(0, 2, n).astype(np.float32), rng.random((n, 13), dtype=np.float32),
             rng.integers(0, 50, (n, 26)).astype(np.int32))
    w.finish(offsets)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "small")


def test_settings_carry_dlrm_v1_values() -> None:
    ts, notes = build_test_settings(RunSettings("Server", "PerformanceOnly", 330067, target_qps=1000.0))
    assert ts.server_target_latency_ns == 30_000_000
    assert ts.min_query_count == 270336
    assert ts.min_duration_ms == 600_000
    assert ts.performance_sample_count_override == 204800
    assert ts.server_coalesce_queries
    assert ts.server_target_qps == 1000.0
    assert notes == []
    ts, notes = build_test_settings(RunSettings("Offline", "PerformanceOnly", 1000, short=True))
    assert ts.min_query_count < 24576 and ts.performance_sample_count_override == 1000
    assert any("NOT an MLPerf-length run" in n for n in notes)


def test_user_conf_overrides_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "user.conf"
    conf.write_text("dlrm.Server.target_qps = 4321\n*.Server.target_latency = 15\n"
                    "dlrm.Server.min_query_count = 77\n")
    ts, _ = build_test_settings(RunSettings("Server", "PerformanceOnly", 1000, user_conf=conf))
    assert ts.server_target_qps == 4321.0
    assert ts.min_query_count == 77
    # Our explicit dlrm.Server.target_latency (30) is more specific than the user's wildcard line.
    assert ts.server_target_latency_ns == 30_000_000


# Offline gets min_duration 0: a SUT faster than target_qps would end early and be INVALID.
# Server gets a 1 s bound: the 2-core test machine is shared, p99 is not what is tested here.
@pytest.mark.parametrize("scenario,qps,secs", [("Offline", 20000, "0"), ("Server", 2000, "1")])
def test_performance_run_null_backend(dataset: Path, tmp_path: Path, scenario: str, qps: int,
                                      secs: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "logs"
    rc = main(["--scenario", scenario, "--dataset", str(dataset), "--backend", "null",
               "--target-qps", str(qps), "--min-duration-s", secs, "--min-query-count", "200",
               "--samples-per-request", "64", "--output-dir", str(out), "--quiet", "--latency-ms", "1000"])
    printed = capsys.readouterr().out
    assert rc == 0
    summary = read_summary(out)
    assert summary.result == "VALID", printed
    assert f"loadgen_driver: {scenario} PerformanceOnly" in printed
    assert "NOT an MLPerf-length run" in printed
    assert "latency: p50" in printed and "samples/s" in printed
    # by default both ends go through LoadGen's C API (ids as arrays, one completion call per reply)
    assert "issue through capi, completion through capi" in printed
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt", "mlperf_log_accuracy.json"):
        assert (out / name).exists()


def test_capi_completion_is_found() -> None:
    from loadgen_driver import capi

    assert capi.load() is not None  # the pinned mlcommons-loadgen 6.0.17 keeps its symbol table


@pytest.mark.parametrize("scenario,completion,issue", [("Offline", "capi", "fast"),
                                                       ("Offline", "python", "slow"),
                                                       ("Server", "capi", "capi"),
                                                       ("Offline", "capi", "ring"),
                                                       ("Server", "capi", "ring")])
def test_accuracy_log_holds_prediction_label_pairs(dataset: Path, tmp_path: Path, scenario: str,
                                                   completion: str, issue: str) -> None:
    out = tmp_path / "acc"
    rc = main(["--scenario", scenario, "--mode", "AccuracyOnly", "--dataset", str(dataset),
               "--backend", "null", "--samples-per-request", "37", "--output-dir", str(out), "--quiet",
               "--completion", completion, "--issue", issue, "--target-qps", "5000"])
    assert rc == 0
    ds = Dataset.open(dataset)
    preds, labels, order = read_accuracy_log(out / "mlperf_log_accuracy.json")
    assert sorted(order.tolist()) == list(range(ds.num_samples))
    # Independent reconstruction: the pairs of each logged sample, in log order.
    pairs = np.concatenate([np.arange(ds.sample_offsets[s], ds.sample_offsets[s + 1]) for s in order])
    np.testing.assert_array_equal(labels, ds.labels[pairs])
    expected = ((pairs * 2654435761) % 1000003 / 1000003.0).astype(np.float32)
    np.testing.assert_array_equal(preds, expected)
    from sklearn.metrics import roc_auc_score

    assert score_accuracy_log(out / "mlperf_log_accuracy.json").auc == pytest.approx(
        roc_auc_score(ds.labels[pairs], expected), abs=1e-12)


class _FailingBackend(InProcessBackend):
    """Answers request 3 with an error (as the daemon would with ENGINE_FAILED)."""

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        if request_id == 3:
            from loadgen_driver.backend import BackendReply

            self._replies.put(BackendReply(request_id, None, "ENGINE_FAILED: boom"))
        else:
            super().send(request_id, sample_ids)


class _SilentBackend(InProcessBackend):
    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        pass  # never answers: the driver must time out, not hang


@pytest.mark.parametrize("backend_cls,needle", [(_FailingBackend, "ENGINE_FAILED: boom"),
                                                (_SilentBackend, "no reply from the backend")])
def test_backend_errors_fail_the_run(dataset: Path, tmp_path: Path, backend_cls: type,
                                     needle: str) -> None:
    from loadgen_driver.runner import run_test

    ds = Dataset.open(dataset)
    ts, _ = build_test_settings(RunSettings("Offline", "PerformanceOnly", ds.num_samples,
                                            target_qps=1000, min_duration_ms=200, min_query_count=100))
    result = run_test(backend_cls(ds.sample_offsets), ts, ds.num_samples, tmp_path, ds.sample_offsets,
                      samples_per_request=16, reply_timeout_s=1.0)
    assert result.stats.error_samples > 0
    assert any(needle in e and "sample ids" in e for e in result.stats.errors)


def test_summary_parser_reports_invalid_reasons(tmp_path: Path) -> None:
    (tmp_path / "mlperf_log_summary.txt").write_text(
        "SUT name : PyFastSUT\nScenario : Server\nMode     : PerformanceOnly\n"
        "Completed samples per second    : 1234.5\nResult is : INVALID\n"
        "  Performance constraints satisfied : NO\n  Min duration satisfied : Yes\n"
        "\n99.00 percentile latency (ns)   : 45000000\n")
    s = read_summary(tmp_path)
    assert s.result == "INVALID"
    assert s.failed_checks() == ["Performance constraints satisfied : NO"]
    assert s.number("Completed samples per second") == 1234.5
    assert s.number("99.00 percentile latency (ns)") == 45e6


def test_cli_bad_dataset_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Offline",
                           "--dataset", str(tmp_path / "nope"), "--backend", "null"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot open dataset" in proc.stderr


def test_progress_line_reports_samples_rate_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import time

    from loadgen_driver.runner import Progress
    from loadgen_driver.sut import SutStats

    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    stats = SutStats()
    with Progress(stats, enabled=True, interval_s=0.05):
        stats.completed_samples, stats.error_samples = 12345, 7
        time.sleep(0.2)
    line = buf.getvalue()
    assert "12,345 samples done" in line and "samples/s" in line and "errors 7" in line
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    with Progress(stats, enabled=False, interval_s=0.05):
        time.sleep(0.1)
    assert quiet.getvalue() == ""


def test_load_samples_failure_fails_the_run(dataset: Path, tmp_path: Path) -> None:
    from loadgen_driver.runner import run_test

    class _NoLoad(InProcessBackend):
        def load_samples(self, sample_ids: np.ndarray) -> None:
            raise RuntimeError("dataset not registered")

    ds = Dataset.open(dataset)
    ts, _ = build_test_settings(RunSettings("Offline", "PerformanceOnly", ds.num_samples,
                                            target_qps=1000, min_duration_ms=0, min_query_count=50))
    result = run_test(_NoLoad(ds.sample_offsets), ts, ds.num_samples, tmp_path, ds.sample_offsets)
    assert any("LoadSamples" in e and "dataset not registered" in e for e in result.stats.errors)


def test_a_failed_request_does_not_stop_the_others(dataset: Path, tmp_path: Path) -> None:
    """Every sample is accounted for: one failed request costs its own samples, the rest are sent and
    completed (main used to complete everything after the first error empty, uncounted)."""
    from loadgen_driver.runner import run_test

    ds = Dataset.open(dataset)
    ts, _ = build_test_settings(RunSettings("Offline", "PerformanceOnly", ds.num_samples,
                                            target_qps=1000, min_duration_ms=200, min_query_count=100))
    result = run_test(_FailingBackend(ds.sample_offsets), ts, ds.num_samples, tmp_path, ds.sample_offsets,
                      samples_per_request=16, reply_timeout_s=5.0)
    st = result.stats
    assert st.error_samples == 16 and st.error_events == 1 and st.unsent_samples == 0, st
    assert st.completed_samples + st.error_samples == st.issued_samples > 16, st


def test_summary_of_a_run_with_failures_says_invalid() -> None:
    from loadgen_driver.summary import LoadgenSummary, format_summary

    s = LoadgenSummary(values={"Result is": "VALID", "Samples per second": "1000"})
    text = format_summary("Offline", "PerformanceOnly", s, 0, 0, 1.0, 375, 0.0, [], unsent_samples=300)
    assert "result: VALID" not in text and "result: INVALID (375 samples failed" in text, text
    assert "0 pairs/s" not in text and "throughput: n/a" in text, text
    assert "300 of them never sent" in text
    ok = format_summary("Offline", "PerformanceOnly", s, 10, 2700, 1.0, 0, 0.0, [])
    assert "result: VALID" in ok and "270,000 pairs/s" in ok


class _SlowBackend(InProcessBackend):
    """Answers each request 0.8 s after it is sent, and says it is busy meanwhile (a slow daemon)."""

    def __init__(self, offsets: np.ndarray) -> None:
        super().__init__(offsets)
        import threading

        self._timers: list[threading.Timer] = []
        self._busy = 0
        self._lock = threading.Lock()

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        import threading

        with self._lock:
            self._busy += 1

        def answer() -> None:
            InProcessBackend.send(self, request_id, sample_ids)
            with self._lock:
                self._busy -= 1

        t = threading.Timer(0.8 * (1 + len(self._timers)), answer)
        self._timers.append(t)
        t.start()

    def liveness(self, timeout_s: float):  # type: ignore[no-untyped-def]
        from loadgen_driver.backend import Liveness

        return Liveness(True, self._busy > 0 or not self._replies.empty(), f"{self._busy} busy")


def test_slow_but_working_backend_is_waited_for(dataset: Path, tmp_path: Path) -> None:
    """Replies come seconds after issue, more than reply_timeout_s, from a backend that is working:
    the run completes with no error (main failed such an Offline run: its clock ran from issue)."""
    from loadgen_driver.runner import run_test

    ds = Dataset.open(dataset)
    ts, _ = build_test_settings(RunSettings("Offline", "PerformanceOnly", ds.num_samples,
                                            target_qps=10, min_duration_ms=0, min_query_count=40))
    result = run_test(_SlowBackend(ds.sample_offsets), ts, ds.num_samples, tmp_path, ds.sample_offsets,
                      samples_per_request=10, reply_timeout_s=0.5)
    assert result.stats.errors == [] and result.stats.error_samples == 0, result.stats
    assert result.stats.completed_samples == result.stats.issued_samples >= 40
    assert result.wall_s > 2.0  # replies really came late


def test_unload_failure_after_the_run_is_a_warning(dataset: Path, tmp_path: Path) -> None:
    from loadgen_driver.runner import run_test

    class _NoUnload(InProcessBackend):
        def unload_samples(self, sample_ids: np.ndarray) -> None:
            raise RuntimeError("daemon restarted meanwhile")

    ds = Dataset.open(dataset)
    ts, _ = build_test_settings(RunSettings("Offline", "PerformanceOnly", ds.num_samples,
                                            target_qps=1000, min_duration_ms=0, min_query_count=50))
    result = run_test(_NoUnload(ds.sample_offsets), ts, ds.num_samples, tmp_path, ds.sample_offsets)
    assert result.stats.errors == [] and result.stats.error_samples == 0
    assert any("UnloadSamples" in w and "restarted" in w for w in result.stats.warnings)


def test_issue_ring_built_used_and_counted(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--issue ring: the C ring is compiled (into the cache given), LoadGen's IssueQuery goes through it
    (every sample of the run passes the ring), and the run is VALID."""
    from loadgen_driver import issue_ring

    lib_path = issue_ring.build(tmp_path / "cache")
    assert lib_path is not None and lib_path.exists()
    lib = issue_ring.load(lib_path)
    got: list[tuple[np.ndarray, np.ndarray]] = []
    pump = issue_ring.IssuePump(lib, lambda ids, idx: got.append((ids, idx)), capacity=64, batch=16)
    try:
        samples = np.zeros(1000, dtype=[("id", "<u8"), ("index", "<u8")])
        samples["id"] = np.arange(1000) + 7
        samples["index"] = np.arange(1000) * 3
        lib.ring_issue(0, samples.ctypes.data, 1000)  # more than the ring holds: waits for the pump
    finally:
        pump.close()
    ids = np.concatenate([g[0] for g in got])
    idx = np.concatenate([g[1] for g in got])
    np.testing.assert_array_equal(ids, np.arange(1000) + 7)  # all, in order, none twice
    np.testing.assert_array_equal(idx, np.arange(1000) * 3)
    assert max(len(g[0]) for g in got) <= 16
    out = tmp_path / "logs"
    rc = main(["--scenario", "Server", "--dataset", str(dataset), "--backend", "null", "--target-qps", "2000",
               "--min-duration-s", "1", "--min-query-count", "300", "--output-dir", str(out), "--quiet",
               "--latency-ms", "1000", "--issue", "ring"])
    printed = capsys.readouterr().out
    assert rc == 0 and read_summary(out).result == "VALID", printed
    assert "issue through ring" in printed


def test_issue_ring_falls_back_without_a_compiler(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # nothing built yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    out = tmp_path / "logs"
    rc = main(["--scenario", "Offline", "--dataset", str(dataset), "--backend", "null", "--target-qps", "20000",
               "--min-duration-s", "0", "--min-query-count", "100", "--output-dir", str(out), "--quiet",
               "--issue", "ring"])
    printed = capsys.readouterr().out
    assert rc == 0 and "issue through capi" in printed, printed


def test_inflight_window_bounds_requests_and_pairs() -> None:
    """The driver's window: requests up to max_requests; pairs up to max_pairs, except that one request
    of any size passes when nothing is in flight (else it would wait for ever); release makes room."""
    w = InflightWindow(max_requests=3, max_pairs=100)
    assert w.acquire(60, timeout_s=0) and w.acquire(40, timeout_s=0)
    assert not w.acquire(1, timeout_s=0)  # 101 pairs > 100
    w.release(60)
    assert w.acquire(50, timeout_s=0) and (w.requests, w.pairs) == (2, 90)
    assert w.acquire(0, timeout_s=0)  # a third request, of 0 pairs, fits
    assert not w.acquire(0, timeout_s=0)  # 3 requests: full
    for pairs in (40, 50, 0):
        w.release(pairs)
    assert (w.requests, w.pairs) == (0, 0)
    assert w.acquire(1000, timeout_s=0)  # larger than the bound, alone: let through
    assert not w.acquire(1, timeout_s=0)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(w.acquire(5, timeout_s=5)))
    waiter.start()
    time.sleep(0.05)
    w.release(1000)  # wakes the waiter
    waiter.join(timeout=5)
    assert got == [True] and (w.requests, w.pairs) == (1, 5)
    unbounded = InflightWindow(max_requests=2, max_pairs=0)
    assert unbounded.acquire(10**9, timeout_s=0) and unbounded.acquire(10**9, timeout_s=0)
    assert not unbounded.acquire(1, timeout_s=0)


def test_request_ends_bound_samples_and_pairs() -> None:
    """Requests hold at most max_samples samples and max_pairs pairs (the daemon's max_pairs_per_query);
    a sample above max_pairs goes alone; every sample is in exactly one request, in order."""
    assert request_ends(0, 4) == []
    assert request_ends(10, 4) == [4, 8, 10]
    counts = np.array([3, 3, 3, 3, 9, 1, 1, 20, 2])
    ends = request_ends(len(counts), 3, counts, max_pairs=7)
    assert ends == [2, 4, 5, 7, 8, 9]
    start = 0
    for end in ends:
        piece = counts[start:end]
        assert 1 <= len(piece) <= 3 and (piece.sum() <= 7 or len(piece) == 1)
        start = end
    assert request_ends(len(counts), 3, counts, max_pairs=0) == [3, 6, 9]
    rng = np.random.default_rng(1)
    big = rng.integers(1, 700, size=20_000)
    ends = request_ends(len(big), 8192, big, max_pairs=1_000_000)
    sums = np.add.reduceat(big, [0, *ends[:-1]])
    assert ends[-1] == len(big) and sums.max() <= 1_000_000 and np.diff([0, *ends]).max() <= 8192


def test_loadgen_issue_threads_issue_every_sample_once(dataset: Path, tmp_path: Path) -> None:
    """--issue ring --issue-threads 3 (Server): LoadGen registers three C issue threads of the ring's and
    issues on them; with three completion threads too, every sample is answered once with its own
    predictions, and the run is VALID. In a process of its own: LoadGen's issue-thread controller serves
    one test per process."""
    out = tmp_path / "acc"
    common = ["--scenario", "Server", "--dataset", str(dataset), "--backend", "null", "--quiet",
              "--issue", "ring", "--issue-threads", "3", "--completion-threads", "3"]
    proc = subprocess.run([sys.executable, "-m", "loadgen_driver.cli", *common, "--mode", "AccuracyOnly",
                           "--target-qps", "5000", "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "issue through ring, 3 LoadGen issue threads" in proc.stdout
    detail = (out / "mlperf_log_detail.txt").read_text()
    assert detail.count("Registered IssueQueryThread[") == 3 and "Mismatch" not in detail
    ds = Dataset.open(dataset)
    preds, _, order = read_accuracy_log(out / "mlperf_log_accuracy.json")
    assert sorted(order.tolist()) == list(range(ds.num_samples))
    pairs = np.concatenate([np.arange(ds.sample_offsets[s], ds.sample_offsets[s + 1]) for s in order])
    np.testing.assert_array_equal(preds, ((pairs * 2654435761) % 1000003 / 1000003.0).astype(np.float32))
    perf = tmp_path / "perf"
    proc = subprocess.run([sys.executable, "-m", "loadgen_driver.cli", *common, "--target-qps", "2000",
                           "--min-duration-s", "1", "--min-query-count", "300", "--latency-ms", "1000",
                           "--output-dir", str(perf)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and read_summary(perf).result == "VALID", proc.stdout + proc.stderr
