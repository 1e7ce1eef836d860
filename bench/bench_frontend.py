"""The front end's ceiling with N null engines (issue 15): one loadgen_driver, one dispatcher, N engines
that answer at once, predictions back through output regions (the default) or in the replies.

For each engine count a daemon is started (null engines, DLRM_NULL_FILL as given: 1 = each engine
writes a prediction per pair, 0 = it writes nothing) on a hollow dataset of reference-sized samples
(mean ~270 pairs; bench_driver.hollow_dataset), then `loadgen_driver` runs Offline with each way of
returning predictions and Server at the given rates. One JSON row per run, a table at the end.

    python3 bench/bench_frontend.py --engines 1,2,4,8 --offline-qps 6000000 \
        --server-qps 2000000,4000000,6000000 --duration-s 5 --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_driver import hollow_dataset  # noqa: E402
from formats.trace import reference_sample_sizes  # noqa: E402
from loadgen_driver.summary import read_summary  # noqa: E402
from wire.client import wait_until_serving  # noqa: E402


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def start(work: Path, engines: int, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    conf = work / f"daemon{engines}.toml"
    names = ", ".join(['"null"'] * engines)
    ds = work / "ds"
    conf.write_text(f'runtime_dir = "{work}"\nengines = [{names}]\n'
                    f"max_batch_pairs = {args.max_batch_pairs}\ninflight_batches = {args.inflight_batches}\n"
                    f"max_pairs_per_query = 8000000\nmax_queue_pairs = {args.max_queue_pairs}\n"
                    f'heartbeat_timeout_s = 10.0\nlog_level = "WARNING"\n[datasets]\nbench = "{ds}"\n')
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "DLRM_NULL_FILL": str(args.null_fill)}
    log = open(work / f"daemon{engines}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(conf)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"ipc://{work}/dlrm.sock"
    wait_until_serving(endpoint, 120, proc)
    return proc, endpoint


def drive(work: Path, endpoint: str, scenario: str, qps: float, predictions: str, issue: str,
          args: argparse.Namespace) -> dict[str, object]:
    out = work / f"{scenario}_{qps:g}_{predictions}_{issue}"
    cmd = [sys.executable, "-m", "loadgen_driver.cli", "--scenario", scenario, "--dataset", str(work / "ds"),
           "--dataset-name", "bench", "--endpoint", endpoint, "--target-qps", f"{qps:g}",
           "--min-duration-s", str(args.duration_s), "--min-query-count", "1",
           "--samples-per-request", str(args.samples_per_request), "--predictions", predictions,
           "--issue", issue, "--output-dir", str(out), "--quiet",
           "--completion-threads", str(args.completion_threads)]
    if scenario == "Server":
        cmd += ["--issue-threads", str(args.issue_threads)]
    if scenario == "Server":
        cmd += ["--latency-ms", "30"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": _pythonpath()}, capture_output=True, text=True,
                       timeout=600)
    s = read_summary(out)
    key = "Samples per second" if scenario == "Offline" else "Completed samples per second"
    p99 = s.number("99.00 percentile latency (ns)")
    errors = re.search(r"errors: ([\d,]+) samples", r.stdout)
    row: dict[str, object] = {
        "scenario": scenario, "target_qps": qps, "predictions": predictions, "issue": issue,
        "issue_threads": args.issue_threads if scenario == "Server" else 0, "completion_threads": args.completion_threads,
        "samples_per_s": float(s.values.get(key, "nan")), "result": s.result,
        "p99_ms": None if p99 is None else round(p99 / 1e6, 2), "driver_rc": r.returncode,
        "error_samples": int(errors.group(1).replace(",", "")) if errors else None,
        "requests": next((x for x in r.stdout.splitlines() if x.startswith("requests: ")), None)}
    if r.returncode:
        row["stderr"] = r.stderr[-600:]
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="1,2,4,8", help="null engine counts, one daemon each")
    ap.add_argument("--offline-qps", type=float, default=6_000_000, help="0: no Offline runs")
    ap.add_argument("--offline-predictions", default="region,reply")
    ap.add_argument("--server-qps", default="", help="comma list of Server rates")
    ap.add_argument("--server-predictions", default="region")
    ap.add_argument("--server-engines", default="", help="engine counts with Server runs (default: the largest)")
    ap.add_argument("--issue", default="capi", help="the driver's issue path for Offline (capi, ring)")
    ap.add_argument("--server-issue", default="ring", help="the driver's issue path for Server")
    ap.add_argument("--issue-threads", type=int, default=0, help="Server: LoadGen issue threads (--issue-threads)")
    ap.add_argument("--completion-threads", type=int, default=1, help="the driver's --completion-threads")
    ap.add_argument("--duration-s", type=float, default=5)
    ap.add_argument("--samples-per-request", type=int, default=16384)
    ap.add_argument("--max-batch-pairs", type=int, default=1 << 20)
    ap.add_argument("--inflight-batches", type=int, default=8)
    ap.add_argument("--max-queue-pairs", type=int, default=16_000_000)
    ap.add_argument("--null-fill", type=int, default=1, choices=(0, 1))
    ap.add_argument("--samples", type=int, default=204_800)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dlrm-fe-", dir="/tmp"))
    offsets = reference_sample_sizes(args.samples * 270)
    hollow_dataset(work / "ds", offsets[: args.samples + 1])
    counts = [int(n) for n in args.engines.split(",")]
    server_counts = [int(n) for n in args.server_engines.split(",")] if args.server_engines else counts[-1:]
    rows: list[dict[str, object]] = []
    try:
        for n in counts:
            proc, endpoint = start(work, n, args)
            try:
                runs = []
                if args.offline_qps > 0:
                    runs += [("Offline", args.offline_qps, p, args.issue) for p in args.offline_predictions.split(",")]
                if n in server_counts:
                    runs += [("Server", float(q), p, args.server_issue) for q in args.server_qps.split(",") if q
                             for p in args.server_predictions.split(",")]
                for scenario, qps, pred, issue in runs:
                    row = {"engines": n, "null_fill": args.null_fill, **drive(work, endpoint, scenario, qps, pred,
                                                                              issue, args)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nengines scenario target     predictions issue samples/s     p99_ms  result   failed")
    for r in rows:
        failed = bool(r["error_samples"]) or bool(r["driver_rc"])
        print(f"{r['engines']:<7} {r['scenario']:<8} {r['target_qps']:<10g} {r['predictions']:<11} {r['issue']:<5} "
              f"{r['samples_per_s']:<13,.0f} {r['p99_ms']!s:<7} {'FAILED' if failed else r['result']:<8} "
              f"{r['error_samples'] or 0:,}")
        if r.get("requests"):
            print(f"        {r['requests']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
