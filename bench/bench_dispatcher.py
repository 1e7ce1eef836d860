"""The dispatcher's own ceiling with null engines: samples/s and microseconds per message.

Starts a real `dlrm-daemon` (subprocess) with `null` engines that return at once (DLRM_NULL_FILL=0:
the engine leaves predictions as they are, so only dispatcher work is measured: receive, validate,
sample -> pair ranges, batch, shared-memory write, control messages, reply with the predictions
copied out of the slot) and drives it from this process with a PipelinedClient keeping `--window`
queries in flight. The dataset is a sparse-file stand-in (reference sample sizes, mean ~270 pairs)
that takes no disk space.

  .venv/bin/python bench/bench_dispatcher.py                      # the table in BENCHMARKS.md
  .venv/bin/python bench/bench_dispatcher.py --samples 1 64 --seconds 2
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wire.client import PipelinedClient, wait_until_serving  # noqa: E402
from wire.messages import NO_DEADLINE  # noqa: E402
from formats.trace import reference_sample_sizes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sparse_dataset(path: Path, num_pairs: int) -> np.ndarray:
    """A valid dataset directory whose big arrays are holes (the null engine never reads them)."""
    path.mkdir(parents=True)
    offsets = reference_sample_sizes(num_pairs)
    n = int(offsets[-1])
    for name, dt, tail in (("labels", "<f4", ()), ("dense", "<f4", (13,)), ("sparse", "<i4", (26,))):
        with open(path / f"{name}.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": dt, "fortran_order": False, "shape": (n, *tail)})
            f.truncate(f.tell() + n * int(np.prod(tail, dtype=np.int64)) * 4)
    np.save(path / "sample_offsets.npy", offsets.astype("<i8"), allow_pickle=False)
    (path / "meta.json").write_text(json.dumps({
        "format": "dlrm-dataset", "version": 1, "num_pairs": n, "num_samples": len(offsets) - 1,
        "table_rows": [1000] * 26, "source": "bench"}))
    return offsets


def run_load(endpoint: str, make_send, seconds: float, window: int) -> tuple[int, float, int]:  # type: ignore[no-untyped-def]
    """Keep `window` requests in flight for `seconds`; returns (replies, elapsed, errors)."""
    pc = PipelinedClient(endpoint)
    send = make_send(pc)
    rid = 0
    for _ in range(window):
        send(rid)
        rid += 1
    done = errors = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        replies = pc.poll(5000)
        if not replies:
            raise RuntimeError(f"no reply within 5 s ({rid - done} requests outstanding)")
        now = time.perf_counter()
        for r in replies:
            done += 1
            errors += r.error is not None
            if now < end:
                send(rid)
                rid += 1
        if done == rid:
            break
    elapsed = time.perf_counter() - t0
    pc.close()
    return done, elapsed, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 16, 64, 256, 1024], help="samples per by-ref query")
    ap.add_argument("--value-pairs", type=int, nargs="+", default=[4096, 65536], help="pairs per by-value query")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=64, help="queries in flight")
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--max-batch-pairs", type=int, default=262144)
    ap.add_argument("--inflight-batches", type=int, default=4)
    ap.add_argument("--fill", action="store_true", help="null engine writes per-pair predictions")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dlrmb-", dir="/tmp"))
    offsets = sparse_dataset(tmp / "ds", 30_000_000)
    num_samples = len(offsets) - 1
    sizes = np.diff(offsets)
    cfg = tmp / "d.toml"
    engines = ", ".join(['"null"'] * args.engines)
    cfg.write_text(
        f'runtime_dir = "{tmp}"\nengines = [{engines}]\n'
        f'max_batch_pairs = {args.max_batch_pairs}\ninflight_batches = {args.inflight_batches}\n'
        f'max_queue_pairs = 64000000\nmax_pairs_per_query = 16000000\nmax_message_bytes = 1073741824\n'
        f'log_level = "WARNING"\n[datasets]\nds = "{tmp}/ds"\n')
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "DLRM_NULL_FILL": "1" if args.fill else "0"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(cfg)], cwd=REPO, env=env)
    endpoint = f"ipc://{tmp}/dlrm.sock"
    try:
        wait_until_serving(endpoint, 30, proc)
        rng = np.random.default_rng(0)
        print(f"# {os.cpu_count()} cores, {args.engines} null engine(s), window {args.window}, "
              f"max_batch_pairs {args.max_batch_pairs}, fill={args.fill}")
        print(f"{'by-ref samples/query':>20} {'queries/s':>10} {'us/message':>10} {'samples/s':>12} "
              f"{'pairs/s':>13} {'reply MB/s':>10} errors")
        for k in args.samples:
            pool = [rng.integers(0, num_samples, size=k) for _ in range(256)]
            mean_pairs = float(np.mean([sizes[p].sum() for p in pool])) / k

            def make_send(pc: PipelinedClient, pool=pool):  # type: ignore[no-untyped-def]
                # throughput work: the daemon's latency admission would refuse part of a 64-deep window
                return lambda rid: pc.send_by_ref(rid, "ds", pool[rid & 255], deadline_s=NO_DEADLINE)

            done, el, err = run_load(endpoint, make_send, args.seconds, args.window)
            qps = done / el
            print(f"{k:>20} {qps:>10,.0f} {1e6 / qps:>10.1f} {qps * k:>12,.0f} {qps * k * mean_pairs:>13,.0f} "
                  f"{qps * k * mean_pairs * 4 / 1e6:>10,.0f} {err}")
        print(f"{'by-value pairs/query':>20} {'queries/s':>10} {'us/message':>10} {'in MB/s':>12}")
        for n in args.value_pairs:
            dense = rng.random((n, 13), dtype=np.float32)
            sparse = rng.integers(0, 1000, size=(n, 26)).astype(np.int32)

            def make_send_v(pc: PipelinedClient, dense=dense, sparse=sparse):  # type: ignore[no-untyped-def]
                return lambda rid: pc.send_by_value(rid, dense, sparse, deadline_s=NO_DEADLINE)

            done, el, err = run_load(endpoint, make_send_v, args.seconds, min(args.window, 16))
            qps = done / el
            print(f"{n:>20} {qps:>10,.0f} {1e6 / qps:>10.1f} {qps * n * 156 / 1e6:>12,.0f} errors={err}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        subprocess.run(["rm", "-rf", str(tmp)])
    return code


if __name__ == "__main__":
    sys.exit(main())
