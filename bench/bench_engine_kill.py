"""The only engine SIGKILLed during a LoadGen Server run, with and without a standby engine (issue 14 item 3).

    python3 bench/bench_engine_kill.py --artifact A --dataset D [--engines cuda:0] [--mlp fp8] \
        [--standby 0,1] [--target-qps 300000] [--duration-s 30] [--kill-after-s 10] [--out kill.json]

Per --standby value: starts dlrm-daemon (`standby_engines` off or on), runs `loadgen_driver --scenario
Server`, SIGKILLs the active engine --kill-after-s into it, and polls the daemon's status every 20 ms to
time (a) the service gap: from the kill until an engine that takes batches completes a batch, and (b) the
restart: until the killed engine is loaded again (as the new spare with a standby, as the engine without).
Reports LoadGen's result, p99, errors. Runs are short, NOT of MLPerf length.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_daemon import BenchDaemon  # noqa: E402
from wire.client import Client, wait_until_serving  # noqa: E402

SERVING = ("ready", "busy", "starved")


def _engines(c: Client) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.status()["engines"]}


def run_one(args: argparse.Namespace, standby: bool) -> dict[str, Any]:
    bench = BenchDaemon("dlrm-kill-", args.artifact, args.dataset, args.engines, args.mlp, args.max_batch_pairs,
                        extra=f"restart_backoff_s = 0.5\nstandby_engines = {'true' if standby else 'false'}\n")
    res: dict[str, Any] = {"standby_engines": standby, "target_qps": args.target_qps}
    with bench:
        t0 = time.monotonic()
        wait_until_serving(bench.endpoint, args.start_timeout_s, bench.proc)
        with Client(bench.endpoint, timeout_s=10) as c:
            while standby and not all(e["state"] in SERVING for e in _engines(c).values()):
                time.sleep(0.2)  # the spare loads too
            res["ready_s"] = round(time.monotonic() - t0, 1)
            run = bench.server_run(args.dataset, args.target_qps, args.duration_s)
            time.sleep(args.kill_after_s)
            before = _engines(c)
            victim = next(e for e in before.values() if e["role"] == "active")
            done_before = {n: e["batches_done"] for n, e in before.items()}
            killed = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            gap = restart = None
            while time.monotonic() - killed < 120 and (gap is None or restart is None):
                now = _engines(c)
                t = round(time.monotonic() - killed, 3)
                if gap is None and any(e["role"] == "active" and e["batches_done"] > done_before.get(n, 0)
                                       and e["pid"] != victim["pid"] for n, e in now.items()):
                    gap = t  # a batch completed on an engine other than the killed process
                v = now.get(victim["name"])
                if restart is None and v is not None and v["pid"] != victim["pid"] and v["state"] in SERVING:
                    restart = t
                time.sleep(0.02)
            res.update(killed=victim["name"], service_gap_s=gap, restart_to_ready_s=restart,
                       roles_after={n: e["role"] for n, e in _engines(c).items()})
        res.update(run.result())
    res["daemon_exit"] = bench.exit_code
    print(json.dumps(res), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--engines", default="cuda:0")
    ap.add_argument("--mlp", default="fp16")
    ap.add_argument("--standby", default="0,1", help="comma list of 0/1: runs without / with a standby engine")
    ap.add_argument("--target-qps", type=float, default=300000)
    ap.add_argument("--duration-s", type=float, default=30)
    ap.add_argument("--kill-after-s", type=float, default=10)
    ap.add_argument("--max-batch-pairs", type=int, default=262144)
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [run_one(args, s == "1") for s in args.standby.split(",")]
    print("\nstandby  ready_s  service_gap_s  restart_to_ready_s  samples/s    p99_ms   errors  result")
    for r in rows:
        print(f"{r['standby_engines']!s:<8} {r.get('ready_s')!s:<8} {r.get('service_gap_s')!s:<14} "
              f"{r.get('restart_to_ready_s')!s:<19} {r.get('completed_samples_per_s', float('nan')):<12,.0f} "
              f"{r.get('p99_ms')!s:<8} {r.get('error_samples')!s:<7} {r.get('result')}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
