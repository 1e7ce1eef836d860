"""A model reload in the middle of a LoadGen Server run: what LoadGen sees (result, p99, errors) and how long
the swap takes, on any engines (issue 16; docs/RELIABILITY.md).

    python3 bench/bench_reload.py --artifact A --new-artifact B --dataset D --engines cuda:0 \
        --target-qps 300000 --duration-s 40 --reload-after-s 10 [--mlp fp8] [--out reload.json]

Starts dlrm-daemon on A from a config file, starts `loadgen_driver --scenario Server`, waits
--reload-after-s, rewrites the config's `model` to B and runs `dlrm-daemon reload --config FILE` (timed),
then waits for the driver and reads LoadGen's summary. A and B must have the same shape (a copy of A in
another directory is another model id). Runs are short, NOT of MLPerf length.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_daemon import BenchDaemon  # noqa: E402
from wire.client import wait_until_serving  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--new-artifact", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--engines", default="cuda:0")
    ap.add_argument("--mlp", default="fp16", help="gpu_mlp_precision")
    ap.add_argument("--target-qps", type=float, default=300000)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--duration-s", type=float, default=40)
    ap.add_argument("--reload-after-s", type=float, default=10)
    ap.add_argument("--max-batch-pairs", type=int, default=262144)
    ap.add_argument("--inflight-batches", type=int, default=4)
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    bench = BenchDaemon("dlrm-reload-", args.artifact, args.dataset, args.engines, args.mlp, args.max_batch_pairs,
                        args.inflight_batches)
    with bench:
        t0 = time.monotonic()
        wait_until_serving(bench.endpoint, args.start_timeout_s, bench.proc)
        res["ready_s"] = round(time.monotonic() - t0, 1)
        run = bench.server_run(args.dataset, args.target_qps, args.duration_s, args.latency_ms)
        time.sleep(args.reload_after_s)
        text = bench.config.read_text()
        bench.config.write_text(re.sub(r'^model = .*$', f'model = "{args.new_artifact}"', text, flags=re.M))
        t1 = time.monotonic()
        reload = subprocess.run([sys.executable, "-m", "daemon.cli", "reload", "--config", str(bench.config)],
                                cwd=ROOT, env=bench.env, capture_output=True, text=True)
        res["reload_s"] = round(time.monotonic() - t1, 2)
        res["reload_rc"] = reload.returncode
        res["reload_output"] = (reload.stdout + reload.stderr).strip()
        print(res["reload_output"], flush=True)
        res.update(run.result())
    res["daemon_exit"] = bench.exit_code
    res["daemon_log_tail"] = bench.log_path.read_text(errors="replace")[-2500:]
    print(json.dumps({k: v for k, v in res.items() if k != "daemon_log_tail"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0 if res.get("reload_rc") == 0 and res.get("result") == "VALID" else 1


if __name__ == "__main__":
    raise SystemExit(main())
