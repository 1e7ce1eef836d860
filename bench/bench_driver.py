"""LoadGen driver ceiling: LoadGen's own (null SUT in one process) vs loadgen_driver (null backend in
process, and through dlrm-daemon with its null engine when --daemon-endpoint is given).

Prints, per configuration, Offline samples/s and a Server sweep (VALID/INVALID, p99) at the given rates.
Runs are short (seconds) and NOT of MLPerf length. Example:
  .venv/bin/python bench/bench_driver.py --configs raw,driver --server-rates 100000,200000,350000
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlperf_loadgen as lg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from loadgen_driver import capi  # noqa: E402
from loadgen_driver.backend import Backend, InProcessBackend  # noqa: E402
from loadgen_driver.capi import CComplete  # noqa: E402
from loadgen_driver.runner import run_test  # noqa: E402
from loadgen_driver.settings import RunSettings, build_test_settings  # noqa: E402
from loadgen_driver.summary import read_summary  # noqa: E402


class RawNullSut:
    """LoadGen's own ceiling: complete every sample with an empty response, nothing else.

    inline: complete inside IssueQuery (on LoadGen's issue thread); else a second thread completes
    chunks of `chunk` samples (the REFERENCE's measurement).
    """

    def __init__(self, chunk: int, inline: bool, capi: "CComplete | None" = None) -> None:
        self.chunk, self.inline, self.capi = chunk, inline, capi
        self.q: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def issue(self, ids: list[int], _idx: list[int]) -> None:
        if self.inline:
            lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])
        else:
            self.q.put(ids)

    def _loop(self) -> None:
        while (ids := self.q.get()) is not None:
            if self.capi is not None:
                arr = np.array(ids, dtype=np.uint64)
                for k in range(0, len(arr), self.chunk):
                    self.capi.complete(arr[k:k + self.chunk], 0, 0)
                continue
            for k in range(0, len(ids), self.chunk):
                lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids[k:k + self.chunk]])


def hollow_dataset(path: Path, offsets: np.ndarray) -> Path:
    """A dataset directory whose pair arrays are zero-filled sparse files (the null engine never reads
    them): the daemon's by-reference path at any size without writing gigabytes."""
    from numpy.lib.format import open_memmap

    from formats.trace import write_trace

    path.mkdir(parents=True, exist_ok=True)
    n = int(offsets[-1])
    for name, dtype, tail in (("labels", "<f4", ()), ("dense", "<f4", (13,)), ("sparse", "<i4", (26,))):
        open_memmap(path / f"{name}.npy", mode="w+", dtype=dtype, shape=(n, *tail)).flush()
    np.save(path / "sample_offsets.npy", offsets.astype("<i8"), allow_pickle=False)
    write_trace(path / "trace.txt", offsets)
    (path / "meta.json").write_text(json.dumps({
        "format": "dlrm-dataset", "version": 1, "num_pairs": n, "num_samples": len(offsets) - 1,
        "table_rows": [50] * 26, "source": "bench_driver hollow"}))
    return path


def start_daemon(workdir: Path, engines: str, fill: bool, heartbeat_timeout_s: float) -> tuple[subprocess.Popen, str]:
    """`python -m daemon.cli` with null engines and a stand-in artifact; returns (process, endpoint)."""
    from wire.client import wait_until_serving
    from wire.errors import ConnectionFailed

    art = workdir / "art"
    art.mkdir(exist_ok=True)
    write_model_description(art, DLRMConfig((50,) * 26))
    engine_list = ", ".join(f'"{e}"' for e in engines.split(","))
    conf = workdir / "daemon.toml"
    conf.write_text(f'runtime_dir = "{workdir}"\nmodel = "{art}"\nengines = [{engine_list}]\n'
                    f'max_batch_pairs = 1048576\nmax_queue_pairs = 200000000\n'
                    f'max_pairs_per_query = 8000000\nlog_level = "WARNING"\n'
                    f'heartbeat_timeout_s = {heartbeat_timeout_s}\n')
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "DLRM_NULL_FILL": "1" if fill else "0"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(conf)], cwd=ROOT, env=env)
    endpoint = f"ipc://{workdir}/dlrm.sock"
    try:
        wait_until_serving(endpoint, 60, proc)
    except ConnectionFailed as err:
        proc.kill()
        raise SystemExit(str(err)) from None
    return proc, endpoint


def settings_for(scenario: str, qps: float, duration_s: float, n: int) -> lg.TestSettings:
    if scenario == "Offline":
        # A fixed sample count instead of a duration: a SUT faster than `qps` is not INVALID then.
        ts, _ = build_test_settings(RunSettings(scenario, "PerformanceOnly", n, target_qps=qps,
                                                min_duration_ms=0, min_query_count=int(qps * duration_s)))
        return ts
    ts, _ = build_test_settings(RunSettings(scenario, "PerformanceOnly", n, target_qps=qps,
                                            min_duration_ms=int(duration_s * 1000), min_query_count=1))
    return ts


def run_raw(scenario: str, qps: float, duration_s: float, n: int, chunk: int, inline: bool,
            out: Path, use_capi: bool = False, trace: bool = True) -> None:
    sut = RawNullSut(chunk, inline, capi.load() if use_capi else None)
    sut.thread.start()
    qsl = lg.ConstructQSL(n, n, lambda s: None, lambda s: None)
    handle = lg.ConstructFastSUT(sut.issue, lambda: None)
    ls = lg.LogSettings()
    ls.log_output.outdir = str(out)
    ls.enable_trace = trace  # LoadGen's default is on: a trace event per sample (the driver turns it off)
    lg.StartTestWithLogSettings(handle, qsl, settings_for(scenario, qps, duration_s, n), ls)
    sut.q.put(None)
    sut.thread.join()
    lg.DestroyFastSUT(handle)
    lg.DestroyQSL(qsl)


def make_backend(kind: str, offsets: np.ndarray, endpoint: str | None, dataset: str | None) -> Backend:
    if kind.startswith("driver"):
        return InProcessBackend(offsets, scores=False)
    from loadgen_driver.backend import DaemonBackend

    assert endpoint and dataset, "--daemon-endpoint and --dataset are needed for the daemon config"
    return DaemonBackend(endpoint, Path(dataset).name, str(Path(dataset).resolve()))


def one(config: str, scenario: str, qps: float, args: argparse.Namespace, offsets: np.ndarray) -> str:
    n = len(offsets) - 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.monotonic()
        extra = ""
        if config.startswith("raw"):
            run_raw(scenario, qps, args.duration_s, n, args.chunk, config == "raw-inline", out,
                    use_capi=config.startswith("raw-capi"), trace=not config.endswith("-notrace"))
        else:
            backend = make_backend(config, offsets, args.daemon_endpoint, args.dataset)
            try:
                r = run_test(backend, settings_for(scenario, qps, args.duration_s, n), n, out, offsets,
                             samples_per_request=args.samples_per_request, max_inflight=args.max_inflight,
                             completion="python" if "-python" in config else "capi",
                             issue="capi" if "-cissue" in config else "fast")
            finally:
                backend.close()
            extra = f" | {r.stats.complete_ns_per_sample():,.0f} ns/sample completing, errors {r.stats.error_samples}"
            if r.stats.errors:
                extra += f" ({r.stats.errors[0][:90]})"
        s = read_summary(out)
    wall = time.monotonic() - t0
    key = "Samples per second" if scenario == "Offline" else "Completed samples per second"
    sps = s.number(key) or 0.0
    p99 = (s.number("99.00 percentile latency (ns)") or 0) / 1e6
    return (f"| {config} | {scenario} | {qps:,.0f} | {sps:,.0f} | {p99:.1f} | {s.result} "
            f"| {wall:.0f} s{extra} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="raw,driver", help="raw, raw-inline, raw-capi (raw*: suffix -notrace turns LoadGen's trace off), "
                   "driver, daemon; driver/daemon suffixes: -python "
                   "(QuerySampleResponse objects), -cissue (C-API SUT)")
    p.add_argument("--offline-qps", type=float, default=1_000_000)
    p.add_argument("--server-rates", default="100000,200000,350000")
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--samples", type=int, default=204800, help="QSL size (synthetic offsets, 270 pairs mean)")
    p.add_argument("--chunk", type=int, default=4096, help="raw: completion chunk")
    p.add_argument("--samples-per-request", type=int, default=4096)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval")
    p.add_argument("--daemon-endpoint", default=None, help="a running daemon (else --start-daemon)")
    p.add_argument("--dataset", default=None, help="dataset directory (daemon config; else synthetic)")
    p.add_argument("--start-daemon", default=None, metavar="ENGINES",
                   help="start dlrm-daemon with these engines (e.g. null or null,null) on a hollow dataset")
    p.add_argument("--heartbeat-timeout-s", type=float, default=1.0, help="daemon engine heartbeat bound")
    p.add_argument("--no-fill", action="store_true", help="null engine skips writing predictions")
    args = p.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.dataset and not args.start_daemon:
        from formats.dataset import Dataset

        offsets = np.asarray(Dataset.open(Path(args.dataset)).sample_offsets, dtype=np.int64)
    else:
        sizes = np.random.default_rng(123).choice([100, 100] + [200] * 12 + [300, 300, 400, 500, 600, 700],
                                                   args.samples)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    daemon = None
    if args.start_daemon:
        work = Path(tempfile.mkdtemp(prefix="bdrv-", dir="/tmp"))
        args.dataset = str(hollow_dataset(work / "ds", offsets))
        daemon, args.daemon_endpoint = start_daemon(work, args.start_daemon, not args.no_fill,
                                                    args.heartbeat_timeout_s)
        print(f"daemon: engines {args.start_daemon}, fill {not args.no_fill}, at {args.daemon_endpoint}")
    try:
        run_all(args, offsets)
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
    return 0


def run_all(args: argparse.Namespace, offsets: np.ndarray) -> None:
    print(f"switchinterval {sys.getswitchinterval()} s, duration {args.duration_s} s per run, "
          f"{len(offsets) - 1} samples, chunk {args.chunk}, samples/request {args.samples_per_request}")
    print("| config | scenario | target/s | samples/s | p99 ms | result | notes |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        print(one(config, "Offline", args.offline_qps, args, offsets), flush=True)
        for rate in [float(r) for r in args.server_rates.split(",") if r]:
            print(one(config, "Server", rate, args, offsets), flush=True)


if __name__ == "__main__":
    sys.exit(main())
