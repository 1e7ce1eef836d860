"""`loadgen_driver`: MLPerf LoadGen (Offline/Server, performance/accuracy) against dlrm-daemon.

Exit status: 0 success; 1 the run had errors (daemon errors, timeouts) or missed the accuracy target;
2 it could not start (bad arguments, dataset unreadable, daemon unreachable).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from wire.endpoints import client_endpoint
from formats.dataset import Dataset, DatasetError
from loadgen_driver.accuracy import AccuracyLogError, auc_report, score_accuracy_log
from loadgen_driver.backend import Backend, DriverBackendError, DaemonBackend, InProcessBackend
from loadgen_driver.runner import run_test
from loadgen_driver.settings import RunSettings, SettingsError, build_test_settings
from loadgen_driver.summary import format_summary, read_summary


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadgen_driver", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--scenario", choices=("Offline", "Server"), required=True, help="MLPerf scenario")
    p.add_argument("--mode", choices=("PerformanceOnly", "AccuracyOnly"), default="PerformanceOnly",
                   help="AccuracyOnly runs every sample once and scores the AUC")
    p.add_argument("--dataset", type=Path, required=True, help="dataset directory (formats/dataset.py)")
    p.add_argument("--dataset-name", default=None, help="name to register with the daemon (default: dir name)")
    p.add_argument("--endpoint", default=None,
                   help="daemon ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555 (default: the daemon's own default, "
                        f"found as daemon/endpoints.py says; here now {client_endpoint()})")
    p.add_argument("--backend", choices=("daemon", "oip", "null"), default="daemon",
                   help="daemon: dlrm-daemon's native ZeroMQ protocol; oip: any Open Inference Protocol (KServe v2) "
                        "server over gRPC (--url), as the seed's Triton configuration; null: answer in process at "
                        "once (LoadGen's own ceiling; no model)")
    p.add_argument("--url", default="127.0.0.1:8001", help="--backend oip: the server's gRPC HOST:PORT")
    p.add_argument("--oip-model", default="dlrm", help="--backend oip: the model name")
    p.add_argument("--oip-inputs", choices=("value", "reference"), default="value",
                   help="--backend oip: send each request's pairs (dense, sparse), or sample_ids into the dataset "
                        "the server knows by --dataset-name (dlrm-daemon's front end)")
    p.add_argument("--oip-channels", type=int, default=1,
                   help="--backend oip: gRPC connections the requests take turns on (a server of several processes "
                        "on one port, as dlrm-daemon's oip_workers, spreads connections over them)")
    p.add_argument("--oip-parameters", default="deadline_s=inf",
                   help="--backend oip: request parameters (k=v,k=v; empty for none); deadline_s=inf marks "
                        "throughput work for dlrm-daemon's admission, as the native path does")
    p.add_argument("--user-conf", type=Path, default=None, help="LoadGen user.conf (model name `dlrm`)")
    p.add_argument("--target-qps", type=float, default=None,
                   help="Server target / Offline expected samples per second")
    p.add_argument("--latency-ms", type=float, default=None, help="Server p99 bound (MLPerf: 30)")
    p.add_argument("--output-dir", type=Path, default=Path("var/loadgen"), help="LoadGen logs go here")
    p.add_argument("--fp32-auc", type=float, default=None,
                   help="fp32 reference AUC (0.8025 or 80.25) for the 99%% / 99.9%% check")
    p.add_argument("--short", action="store_true",
                   help="a short run (5 s, 1024 queries) for demos/tests; NOT of MLPerf length")
    p.add_argument("--min-duration-s", type=float, default=None, help="override min_duration")
    p.add_argument("--min-query-count", type=int, default=None, help="override min_query_count")
    p.add_argument("--samples-per-request", type=int, default=2048,
                   help="Offline's query is split into requests of this many samples")
    p.add_argument("--max-inflight", type=int, default=64, help="requests in flight at most")
    p.add_argument("--max-inflight-pairs", type=int, default=None,
                   help="pairs in flight at most; default: the daemon's max_queue_pairs (its status says), "
                        "so a fast Offline run never overruns its queue; 0: requests bound only")
    p.add_argument("--timeout-s", type=float, default=30.0,
                   help="after this long without any reply the driver asks the daemon whether it is working: "
                        "if it is (work queued or in flight), the wait goes on; if it is idle the pending requests "
                        "fail; if it does not answer they fail and no more samples are sent")
    p.add_argument("--issue", choices=("ring", "capi", "fast", "slow"), default="capi",
                   help="capi: LoadGen's C ConstructSUT (ids as arrays, no Python list per query; falls back "
                        "to fast if not found); ring: the same with IssueQuery in C, queued for a Python "
                        "thread (built with the C compiler at first use; falls back to capi); fast: "
                        "ConstructFastSUT; slow: ConstructSUT")
    p.add_argument("--issue-threads", type=int, default=0,
                   help="with --issue ring, Server: LoadGen issues its queries on this many C threads "
                        "(server_num_issue_query_threads) instead of its one thread; 0: its own thread")
    p.add_argument("--completion-threads", type=int, default=1,
                   help="threads that complete replies with LoadGen (its per-sample work runs outside the GIL; "
                        "Server's per-query completion is the costly part at millions of samples/s)")
    p.add_argument("--completion", choices=("capi", "python"), default="capi",
                   help="capi: complete each batch with one call of LoadGen's C API (no per-sample "
                        "Python object; falls back to python if not found); python: the binding")
    p.add_argument("--predictions", choices=("region", "reply"), default="region",
                   help="--backend daemon: how predictions come back: written by the engines into a shared-"
                        "memory region of the driver's (the daemon on this host; falls back to replies "
                        "where it refuses the region) or in the reply messages")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    return p


def _make_backend(args: argparse.Namespace, offsets: np.ndarray, dataset: Dataset) -> Backend:
    if args.backend == "null":
        return InProcessBackend(offsets)
    name = args.dataset_name or args.dataset.resolve().name
    if args.backend == "oip":
        from loadgen_driver.oip_backend import OipBackend

        params = dict(kv.split("=", 1) for kv in args.oip_parameters.split(",") if kv)
        return OipBackend(args.url, dataset, name, args.oip_model, args.oip_inputs, timeout_s=min(args.timeout_s, 10.0),
                          parameters=params, channels=args.oip_channels)
    return DaemonBackend(args.endpoint or client_endpoint(), name, str(args.dataset.resolve()),
                         timeout_s=min(args.timeout_s, 10.0), sample_offsets=offsets,
                         region=args.predictions == "region")


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `loadgen_driver ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="loadgen_driver: %(message)s", stream=sys.stderr)
    try:
        dataset = Dataset.open(args.dataset)
    except (DatasetError, OSError) as exc:
        print(f"loadgen_driver: cannot open dataset {args.dataset}: {exc}", file=sys.stderr)
        return 2
    offsets = np.asarray(dataset.sample_offsets, dtype=np.int64)
    accuracy = args.mode == "AccuracyOnly"
    try:
        settings, notes = build_test_settings(RunSettings(
            args.scenario, args.mode, dataset.num_samples, args.target_qps, args.user_conf, args.short,
            None if args.min_duration_s is None else int(args.min_duration_s * 1000),
            args.min_query_count, args.latency_ms))
        backend = _make_backend(args, offsets, dataset)
    except (SettingsError, DriverBackendError) as exc:
        print(f"loadgen_driver: {exc}", file=sys.stderr)
        return 2
    if args.backend == "null":
        notes.append("null backend: no model ran, predictions are placeholders")
    try:
        result = run_test(
            backend, settings, dataset.num_samples, args.output_dir, offsets,
            labels=np.asarray(dataset.labels) if accuracy else None,
            samples_per_request=args.samples_per_request, max_inflight=args.max_inflight,
            max_inflight_pairs=args.max_inflight_pairs, reply_timeout_s=args.timeout_s, issue=args.issue,
            progress=sys.stderr.isatty() and not args.quiet, completion=args.completion,
            issue_threads=args.issue_threads, completion_threads=args.completion_threads,
        )
    except DriverBackendError as exc:
        print(f"loadgen_driver: {exc}", file=sys.stderr)
        return 2
    finally:
        backend.close()
    stats = result.stats
    auc_lines: list[str] = []
    ok = not stats.errors
    if accuracy and ok:
        fp32 = args.fp32_auc / 100 if args.fp32_auc is not None and args.fp32_auc > 1 else args.fp32_auc
        try:
            scored = score_accuracy_log(result.output_dir / "mlperf_log_accuracy.json")
            auc_lines, met = auc_report(scored, fp32)
            ok = ok and met
        except AccuracyLogError as exc:
            auc_lines, ok = [f"accuracy: {exc}"], False
    summary = read_summary(result.output_dir)
    notes.append(f"issue through {result.issue}, completion through {result.completion}")
    print(format_summary(args.scenario, args.mode, summary, stats.completed_samples,
                         stats.completed_pairs, result.wall_s, stats.error_samples,
                         stats.complete_ns_per_sample(), notes, auc_lines, stats.unsent_samples, stats.warnings,
                         stats.requests_line()))
    print(f"logs: {result.output_dir}")
    if stats.errors:
        print(f"loadgen_driver: RUN FAILED: {stats.error_samples:,} samples in {stats.error_events:,} "
              f"failed requests; first: {stats.errors[0]}", file=sys.stderr)
        return 1
    if not ok:
        print("loadgen_driver: RUN FAILED: accuracy target not met", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
