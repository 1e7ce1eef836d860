"""Overload: measure the daemon's capacity, then offer twice that and see what happens.

A null engine with a fixed service time per batch (DLRM_NULL_DELAY_S) stands in for a GPU: capacity
is max_batch_pairs / delay when batches are full. Queries are LoadGen-like (one sample each, sizes
from the MLPerf reference distribution, mean 270 pairs), sent open-loop with Poisson arrivals from
one PipelinedClient. Per phase: OVERLOADED share and how fast those replies come, admitted-query
latency (client-measured, send to reply) p50/p99/max, queue depth max (GetStatus every 0.1 s from
another socket), dispatcher RSS. Phases: capacity (closed loop, throughput work: deadline_s=inf), then
2x capacity three ways: the daemon's defaults (adaptive admission against latency_target_s, 30 ms),
admission off (`latency_target_s = 0`) with the configured queue bound (`--max-queue-pairs`, default
the daemon's 8,000,000: the behaviour before admission), and admission off with the bound sized from
capacity (capacity x `--budget-s`).

    .venv/bin/python bench/overload.py --seconds 15
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wire.client import Client, PipelinedClient, wait_until_serving  # noqa: E402
from wire.errors import Overloaded  # noqa: E402
from wire.messages import NO_DEADLINE  # noqa: E402
from formats.dataset import write_dataset  # noqa: E402
from formats.trace import reference_sample_sizes  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _latency_buckets(port: int) -> dict[float, float]:
    """Cumulative counts of dlrm_query_latency_seconds (by_ref) per upper bound, from the exporter."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[float, float] = {}
    for fam in text_string_to_metric_families(body):
        if fam.name == "dlrm_query_latency_seconds":
            for smp in fam.samples:
                if smp.name.endswith("_bucket") and smp.labels.get("kind") == "by_ref":
                    out[float(smp.labels["le"])] = smp.value
    return out


def _daemon_view(b0: dict[float, float], b1: dict[float, float], rejected: int) -> dict[str, object]:
    """Admitted-query latency as the dispatcher measured it (arrival to reply sent): rejected queries
    are recorded at 0 s, so they are taken out of the lowest bucket."""
    les = sorted(b1)
    cum = np.array([b1[le] - b0.get(le, 0.0) for le in les]) - rejected
    total = cum[-1]
    if total <= 0:
        return {}
    def q(p: float) -> float:
        i = int(np.searchsorted(cum, p * total))
        return les[min(i, len(les) - 1)]
    within = cum[les.index(0.03)] / total if 0.03 in les else float("nan")
    return {"daemon_admitted_within_30ms": round(float(within), 4),
            "daemon_admitted_p50_le_ms": q(0.5) * 1e3, "daemon_admitted_p99_le_ms": q(0.99) * 1e3}


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Daemon:
    def __init__(self, work: Path, ds: Path, args: argparse.Namespace, max_queue_pairs: int,
                 latency_target_s: float | None = None) -> None:
        """`latency_target_s` None: the daemon's default."""
        self.rt = Path(tempfile.mkdtemp(prefix="rt-", dir=work))
        cfg = self.rt / "d.toml"
        cfg.write_text(f'runtime_dir = "{self.rt}"\nengines = ["null"]\nmax_batch_pairs = {args.batch_pairs}\n'
                       f'inflight_batches = 2\nmax_queue_pairs = {max_queue_pairs}\nmax_pairs_per_query = 700\n'
                       f'metrics_port = {_free_port()}\n'
                       + ("" if latency_target_s is None else f"latency_target_s = {latency_target_s}\n")
                       + f'[datasets]\nds = "{ds}"\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DLRM_NULL_DELAY_S": str(args.delay_s)}
        self.log = open(self.rt / "daemon.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(cfg)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.endpoint = f"ipc://{self.rt}/dlrm.sock"
        self.metrics_port = int(cfg.read_text().split("metrics_port = ")[1].split()[0])
        wait_until_serving(self.endpoint, 30, self.proc)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.log.close()
        return code


def _sampler(endpoint: str, stop: threading.Event, out: dict[str, int]) -> None:
    with Client(endpoint, timeout_s=5) as c:
        while not stop.is_set():
            st = c.status()
            out["queue_queries_max"] = max(out.get("queue_queries_max", 0), st["queue_queries"])
            out["queue_pairs_max"] = max(out.get("queue_pairs_max", 0), st["queue_pairs"])
            stop.wait(0.1)


def capacity(d: Daemon, sizes: np.ndarray, seconds: float) -> float:
    """Closed loop with enough queries outstanding to keep batches full: pairs/s answered."""
    pc = PipelinedClient(d.endpoint)
    rng = np.random.default_rng(1)
    outstanding, rid, pairs = 0, 0, 0
    want = 64
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        while outstanding < want:
            pc.send_by_ref(rid, "ds", np.array([rng.integers(0, len(sizes))]), deadline_s=NO_DEADLINE)
            rid += 1
            outstanding += 1
        for r in pc.poll(100):
            outstanding -= 1
            if r.error is None:
                pairs += len(r.predictions)
    elapsed = time.monotonic() - t0
    while outstanding:
        got = pc.poll(2000)
        if not got:
            break
        outstanding -= len(got)
    pc.close()
    return pairs / elapsed


def offered(d: Daemon, sizes: np.ndarray, qps: float, seconds: float) -> dict[str, object]:
    """Open loop, Poisson arrivals at `qps` one-sample queries for `seconds`."""
    pc = PipelinedClient(d.endpoint)
    rng = np.random.default_rng(2)
    stop = threading.Event()
    depth: dict[str, int] = {}
    sampler = threading.Thread(target=_sampler, args=(d.endpoint, stop, depth), daemon=True)
    sampler.start()
    rss0 = _rss_kb(d.proc.pid)
    b0 = _latency_buckets(d.metrics_port)
    sent_at: dict[int, float] = {}
    ok_lat: list[float] = []
    over_lat: list[float] = []
    other: dict[str, int] = {}
    n = int(qps * seconds)
    gaps = rng.exponential(1.0 / qps, size=n)
    due = time.monotonic() + np.cumsum(gaps)
    ids = rng.integers(0, len(sizes), size=n)
    i = 0
    pairs_ok = 0
    t0 = time.monotonic()
    t_end = due[-1] + 30
    while (i < n or sent_at) and time.monotonic() < t_end:
        now = time.monotonic()
        while i < n and due[i] <= now:
            pc.send_by_ref(i, "ds", ids[i:i + 1])
            sent_at[i] = time.monotonic()
            i += 1
        wait_ms = 0 if i < n and due[i] <= time.monotonic() else int(
            max(0.0, min((due[i] if i < n else now + 0.05) - time.monotonic(), 0.05)) * 1000)
        for r in pc.poll(wait_ms):
            t = time.monotonic() - sent_at.pop(r.request_id)
            if r.error is None:
                ok_lat.append(t)
                pairs_ok += len(r.predictions)
            elif isinstance(r.error, Overloaded):
                over_lat.append(t)
            else:
                other[r.error.code] = other.get(r.error.code, 0) + 1
    stop.set()
    sampler.join(5)
    pc.close()
    ok = np.array(ok_lat) * 1e3
    ov = np.array(over_lat) * 1e3
    return {
        "offered_qps": round(qps), "queries": n, "admitted": len(ok), "overloaded": len(ov),
        "overloaded_share": round(len(ov) / n, 3), "other_errors": other, "unanswered": len(sent_at),
        "admitted_ms_p50": round(float(np.percentile(ok, 50)), 2) if len(ok) else None,
        "admitted_ms_p99": round(float(np.percentile(ok, 99)), 2) if len(ok) else None,
        "admitted_ms_max": round(float(ok.max()), 2) if len(ok) else None,
        "admitted_within_30ms": round(float((ok <= 30).mean()), 4) if len(ok) else None,
        "overloaded_reply_ms_p99": round(float(np.percentile(ov, 99)), 2) if len(ov) else None,
        **depth, "dispatcher_rss_kb_start": rss0, "dispatcher_rss_kb_end": _rss_kb(d.proc.pid),
        "admitted_pairs_per_s": round(pairs_ok / (time.monotonic() - t0)),
        **_daemon_view(b0, _latency_buckets(d.metrics_port), len(ov)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--delay-s", type=float, default=0.005, help="null engine service time per batch")
    ap.add_argument("--batch-pairs", type=int, default=512)
    ap.add_argument("--max-queue-pairs", type=int, default=8_000_000)
    ap.add_argument("--budget-s", type=float, default=0.015,
                    help="queue bound = capacity x this (leaves room for the batch in service and one more)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dlrmo-", dir="/tmp"))
    offsets = reference_sample_sizes(2000 * 270)
    n = int(offsets[-1])
    rng = np.random.default_rng(0)
    write_dataset(work / "ds", np.zeros(n, np.float32), np.zeros((n, 13), np.float32),
                  rng.integers(0, 50, size=(n, 26)).astype(np.int32), offsets, (50,) * 26, "overload")
    sizes = np.diff(offsets)
    mean_pairs = float(sizes.mean())
    d = Daemon(work, work / "ds", args, args.max_queue_pairs)  # the defaults: admission on
    cap = capacity(d, sizes, min(args.seconds, 8.0))
    cap_qps = cap / mean_pairs
    res: dict[str, object] = {"capacity_pairs_per_s": round(cap), "capacity_queries_per_s": round(cap_qps),
                              "mean_pairs_per_query": round(mean_pairs, 1), "delay_s": args.delay_s,
                              "batch_pairs": args.batch_pairs}
    res["2x_defaults_admission_30ms"] = offered(d, sizes, 2 * cap_qps, args.seconds)
    res["exit_0"] = d.stop()
    d = Daemon(work, work / "ds", args, args.max_queue_pairs, latency_target_s=0.0)
    res["2x_no_admission_queue_bound_%d" % args.max_queue_pairs] = offered(d, sizes, 2 * cap_qps, args.seconds)
    res["exit_1"] = d.stop()
    bound = max(args.batch_pairs, int(cap * args.budget_s))
    d = Daemon(work, work / "ds", args, bound, latency_target_s=0.0)
    res[f"2x_no_admission_queue_bound_{bound}"] = offered(d, sizes, 2 * cap_qps, args.seconds)
    res["exit_2"] = d.stop()
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
