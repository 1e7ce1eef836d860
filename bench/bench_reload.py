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
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen_driver.summary import read_summary  # noqa: E402
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
    rt = Path(tempfile.mkdtemp(prefix="dlrm-reload-", dir="/tmp"))
    config = rt / "daemon.toml"
    engines = ", ".join(f'"{e}"' for e in args.engines.split(","))
    config.write_text(f'runtime_dir = "{rt}"\nmodel = "{args.artifact}"\nengines = [{engines}]\n'
                      f'max_batch_pairs = {args.max_batch_pairs}\ninflight_batches = {args.inflight_batches}\n'
                      f'max_pairs_per_query = 2000000\nmax_queue_pairs = 16000000\nheartbeat_timeout_s = 10.0\n'
                      f'gpu_mlp_precision = "{args.mlp}"\naccuracy_target = "none"\n'
                      f'[datasets]\nbench = "{args.dataset}"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    endpoint = f"ipc://{rt}/dlrm.sock"
    log = open(rt / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    res: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        t0 = time.monotonic()
        wait_until_serving(endpoint, args.start_timeout_s, daemon)
        res["ready_s"] = round(time.monotonic() - t0, 1)
        out_dir = rt / "loadgen"
        driver = subprocess.Popen(
            [sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Server", "--mode", "PerformanceOnly",
             "--dataset", str(args.dataset), "--dataset-name", "bench", "--endpoint", endpoint, "--target-qps",
             f"{args.target_qps:g}", "--latency-ms", f"{args.latency_ms:g}", "--min-duration-s",
             str(args.duration_s), "--min-query-count", "1", "--output-dir", str(out_dir), "--quiet"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(args.reload_after_s)
        config.write_text(re.sub(r'^model = .*$', f'model = "{args.new_artifact}"', config.read_text(), flags=re.M))
        t1 = time.monotonic()
        reload = subprocess.run([sys.executable, "-m", "daemon.cli", "reload", "--config", str(config)], cwd=ROOT,
                                env=env, capture_output=True, text=True)
        res["reload_s"] = round(time.monotonic() - t1, 2)
        res["reload_rc"] = reload.returncode
        res["reload_output"] = (reload.stdout + reload.stderr).strip()
        print(res["reload_output"], flush=True)
        out, err = driver.communicate(timeout=args.duration_s * 4 + 120)
        print(out[-1500:], err[-1500:], sep="\n", flush=True)
        summary = read_summary(out_dir)
        p99 = summary.number("99.00 percentile latency (ns)")
        errors = re.search(r"errors: ([\d,]+) samples", out)
        res.update(driver_rc=driver.returncode, result=summary.result,
                   completed_samples_per_s=float(summary.values.get("Completed samples per second", "nan")),
                   p99_ms=None if p99 is None else round(p99 / 1e6, 2),
                   error_samples=int(errors.group(1).replace(",", "")) if errors else None)
    finally:
        daemon.send_signal(signal.SIGTERM)
        res["daemon_exit"] = daemon.wait(120)
        log.close()
        res["daemon_log_tail"] = (rt / "daemon.log").read_text(errors="replace")[-2500:]
    print(json.dumps({k: v for k, v in res.items() if k != "daemon_log_tail"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0 if res.get("reload_rc") == 0 and res.get("result") == "VALID" else 1


if __name__ == "__main__":
    raise SystemExit(main())
