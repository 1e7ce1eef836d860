"""Every query of systemd/grafana-dashboard.json returns data from a real Prometheus server that
scrapes a live dlrm-daemon (null engines) under load; the recording rules evaluate there too."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
DASHBOARD = SYSTEMD / "grafana-dashboard.json"
RATE_INTERVAL = "10s"  # stands in for Grafana's $__rate_interval at a 1 s scrape interval
# Queries whose values must be positive under load (not just present): throughput and latency.
MUST_BE_POSITIVE = ("dlrm_pairs_total", "dlrm_query_latency_seconds_bucket")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, Grafana variables replaced by their 'All' values."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = (target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$instance", ".*").replace("$engine", ".*"))
            assert "$" not in expr, f"unhandled Grafana variable in {panel['title']!r}: {expr}"
            out.append((panel["title"], expr))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            # Grafana's label_values(METRIC, LABEL) asks for the series API; this is its PromQL twin.
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
            assert m, var["query"]
            selector = m.group(1).replace("$instance", ".*")
            out.append((f"variable {var['name']}", f"group by ({m.group(2)}) ({selector})"))
    return out


class Prometheus:
    """A real Prometheus server on loopback with temp storage, scraping `targets` every second."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        tool = shutil.which("prometheus")
        if tool is None:  # installed by `make test-deps`; a missing tool must fail, not skip
            pytest.fail("prometheus not found: run `make test-deps` (apt-get install prometheus)")
        # The rules as shipped, evaluated every second instead of every 15 s.
        rules = (SYSTEMD / "dlrm-rules.yml").read_text().replace("interval: 15s", "interval: 1s")
        (tmp / "dlrm-rules.yml").write_text(rules)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["dlrm-rules.yml"],
            "scrape_configs": [{"job_name": "dlrm-daemon", "scrape_interval": "1s",
                                "scrape_timeout": "1s", "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self._wait_ready(tmp)

    def _wait_ready(self, tmp: Path) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: "
                                   f"{(tmp / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus not ready after 60 s")

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"prometheus rejected {expr!r}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def wait_for_all(prom: Prometheus, queries: list[tuple[str, str]], until: float) -> dict[str, list[dict]]:
    """Poll until every query returns at least one series; fail naming the empty ones."""
    results: dict[str, list[dict]] = {}
    while True:
        results = {expr: prom.query(expr) for _, expr in queries}
        empty = [(title, expr) for title, expr in queries if not results[expr]]
        if not empty:
            return results
        if time.monotonic() > until:
            pytest.fail("dashboard queries without data:\n" + "\n".join(f"  {t}: {e}" for t, e in empty))
        time.sleep(1)


def check_dashboard(prom: Prometheus, load_running: Callable[[], bool]) -> None:
    queries = dashboard_queries()
    rules = [("rule", r) for r in ("job:dlrm_query_latency_seconds:p99_rate1m",
                                   "job_engine:dlrm_batch_latency_seconds:p99_rate1m")]
    results = wait_for_all(prom, queries + rules, until=time.monotonic() + 60)
    assert load_running(), "the load generator stopped early: its error is above"
    for expr, series in results.items():
        if any(name in expr for name in MUST_BE_POSITIVE) and "TIMEOUT" not in expr:
            values = [float(s["value"][1]) for s in series]
            assert any(math.isfinite(v) and v > 0 for v in values), (expr, series)
    p99 = float(results["job:dlrm_query_latency_seconds:p99_rate1m"][0]["value"][1])
    assert math.isfinite(p99) and 0 < p99 < 1.0


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    # ipc:// socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="dlrm-prom-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _write_dataset(path: Path, num_samples: int = 64) -> None:
    from formats.dataset import DatasetWriter

    rng = np.random.default_rng(0)
    sizes = rng.integers(100, 300, size=num_samples)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    table_rows = [1000] * 26
    w = DatasetWriter(path, table_rows, source="test_prometheus_dashboard")
    w.append(rng.integers(0, 2, n).astype(np.float32), rng.random((n, 13), dtype=np.float32),
             rng.integers(0, 1000, (n, 26)).astype(np.int32))
    w.finish(offsets)


def test_dashboard_queries_return_data_from_live_daemon(tmp_short: Path) -> None:
    from wire.client import Client

    ds = tmp_short / "ds"
    _write_dataset(ds)
    metrics_port = _free_port()
    config = tmp_short / "config.toml"
    config.write_text(
        f'engines = ["null", "null"]\n'
        f'runtime_dir = "{tmp_short / "run"}"\n'
        f'metrics_host = "127.0.0.1"\nmetrics_port = {metrics_port}\n'
        f'datasets = {{ synth = "{ds}" }}\n'
        f'drain_timeout_s = 2.0\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    log = open(tmp_short / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    stop = threading.Event()
    errors: list[BaseException] = []
    prom: Prometheus | None = None
    try:
        endpoint = f"ipc://{tmp_short / 'run'}/dlrm.sock"
        client = _connect(endpoint, daemon, tmp_short / "daemon.log")
        ids = np.arange(64, dtype=np.int64)
        client.load_samples("synth", ids)

        def load() -> None:
            # Steady traffic of both kinds for the whole test, as a driver would send.
            rng = np.random.default_rng(1)
            try:
                with Client(endpoint, timeout_s=30) as c:
                    while not stop.is_set():
                        preds = c.infer_by_ref("synth", rng.choice(ids, size=4, replace=False))
                        assert preds.dtype == np.float32 and preds.size >= 400
                        n = int(rng.integers(100, 700))
                        c.infer_by_value(rng.random((n, 13), dtype=np.float32),
                                         rng.integers(0, 1000, (n, 26)).astype(np.int32))
                        time.sleep(0.01)
            except BaseException as exc:  # reported by the assertion in check_dashboard
                errors.append(exc)
                raise

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        prom = Prometheus(tmp_short, [f"127.0.0.1:{metrics_port}"])
        check_dashboard(prom, lambda: thread.is_alive() and not errors)
        client.close()
    finally:
        stop.set()
        if prom is not None:
            prom.close()
        daemon.terminate()
        try:
            rc = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            rc = daemon.wait()
        log.close()
    assert not errors, errors
    assert rc == 0, (tmp_short / "daemon.log").read_text()[-3000:]


def _connect(endpoint: str, daemon: subprocess.Popen, log: Path) -> "Client":  # noqa: F821
    from wire.client import Client
    from wire.errors import ConnectionFailed

    deadline = time.monotonic() + 60
    while True:
        if daemon.poll() is not None:
            pytest.fail(f"dlrm-daemon exited {daemon.returncode}:\n{log.read_text()[-3000:]}")
        client = Client(endpoint, timeout_s=2)
        try:
            client.status()
            client.timeout_s = 30
            return client
        except ConnectionFailed:
            client.close()
            if time.monotonic() > deadline:
                pytest.fail(f"dlrm-daemon not answering on {endpoint}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def test_dashboard_is_ready_for_file_provisioning() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "dlrm-daemon" and "id" not in dash  # fixed uid; Grafana assigns the id
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    exprs = " ".join(e for _, e in dashboard_queries())
    for needed in ("histogram_quantile(0.99, sum by (le) (rate(dlrm_query_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (engine, le) (rate(dlrm_batch_latency_seconds_bucket",
                   "dlrm_queries_total", "dlrm_pairs_total", "dlrm_batch_size_pairs",
                   "dlrm_queue_depth_queries", 'tier="device"', "dlrm_errors_total",
                   "dlrm_engine_restarts_total"):
        assert needed in exprs, needed
