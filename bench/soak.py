"""Soak: the daemon under mixed load with faults injected, resources sampled every few seconds.

Runs `python -m daemon.cli` with null engines (a fixed per-batch service time) and, in this process,
load at a moderate rate (the host is shared): pipelined by-reference queries, blocking by-value
queries, malformed requests, short-lived clients that connect/ask status/disconnect. Faults:
an engine SIGKILLed every --kill-every-s, an engine SIGSTOPped (hang -> heartbeat) every
--stop-every-s, a driver-like client subprocess SIGKILLed mid-stream every --client-kill-every-s.
Every --sample-s: RSS of the dispatcher and of each engine, the dispatcher's open fds, the daemon's
/dev/shm regions, the runtime dir's entries, queue depth and totals -> CSV. At the end: SIGTERM
(must exit 0), nothing left in /dev/shm, and a summary (start/end/max, least-squares slope over the
second half) printed and written as JSON next to the CSV.

    .venv/bin/python bench/soak.py --minutes 30 --out var/soak
"""
from __future__ import annotations

import argparse
import csv
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

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from wire.client import Client, PipelinedClient, wait_until_serving  # noqa: E402
from wire.errors import DaemonError  # noqa: E402
from wire.shm import list_regions  # noqa: E402
from formats.dataset import write_dataset  # noqa: E402

TABLE_ROWS = (50,) * 26
FIELDS = ["t_s", "dispatcher_rss_kb", "engines_rss_kb", "engine_count", "dispatcher_fds", "shm_regions",
          "runtime_entries", "queue_queries", "queries_ok", "errors", "engine_restarts", "load_ok",
          "load_errors", "bad_sent"]


def _dataset(path: Path) -> Path:
    rng = np.random.default_rng(0)
    sizes = rng.integers(100, 700, size=2000)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    sparse = np.stack([rng.integers(0, r, size=n) for r in TABLE_ROWS], axis=1).astype(np.int32)
    dense = rng.random((n, 13), dtype=np.float32)
    return write_dataset(path, rng.integers(0, 2, n).astype(np.float32), dense, sparse, offsets, TABLE_ROWS,
                         "soak")


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Load:
    """Client threads at fixed, moderate rates; counters are approximate (no locks needed for ints)."""

    def __init__(self, endpoint: str, stop: threading.Event, ref_qps: float, value_qps: float) -> None:
        self.endpoint, self.stop = endpoint, stop
        self.ref_qps, self.value_qps = ref_qps, value_qps
        self.ok = self.errors = self.bad_sent = 0
        self.by_code: dict[str, int] = {}
        self.hung = 0
        self.threads = [threading.Thread(target=f, daemon=True) for f in
                        (self._by_ref, self._by_value, self._bad, self._churn)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _by_ref(self) -> None:
        pc = PipelinedClient(self.endpoint)
        rng = np.random.default_rng(1)
        sent: dict[int, float] = {}
        rid = 0
        period = 1.0 / self.ref_qps
        nxt = time.monotonic()
        while not self.stop.is_set() or sent:
            now = time.monotonic()
            if not self.stop.is_set() and now >= nxt and len(sent) < 200:
                pc.send_by_ref(rid, "soak", rng.integers(0, 2000, size=int(rng.integers(1, 8))), deadline_s=5.0)
                sent[rid] = now
                rid += 1
                nxt += period
            for r in pc.poll(int(max(0.0, min(nxt - time.monotonic(), 0.05)) * 1000)):
                sent.pop(r.request_id, None)
                if r.error is None:
                    self.ok += 1
                else:
                    self.errors += 1
                    self.by_code[r.error.code] = self.by_code.get(r.error.code, 0) + 1
            stale = [k for k, t0 in sent.items() if time.monotonic() - t0 > 30]
            for k in stale:  # a reply that never came is a failure of the daemon: count it
                sent.pop(k)
                self.hung += 1
            if self.stop.is_set() and time.monotonic() - nxt > 35:
                break
        pc.close()

    def _by_value(self) -> None:
        rng = np.random.default_rng(2)
        c = Client(self.endpoint, timeout_s=30)
        while not self.stop.is_set():
            n = int(rng.integers(1, 400))
            try:
                c.infer_by_value(rng.random((n, 13), dtype=np.float32),
                                 rng.integers(0, 50, size=(n, 26)).astype(np.int32), deadline_s=5.0)
                self.ok += 1
            except DaemonError as exc:
                self.errors += 1
                self.by_code[exc.code] = self.by_code.get(exc.code, 0) + 1
            self.stop.wait(1.0 / self.value_qps)
        c.close()

    def _bad(self) -> None:
        import zmq

        rng = np.random.default_rng(3)
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.endpoint)
        while not self.stop.is_set():
            s.send_multipart([rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))])
            self.bad_sent += 1
            while s.poll(0):
                s.recv_multipart()
            self.stop.wait(0.2)
        s.close()

    def _churn(self) -> None:
        while not self.stop.is_set():
            try:
                with Client(self.endpoint, timeout_s=10) as c:
                    c.status()
            except DaemonError:
                self.errors += 1
            self.stop.wait(1.0)


_CLIENT_CHILD = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from wire.client import PipelinedClient
pc = PipelinedClient(sys.argv[1])
rid = 0
while True:  # floods by-reference work until it is SIGKILLed: its queued work is abandoned
    for _ in range(50):
        pc.send_by_ref(rid, "soak", np.arange(rid % 1990, rid % 1990 + 8)); rid += 1
    pc.poll(20)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", default=str(ROOT / "var" / "soak"))
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--kill-every-s", type=float, default=180.0)
    ap.add_argument("--stop-every-s", type=float, default=300.0)
    ap.add_argument("--client-kill-every-s", type=float, default=120.0)
    ap.add_argument("--ref-qps", type=float, default=150.0)
    ap.add_argument("--value-qps", type=float, default=20.0)
    ap.add_argument("--null-delay-s", type=float, default=0.002)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dlrms-", dir="/tmp"))
    ds = _dataset(work / "ds")
    art = work / "art"
    write_model_description(art, DLRMConfig(tuple(TABLE_ROWS)))
    rt = work / "rt"
    cfg = work / "daemon.toml"
    cfg.write_text(f'runtime_dir = "{rt}"\nengines = ["null", "null"]\nmodel = "{art}"\n'
                   f'max_batch_pairs = 8192\nmax_queue_pairs = 200000\nmax_pairs_per_query = 50000\n'
                   f'heartbeat_interval_s = 0.2\nheartbeat_timeout_s = 1.0\nrestart_backoff_s = 0.5\n'
                   f'[datasets]\nsoak = "{ds}"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DLRM_NULL_DELAY_S": str(args.null_delay_s)}
    env.pop("NOTIFY_SOCKET", None)
    log = open(out / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(cfg)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"ipc://{rt}/dlrm.sock"
    wait_until_serving(endpoint, 30, daemon)
    stop = threading.Event()
    load = Load(endpoint, stop, args.ref_qps, args.value_qps)
    load.start()
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_kill, next_stop = t0 + args.kill_every_s / 2, t0 + args.stop_every_s * 0.75
    next_client = t0 + args.client_kill_every_s / 3
    faults: list[str] = []
    rows: list[dict[str, float]] = []
    f = open(out / "soak.csv", "w", newline="")
    w = csv.DictWriter(f, FIELDS)
    w.writeheader()
    next_sample = t0
    control = Client(endpoint, timeout_s=10)
    while time.monotonic() < end and daemon.poll() is None:
        now = time.monotonic()
        try:
            st = control.status()
        except DaemonError as exc:
            faults.append(f"{now - t0:.0f}s status failed: {exc}")
            time.sleep(1)
            continue
        pids = [e["pid"] for e in st["engines"] if e["state"] in ("ready", "starting")]
        if now >= next_kill and pids:
            os.kill(pids[0], signal.SIGKILL)
            faults.append(f"{now - t0:.0f}s SIGKILL engine {pids[0]}")
            next_kill += args.kill_every_s
        elif now >= next_stop and len(pids) > 1:
            os.kill(pids[-1], signal.SIGSTOP)  # the supervisor must notice the silence and kill it
            faults.append(f"{now - t0:.0f}s SIGSTOP engine {pids[-1]}")
            next_stop += args.stop_every_s
        if now >= next_client:
            child = subprocess.Popen([sys.executable, "-c", _CLIENT_CHILD, endpoint, str(ROOT)], env=env)
            time.sleep(3.0)
            child.kill()
            child.wait()
            faults.append(f"{now - t0:.0f}s SIGKILL client {child.pid} mid-stream")
            next_client += args.client_kill_every_s
        if now >= next_sample:
            row = {
                "t_s": round(now - t0, 1), "dispatcher_rss_kb": _rss_kb(daemon.pid),
                "engines_rss_kb": sum(_rss_kb(p) for p in pids), "engine_count": len(pids),
                "dispatcher_fds": _fds(daemon.pid), "shm_regions": len(list_regions(daemon.pid)),
                "runtime_entries": len(os.listdir(rt)), "queue_queries": st["queue_queries"],
                "queries_ok": st["totals"].get("queries", 0),
                "errors": sum(v for k, v in st["totals"].items() if k.isupper()),
                "engine_restarts": sum(e["restarts"] for e in st["engines"]),
                "load_ok": load.ok, "load_errors": load.errors, "bad_sent": load.bad_sent,
            }
            rows.append(row)
            w.writerow(row)
            f.flush()
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            next_sample += args.sample_s
        time.sleep(0.5)
    try:
        final_totals = control.status()["totals"]
    except DaemonError:
        final_totals = {}
    control.close()
    stop.set()
    for t in load.threads:
        t.join(60)
    alive = daemon.poll() is None
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(60)
    f.close()
    log.close()
    left = list_regions(daemon.pid)
    summary = {"minutes": (time.monotonic() - t0) / 60, "alive_until_end": alive, "exit_code": code,
               "shm_left_after_exit": len(left), "faults": faults, "hung_replies": load.hung,
               "load_ok": load.ok, "load_errors": load.errors, "load_errors_by_code": load.by_code,
               "bad_sent": load.bad_sent, "daemon_totals": final_totals, "series": _summarize(rows)}
    (out / "soak_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "faults"}, indent=1))
    print(f"{len(faults)} faults injected; csv {out / 'soak.csv'}")
    return 0 if alive and code == 0 and not left and load.hung == 0 else 1


def _summarize(rows: list[dict[str, float]], window_s: float = 240.0) -> dict[str, dict[str, float]]:
    """Per series: start/end/min/max, the least-squares slope over the second half, and the same for
    the floor (minimum per `window_s` window; the floods of the client-kill fault make spikes that
    the allocator returns later, and a leak shows as a rising floor)."""
    out: dict[str, dict[str, float]] = {}
    if len(rows) < 4:
        return out
    t = np.array([r["t_s"] for r in rows], float)
    half = len(rows) // 2
    win = (t // window_s).astype(int)
    for key in ("dispatcher_rss_kb", "engines_rss_kb", "dispatcher_fds", "shm_regions", "runtime_entries"):
        v = np.array([float(r[key]) for r in rows])
        slope = float(np.polyfit(t[half:], v[half:], 1)[0]) * 3600 if np.ptp(t[half:]) > 0 else 0.0
        floors = np.array([v[win == w].min() for w in np.unique(win)])
        ft = np.array([t[win == w].mean() for w in np.unique(win)])
        fh = len(floors) // 2
        fslope = float(np.polyfit(ft[fh:], floors[fh:], 1)[0]) * 3600 if len(floors) - fh > 1 else 0.0
        out[key] = {"start": v[0], "end": v[-1], "min": float(v.min()), "max": float(v.max()),
                    "slope_per_hour_2nd_half": round(slope, 2),
                    f"floor_per_{int(window_s)}s": [int(x) for x in floors],
                    f"peak_per_{int(window_s)}s": [int(v[win == w].max()) for w in np.unique(win)],
                    "floor_slope_per_hour_2nd_half": round(fslope, 2)}
    return out


def summarize_csv(path: Path) -> dict[str, dict[str, float]]:
    with open(path) as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return _summarize(rows)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":  # bench/soak.py --summarize var/soak/soak.csv
        print(json.dumps(summarize_csv(Path(sys.argv[2])), indent=1))
        sys.exit(0)
    sys.exit(main())
