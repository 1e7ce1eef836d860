"""LoadGen's own ceiling on this host: a SUT in C that completes every sample at once (issue 15).

The front end (driver + dispatcher + null engines) stops near 3.3-3.8 M samples/s Offline and 2 M Server on the
16-core GPU host, and its profiles put the rest of the time in LoadGen's C++ (BENCHMARKS.md). This measures
what LoadGen itself carries there with no Python and no work in the SUT: `bench/loadgen_null_sut.c` takes
IssueQuery in C and completes each sample through LoadGen's C QuerySamplesComplete, inline or on W C threads,
with LoadGen's settings as the driver sets them (loadgen_driver/settings.py: coalesced Server queries). No
driver can beat this figure with one LoadGen in the process; it tells whether issue 15's 6 M is within
LoadGen's reach on this CPU.

    python3 bench/loadgen_ceiling.py --offline-qps 8000000 --server-qps 3000000,6000000 --workers 0,4 \
        --issue-threads 0,4 --duration-s 5 --out OUT.json

Each run is a process of its own (LoadGen's issue threads serve one test per process).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SOURCE = Path(__file__).with_name("loadgen_null_sut.c")


def build(out_dir: Path) -> Path:
    lib = out_dir / "loadgen_null_sut.so"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(SOURCE)], check=True)
    return lib


def one_run(lib_path: Path, scenario: str, qps: float, workers: int, issuers: int, duration_s: float,
            samples: int, chunk: int) -> dict[str, object]:
    """One LoadGen test in this process against the C null SUT."""
    import mlperf_loadgen as lg

    from loadgen_driver.capi import (C_COMPLETE, C_CONSTRUCT_SUT, C_DESTROY_SUT, C_REGISTER_ISSUE_THREAD,
                                     _addresses)
    from loadgen_driver.settings import RunSettings, build_test_settings
    from loadgen_driver.summary import read_summary

    addrs = _addresses([C_COMPLETE, C_CONSTRUCT_SUT, C_DESTROY_SUT, C_REGISTER_ISSUE_THREAD])
    if addrs is None:
        raise SystemExit("LoadGen's C API symbols not found in this mlperf_loadgen build")
    lib = ctypes.CDLL(str(lib_path))
    lib.null_start.argtypes, lib.null_start.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    lib.null_start_issuers.argtypes, lib.null_start_issuers.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_int
    lib.null_stop.argtypes, lib.null_stop.restype = [ctypes.c_void_p], None
    ts, _ = build_test_settings(RunSettings(scenario, "PerformanceOnly", samples, qps,
                                            min_duration_ms=int(duration_s * 1000), min_query_count=1))
    if lib.null_start(addrs[C_COMPLETE], chunk, workers) != 0:
        raise SystemExit("could not start the completion threads")
    if scenario == "Server" and issuers:
        ts.server_num_issue_query_threads = issuers
        if lib.null_start_issuers(issuers, addrs[C_REGISTER_ISSUE_THREAD]) != 0:
            raise SystemExit("could not start the issue threads")
    construct = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_void_p)(addrs[C_CONSTRUCT_SUT])
    destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(addrs[C_DESTROY_SUT])
    name = b"loadgen-null-sut"
    sut = construct(0, name, len(name), ctypes.cast(lib.null_issue, ctypes.c_void_p).value,
                    ctypes.cast(lib.null_flush, ctypes.c_void_p).value)
    qsl = lg.ConstructQSL(samples, samples, lambda _s: None, lambda _s: None)
    out_dir = Path(tempfile.mkdtemp(prefix="lg-ceiling-"))
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(out_dir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False
    t0 = time.monotonic()
    lg.StartTestWithLogSettings(sut, qsl, ts, log_settings)
    wall = time.monotonic() - t0
    counts = (ctypes.c_uint64 * 2)()
    lib.null_stop(counts)
    destroy(sut)
    lg.DestroyQSL(qsl)
    summary = read_summary(out_dir)
    key = "Samples per second" if scenario == "Offline" else "Completed samples per second"
    p99 = summary.number("99.00 percentile latency (ns)")
    return {"scenario": scenario, "target_qps": qps, "workers": workers, "issue_threads": issuers,
            "samples_per_s": summary.number(key), "result": summary.result,
            "p99_ms": None if p99 is None else round(p99 / 1e6, 2), "completed": int(counts[0]),
            "issue_calls": int(counts[1]), "wall_s": round(wall, 1), "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline-qps", default="8000000", help="comma list; empty: no Offline runs")
    ap.add_argument("--server-qps", default="", help="comma list of Server rates")
    ap.add_argument("--workers", default="0,4", help="comma list: C completion threads (0: inline)")
    ap.add_argument("--issue-threads", default="0", help="comma list: LoadGen issue threads (Server)")
    ap.add_argument("--duration-s", type=float, default=5)
    ap.add_argument("--samples", type=int, default=204_800, help="the QSL's sample count")
    ap.add_argument("--chunk", type=int, default=1024, help="samples per QuerySamplesComplete call")
    ap.add_argument("--timeout-s", type=float, default=120, help="per run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", nargs=4, metavar=("SCENARIO", "QPS", "WORKERS", "ISSUERS"), help=argparse.SUPPRESS)
    ap.add_argument("--lib", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        scenario, qps, workers, issuers = args.one
        row = one_run(args.lib, scenario, float(qps), int(workers), int(issuers), args.duration_s, args.samples,
                      args.chunk)
        print("ROW " + json.dumps(row), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="lg-ceiling-build-"))
    lib = build(work)
    runs = [("Offline", q, w, "0") for q in filter(None, args.offline_qps.split(",")) for w in args.workers.split(",")]
    runs += [("Server", q, w, i) for q in filter(None, args.server_qps.split(",")) for w in args.workers.split(",")
             for i in args.issue_threads.split(",")]
    rows = []
    for scenario, qps, workers, issuers in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", scenario, qps, workers, issuers, "--lib", str(lib),
               "--duration-s", str(args.duration_s), "--samples", str(args.samples), "--chunk", str(args.chunk)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
            line = [x for x in done.stdout.splitlines() if x.startswith("ROW ")]
            row = json.loads(line[-1][4:]) if line else {"scenario": scenario, "target_qps": float(qps),
                                                         "workers": int(workers), "issue_threads": int(issuers),
                                                         "error": done.stderr[-400:]}
        except subprocess.TimeoutExpired:
            row = {"scenario": scenario, "target_qps": float(qps), "workers": int(workers),
                   "issue_threads": int(issuers), "error": f"timed out after {args.timeout_s:g} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nscenario target      workers issue_thr samples/s     p99_ms   result")
    for r in rows:
        print(f"{r['scenario']:<8} {r['target_qps']:<11g} {r['workers']:<7} {r['issue_threads']:<9} "
              f"{r.get('samples_per_s') or 0:<13,.0f} {r.get('p99_ms') or '-':<8} {r.get('result', r.get('error'))}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
