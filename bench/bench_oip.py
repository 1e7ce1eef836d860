"""The Open Inference Protocol front end beside the native path: the same LoadGen runs through both (issue 17).

    python3 bench/bench_oip.py --dataset D [--artifact A --engines cuda:0 --mlp fp8] \
        [--offline-qps 400000] [--server-qps 300000,400000] [--duration-s 10] [--out oip.json]

Starts dlrm-daemon with the front end on (REST and gRPC ports on loopback), then runs `loadgen_driver`
Offline (and a Server sweep) natively and with `--backend oip` by value and by reference, one run after the
other against the same daemon. Without --artifact the engines are `null` (the front end's own ceiling: no
model computes). Runs are short, NOT of MLPerf length.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen_driver.summary import read_summary  # noqa: E402
from wire.client import wait_until_serving  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--engines", default="null")
    ap.add_argument("--mlp", default="fp16")
    ap.add_argument("--offline-qps", type=float, default=100000)
    ap.add_argument("--server-qps", default="", help="comma list of Server rates (empty: no Server runs)")
    ap.add_argument("--duration-s", type=float, default=10)
    ap.add_argument("--paths", default="native,oip-value,oip-reference")
    ap.add_argument("--samples-per-request", type=int, default=512)
    ap.add_argument("--max-batch-pairs", type=int, default=262144)
    ap.add_argument("--inflight-batches", type=int, default=4, help="the daemon's inflight_batches per engine")
    ap.add_argument("--oip-workers", type=int, default=1, help="front end processes on the ports (oip_workers)")
    ap.add_argument("--oip-channels", type=int, default=1, help="the driver's gRPC connections (--oip-channels)")
    ap.add_argument("--max-inflight", type=int, default=64, help="the driver's requests in flight (--max-inflight)")
    ap.add_argument("--issue", default="capi", help="the driver's issue path (--issue: capi, ring, fast)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rt = Path(tempfile.mkdtemp(prefix="dlrm-oip-", dir="/tmp"))
    http, grpc = _port(), _port()
    engines = ", ".join(f'"{e}"' for e in args.engines.split(","))
    config = rt / "daemon.toml"
    config.write_text(f'runtime_dir = "{rt}"\nengines = [{engines}]\n'
                      + (f'model = "{args.artifact}"\ngpu_mlp_precision = "{args.mlp}"\naccuracy_target = "none"\n'
                         if args.artifact else "")
                      + f"max_batch_pairs = {args.max_batch_pairs}\ninflight_batches = {args.inflight_batches}\n"
                        "max_pairs_per_query = 4000000\n"
                        f"max_queue_pairs = 16000000\nheartbeat_timeout_s = 10.0\noip_http_port = {http}\n"
                        f'oip_grpc_port = {grpc}\noip_workers = {args.oip_workers}\nlog_level = "WARNING"\n'
                        f'[datasets]\nbench = "{args.dataset}"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "DLRM_NULL_FILL": "1"}
    endpoint = f"ipc://{rt}/dlrm.sock"
    log = open(rt / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    rows: list[dict[str, object]] = []
    try:
        wait_until_serving(endpoint, 600, daemon)
        runs = ([("Offline", args.offline_qps)] if args.offline_qps > 0 else []) \
            + [("Server", float(q)) for q in args.server_qps.split(",") if q]
        for scenario, qps in runs:
            for path in args.paths.split(","):
                out_dir = rt / f"{path}_{scenario}_{qps:g}"
                cmd = [sys.executable, "-m", "loadgen_driver.cli", "--scenario", scenario, "--dataset", str(args.dataset),
                       "--dataset-name", "bench", "--target-qps", f"{qps:g}", "--min-duration-s", str(args.duration_s),
                       "--min-query-count", "1", "--samples-per-request", str(args.samples_per_request),
                       "--max-inflight", str(args.max_inflight), "--issue", args.issue,
                       "--output-dir", str(out_dir), "--quiet"]
                cmd += (["--endpoint", endpoint] if path == "native" else
                        ["--backend", "oip", "--url", f"127.0.0.1:{grpc}", "--oip-inputs", path.split("-", 1)[1],
                         "--oip-channels", str(args.oip_channels)])
                if scenario == "Server":
                    cmd += ["--latency-ms", "30"]
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                s = read_summary(out_dir)
                key = "Samples per second" if scenario == "Offline" else "Completed samples per second"
                p99 = s.number("99.00 percentile latency (ns)")
                errors = re.search(r"errors: ([\d,]+) samples", r.stdout)
                row = {"path": path, "scenario": scenario, "target_qps": qps,
                       "samples_per_s": float(s.values.get(key, "nan")), "result": s.result,
                       "p99_ms": None if p99 is None else round(p99 / 1e6, 2), "driver_rc": r.returncode,
                       "error_samples": int(errors.group(1).replace(",", "")) if errors else None}
                if r.returncode:
                    row["stderr"] = r.stderr[-800:]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
        log.close()
    # LoadGen's VALID says nothing of failed samples (an OVERLOADED reply completes its samples): a run
    # with any failed sample is FAILED here, whatever LoadGen said
    print(f"\ndaemon exit {code}; engines {args.engines}\npath            scenario target     samples/s     p99_ms  "
          "result   failed samples")
    for r in rows:
        failed = bool(r["error_samples"]) or bool(r["driver_rc"])
        print(f"{r['path']:<15} {r['scenario']:<8} {r['target_qps']:<10g} {r['samples_per_s']:<13,.0f} "
              f"{r['p99_ms']!s:<7} {'FAILED' if failed else r['result']:<8} {r['error_samples'] or 0:,}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
