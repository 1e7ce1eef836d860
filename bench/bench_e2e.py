"""End to end: dlrm-daemon (real engines) driven by loadgen_driver Offline, per hot/cold device share.

For each `--gpu-parts` value it starts the daemon on the artifact and dataset, records the time from
start to 'serving' (artifact load + placement + dataset upload + warm-up), runs a short Offline
PerformanceOnly test through `loadgen_driver`, reads LoadGen's summary and the daemon's hot/cold lookup
counters, and stops the daemon with SIGTERM. Runs are short and NOT of MLPerf length. Example (GPU):
  python3 bench/bench_e2e.py --artifact A --dataset D --engines cuda:0 --gpu-parts 1.0,0.3 \
      --target-qps 300000 --duration-s 20 --out e2e.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import socket
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wire.client import Client, wait_until_serving  # noqa: E402
from wire.errors import ConnectionFailed  # noqa: E402
from loadgen_driver.summary import read_summary  # noqa: E402


def start_daemon(args: argparse.Namespace, gpu_part: float, runtime: Path,
                 metrics_port: int) -> tuple[subprocess.Popen[bytes], float]:
    cmd = [sys.executable, "-m", "daemon.cli", "--runtime-dir", str(runtime), "--model", str(args.artifact),
           "--datasets", f"bench={args.dataset}", "--engines", args.engines,
           "--embedding-weights-on-gpu-part", str(gpu_part), "--max-batch-pairs", str(args.max_batch_pairs),
           "--inflight-batches", str(args.inflight_batches), "--max-pairs-per-query", "2000000",
           "--max-queue-pairs", str(args.max_queue_pairs), "--heartbeat-timeout-s", "10",
           "--metrics-port", str(metrics_port), "--gpu-mlp-precision", args.mlp,
           # a random synthetic model: its AUC means nothing, so no accuracy profile (speed only)
           "--accuracy-target", "none"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    log = open(runtime / "daemon.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"ipc://{runtime}/dlrm.sock", args.start_timeout_s, proc)
    except ConnectionFailed as err:
        proc.kill()
        raise RuntimeError(f"{err}:\n{(runtime / 'daemon.log').read_text()[-3000:]}") from None
    return proc, time.monotonic() - t0


def lookup_counts(metrics_port: int) -> dict[str, float]:
    """Embedding lookups by tier from the daemon's own Prometheus exporter."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    counts = {"device": 0.0, "host": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dlrm_embedding_lookups_total":
                counts[sample.labels["tier"]] += sample.value
    return {"hot": counts["device"], "cold": counts["host"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def smaps_mb(pid: int) -> dict[str, float]:
    """A process's resident memory in MB (/proc/PID/smaps_rollup): Rss, Pss (shared pages split among the
    processes that map them) and Private (Private_Clean + Private_Dirty); empty where unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    kb = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}
    return {"rss_mb": kb.get("Rss", 0) / 1024, "pss_mb": kb.get("Pss", 0) / 1024,
            "private_mb": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024}


def engine_report(endpoint: str) -> list[dict[str, object]]:
    """Per engine: its device, the batches it has done (the routing's balance) and its host memory (one
    copy of shared cold rows, or one per engine)."""
    with Client(endpoint, timeout_s=10.0) as client:
        status = client.status()
    return [{"name": e["name"], "device": e["device"], "batches_done": e["batches_done"],
             **{k: round(v) for k, v in smaps_mb(int(e["pid"])).items()}} for e in status["engines"]]


def run_one(args: argparse.Namespace, gpu_part: float) -> list[dict[str, object]]:
    """One daemon; one driver run per target rate (Offline: its expected rate; Server: its offered rate)."""
    runtime = Path(tempfile.mkdtemp(prefix="dlrm-e2e-", dir="/tmp"))
    port = free_port()
    proc, ready_s = start_daemon(args, gpu_part, runtime, port)
    endpoint = f"ipc://{runtime}/dlrm.sock"
    rows: list[dict[str, object]] = []
    try:
        for qps in [float(q) for q in str(args.target_qps).split(",")]:
            out_dir = Path(args.logs) / f"part_{gpu_part}_{args.scenario}_{qps:g}"
            out_dir.mkdir(parents=True, exist_ok=True)
            before = lookup_counts(port)
            cmd = [sys.executable, "-m", "loadgen_driver.cli", "--scenario", args.scenario, "--mode",
                   "PerformanceOnly", "--dataset", str(args.dataset), "--dataset-name", "bench", "--endpoint",
                   endpoint, "--target-qps", f"{qps:g}", "--min-duration-s", str(args.duration_s),
                   "--min-query-count", "1", "--samples-per-request", str(args.samples_per_request),
                   "--max-inflight", str(args.max_inflight), "--output-dir", str(out_dir), "--quiet"]
            if args.scenario == "Server":
                cmd += ["--latency-ms", f"{args.latency_ms:g}"]
            t0 = time.monotonic()
            driver = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True,
                                    env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                        [str(ROOT), os.environ.get("PYTHONPATH", "")])})
            wall = time.monotonic() - t0
            print(driver.stdout[-2500:], driver.stderr[-1500:], sep="\n", flush=True)
            after = lookup_counts(port)
            summary = read_summary(out_dir)
            key = "Samples per second" if args.scenario == "Offline" else "Completed samples per second"
            pairs = re.search(r"([0-9,.]+) pairs/s", driver.stdout)
            hot, cold = after["hot"] - before["hot"], after["cold"] - before["cold"]
            p99 = summary.number("99.00 percentile latency (ns)")
            rows.append({"gpu_part": gpu_part, "mlp": args.mlp, "scenario": args.scenario, "target_qps": qps,
                         "ready_s": round(ready_s, 1), "samples_per_s": float(summary.values.get(key, "nan")),
                         "pairs_per_s": pairs.group(1) if pairs else None, "result": summary.result,
                         "p99_ms": None if p99 is None else round(p99 / 1e6, 2),
                         "hbm_share": hot / (hot + cold) if hot + cold else None,
                         "driver_rc": driver.returncode, "wall_s": round(wall, 1),
                         "host_rows": os.environ.get("DLRM_HOST_ROWS", "private"),
                         "cold_row_gather": os.environ.get("DLRM_COLD_ROW_GATHER", "kernel"),
                         "engines": engine_report(endpoint)})
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    for r in rows:
        r["daemon_exit"] = code
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--engines", default="cuda:0")
    p.add_argument("--gpu-parts", default="1.0")
    p.add_argument("--target-qps", default="300000", help="one rate or a comma list (Server: a sweep)")
    p.add_argument("--duration-s", type=float, default=20)
    p.add_argument("--samples-per-request", type=int, default=512)
    p.add_argument("--max-inflight", type=int, default=24)
    p.add_argument("--max-batch-pairs", type=int, default=262144)
    p.add_argument("--max-queue-pairs", type=int, default=16_000_000)
    p.add_argument("--inflight-batches", type=int, default=4)
    p.add_argument("--start-timeout-s", type=float, default=240)
    p.add_argument("--logs", default=str(Path(tempfile.gettempdir()) / "e2e-logs"))
    p.add_argument("--mlp", default="fp16", help="gpu_mlp_precision of the engines (fp16, bf16, int8, fp8)")
    p.add_argument("--scenario", default="Offline", choices=("Offline", "Server"))
    p.add_argument("--latency-ms", type=float, default=30.0, help="Server: the p99 bound")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows: list[dict[str, object]] = []
    for part in (float(x) for x in args.gpu_parts.split(",")):
        try:
            got = run_one(args, part)
        except Exception as exc:  # a failed configuration is reported, the others still run
            got = [{"gpu_part": part, "error": str(exc)[-2000:]}]
        rows += got
        for r in got:
            print(json.dumps(r), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    print("\ngpu_part  mlp   scenario target     ready_s  samples/s   pairs/s        p99_ms  HBM share  result")
    for r in rows:
        if "error" in r:
            print(f"{r['gpu_part']!s:<9} ERROR {str(r['error'])[:200]}")
            continue
        share = f"{r['hbm_share']:.3f}" if r["hbm_share"] is not None else "-"
        print(f"{r['gpu_part']!s:<9} {r['mlp']!s:<5} {r['scenario']!s:<8} {r['target_qps']!s:<10} {r['ready_s']!s:<8} "
              f"{float(str(r['samples_per_s'])):<11,.0f} {r['pairs_per_s']!s:<14} {r['p99_ms']!s:<7} {share:<10} "
              f"{r['result']}")
        for e in r.get("engines") or []:  # type: ignore[union-attr]
            print(f"    engine {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
