"""LoadGen driver ceiling: LoadGen's own (null SUT in one process) vs loadgen_driver (null backend in
process, and through dlrm-daemon with its null engine when --daemon-endpoint is given).

Prints, per configuration, Offline samples/s and a Server sweep (VALID/INVALID, p99) at the given rates.
Runs are short (seconds) and NOT of MLPerf length. Example:
  .venv/bin/python bench/bench_driver.py --configs raw,driver --server-rates 100000,200000,350000
"""
from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlperf_loadgen as lg
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadgen_driver import capi  # noqa: E402
from loadgen_driver.backend import Backend, NullBackend  # noqa: E402
from loadgen_driver.capi import CComplete  # noqa: E402
from loadgen_driver.runner import run_test  # noqa: E402
from loadgen_driver.settings import RunSettings, build_test_settings  # noqa: E402
from loadgen_driver.summary import read_summary  # noqa: E402


class RawNullSut:
    """LoadGen's own ceiling: complete every sample with an empty response, nothing else.

    inline: complete inside IssueQuery (on LoadGen's issue thread); else a second thread completes
    chunks of `chunk` samples (the SPEC's measurement).
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


def settings_for(scenario: str, qps: float, duration_s: float, n: int) -> lg.TestSettings:
    ts, _ = build_test_settings(RunSettings(scenario, "PerformanceOnly", n, target_qps=qps,
                                            min_duration_ms=int(duration_s * 1000), min_query_count=1))
    return ts


def run_raw(scenario: str, qps: float, duration_s: float, n: int, chunk: int, inline: bool,
            out: Path, use_capi: bool = False) -> None:
    sut = RawNullSut(chunk, inline, capi.load() if use_capi else None)
    sut.thread.start()
    qsl = lg.ConstructQSL(n, n, lambda s: None, lambda s: None)
    handle = lg.ConstructFastSUT(sut.issue, lambda: None)
    ls = lg.LogSettings()
    ls.log_output.outdir = str(out)
    lg.StartTestWithLogSettings(handle, qsl, settings_for(scenario, qps, duration_s, n), ls)
    sut.q.put(None)
    sut.thread.join()
    lg.DestroyFastSUT(handle)
    lg.DestroyQSL(qsl)


def make_backend(kind: str, offsets: np.ndarray, endpoint: str | None, dataset: str | None) -> Backend:
    if kind.startswith("driver"):
        return NullBackend(offsets, scores=False)
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
                    use_capi=config == "raw-capi")
        else:
            backend = make_backend(config, offsets, args.daemon_endpoint, args.dataset)
            try:
                r = run_test(backend, settings_for(scenario, qps, args.duration_s, n), n, out, offsets,
                             samples_per_request=args.samples_per_request, max_inflight=args.max_inflight,
                             completion="python" if config.endswith("-python") else "capi")
            finally:
                backend.close()
            extra = f" | {r.stats.complete_ns_per_sample():,.0f} ns/sample completing, errors {r.stats.error_samples}"
        s = read_summary(out)
    wall = time.monotonic() - t0
    key = "Samples per second" if scenario == "Offline" else "Completed samples per second"
    sps = s.number(key) or 0.0
    p99 = (s.number("99.00 percentile latency (ns)") or 0) / 1e6
    return (f"| {config} | {scenario} | {qps:,.0f} | {sps:,.0f} | {p99:.1f} | {s.result} "
            f"| {wall:.0f} s{extra} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="raw,driver", help="raw, raw-inline, raw-capi, driver, driver-python, daemon, daemon-python")
    p.add_argument("--offline-qps", type=float, default=1_000_000)
    p.add_argument("--server-rates", default="100000,200000,350000")
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--samples", type=int, default=204800, help="QSL size (synthetic offsets, 270 pairs mean)")
    p.add_argument("--chunk", type=int, default=4096, help="raw: completion chunk")
    p.add_argument("--samples-per-request", type=int, default=4096)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval")
    p.add_argument("--daemon-endpoint", default=None)
    p.add_argument("--dataset", default=None, help="dataset directory (daemon config; else synthetic)")
    args = p.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.dataset:
        from formats.dataset import Dataset

        offsets = np.asarray(Dataset.open(Path(args.dataset)).sample_offsets, dtype=np.int64)
    else:
        sizes = np.random.default_rng(123).choice([100, 100] + [200] * 12 + [300, 300, 400, 500, 600, 700],
                                                   args.samples)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    print(f"switchinterval {sys.getswitchinterval()} s, duration {args.duration_s} s per run, "
          f"{len(offsets) - 1} samples, chunk {args.chunk}, samples/request {args.samples_per_request}")
    print("| config | scenario | target/s | samples/s | p99 ms | result | notes |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        print(one(config, "Offline", args.offline_qps, args, offsets), flush=True)
        for rate in [float(r) for r in args.server_rates.split(",") if r]:
            print(one(config, "Server", rate, args, offsets), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
