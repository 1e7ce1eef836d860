"""`dlrm-daemon`: serve (default), `check-config FILE`, `status`. Exit codes: wire/exitcodes.py."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, Callable, Coroutine, Sequence

from wire.exitcodes import ExitCode
from daemon.config import (ConfigError, DaemonConfig, add_config_flags, find_endpoint, load_config,
                           overrides_from_args)

log = logging.getLogger("dlrm.daemon")
_EPILOG = """subcommands:
  dlrm-daemon check-config FILE   validate a config file (and DLRM_* environment) and print it
  dlrm-daemon status [--endpoint E | --config FILE]   show a running daemon's engines, queue, rates
                                  (default endpoint: daemon/endpoints.py; DLRM_ENDPOINT overrides it)
  dlrm-daemon keygen DIR [--name NAME]   write a CURVE key pair NAME.key / NAME.key_secret (0600)
  dlrm-daemon reload [--config FILE] [--endpoint E]   swap in the model of the daemon's re-read config
                                  while it serves; waits for the outcome (systemctl reload runs it)

exit codes: 0 ok (also after SIGTERM/SIGINT drain), 1 runtime failure, 2 usage,
            70 no engine could load the model, 78 configuration error"""


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlrm-daemon", description="DLRM v1 inference daemon",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML config file (keys as the flags below)")
    add_config_flags(p)
    return p


def _config_or_exit(path: str | None, args: argparse.Namespace | None) -> DaemonConfig:
    try:
        return load_config(path, overrides_from_args(args) if args is not None else None)
    except ConfigError as exc:
        print(f"dlrm-daemon: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(ExitCode.CONFIG_ERROR) from None


def serve(cfg: DaemonConfig, config_path: str | None = None, overrides: dict[str, Any] | None = None) -> int:
    """Run the daemon; a reload re-reads `config_path` (or the file it names) with the same command-line
    `overrides` (a key given as a flag keeps its value across reloads)."""
    from daemon.dispatcher import Dispatcher, StartupError

    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # the profile and the arithmetic it resolved to (daemon/precision_plan.py), for the journal
    logging.getLogger("dlrm.daemon").info("accuracy_target %s: GPU MLP precision %s", cfg.accuracy_target,
                                          cfg.gpu_mlp_precision)
    import faulthandler
    import signal

    # `kill -USR1 PID` writes every thread's stack to the log (the journal): a stuck dispatcher says where
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    metrics = exporter = None
    if cfg.metrics_port:
        from prometheus_client import CollectorRegistry

        from daemon.metrics import DaemonMetrics, daemon_version, model_id, start_exporter

        registry = CollectorRegistry()
        metrics = DaemonMetrics(registry)
        metrics.set_build_info(daemon_version(), model_id(cfg.model))
        try:
            exporter = start_exporter(registry, cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:
            log.error("%s", exc)
            return ExitCode.RUNTIME_FAILURE
    from daemon.sdnotify import Notifier

    try:
        notifier = Notifier.from_env()
    except ValueError as exc:
        log.error("systemd notify: %s", exc)
        notifier = None
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is a dependency; asyncio's loop is the same API, slower
        runner = asyncio.run
    try:
        def reload_config(path: str | None) -> DaemonConfig:
            from daemon.reload_plan import ReloadRefused

            source = path or config_path
            if source is None:
                raise ReloadRefused("the daemon was started without --config: name the file to reload from "
                                    "(dlrm-daemon reload --config FILE)")
            return load_config(source, overrides)

        code = runner(Dispatcher(cfg, metrics, notifier, reload_config).run())
    except StartupError as exc:
        log.error("%s", exc)
        code = exc.code
    finally:
        if exporter is not None:
            exporter.close()
    log.info("exit %d", code)
    return code


def check_config(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="dlrm-daemon check-config",
                                description="validate a config file (with DLRM_* environment) and print it")
    p.add_argument("file", help="the TOML config file to check")
    args = p.parse_args(argv)
    cfg = _config_or_exit(args.file, None)
    print(cfg.describe())
    for note in cfg.advisories():
        print(f"# note: {note}")
    print(f"# ok: {args.file}")
    return ExitCode.OK


def _daemon_endpoint(command: str, endpoint: str | None, config: str | None) -> str | ExitCode:
    """The running daemon's endpoint for a client subcommand, or the exit code after saying why not."""
    try:
        endpoint = endpoint or find_endpoint(config)
    except ConfigError as exc:
        print(f"dlrm-daemon {command}: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[6:]):
        print(f"dlrm-daemon {command}: no daemon at {endpoint} (no socket there); give --endpoint or --config",
              file=sys.stderr)
        return ExitCode.RUNTIME_FAILURE
    return endpoint


def status(argv: Sequence[str]) -> int:
    from wire.client import Client
    from wire.errors import DaemonError

    p = argparse.ArgumentParser(prog="dlrm-daemon status", description="show a running daemon's state",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--endpoint", default=None,
                   help="daemon endpoint (default: the config file's endpoint or runtime_dir, else "
                        "DLRM_ENDPOINT / DLRM_RUNTIME_DIR, else the first default runtime dir holding a socket)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="read the endpoint (endpoint or runtime_dir) from this daemon config file; nothing "
                        "else of it is needed")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon's answer")
    args = p.parse_args(argv)
    endpoint = _daemon_endpoint("status", args.endpoint, args.config)
    if isinstance(endpoint, ExitCode):
        return endpoint
    try:
        with Client(endpoint, timeout_s=args.timeout) as c:
            st = c.status()
    except DaemonError as exc:
        print(f"dlrm-daemon status: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_FAILURE
    print(f"daemon pid {st['pid']} {st['state']} on {st['endpoint']}, up {st['uptime_s']:.0f} s")
    print(f"{'engine':<10} {'device':<8} {'state':<9} {'pid':>7} {'gpu_part':>8} {'inflight':>8} "
          f"{'restarts':>8} {'batches':>9} {'hb_age_s':>8} {'dev_mem_MB':>10}")
    for e in st["engines"]:
        age = "-" if e["last_heartbeat_age_s"] is None else f"{e['last_heartbeat_age_s']:.2f}"
        print(f"{e['name']:<10} {e['device']:<8} {e['state']:<9} {e['pid']:>7} {e['gpu_part']:>8.2f} "
              f"{e['inflight']:>8} {e['restarts']:>8} {e['batches_done']:>9} {age:>8} "
              f"{e['device_memory_bytes'] / 1e6:>10.1f}")
        hot, cold = e.get("hot_lookups", 0), e.get("cold_lookups", 0)
        ratio = "-" if e.get("hot_ratio") is None else f"{100 * e['hot_ratio']:.2f}%"
        oldest = "" if e.get("oldest_batch_s") is None else f"; oldest batch in flight {e['oldest_batch_s']:.3f} s"
        note = " (a CPU engine reads every row from host memory)" if e["device"] == "cpu" else ""
        print(f"    lookups: {hot:,} hot (device memory), {cold:,} cold (host memory), hot-row hit ratio "
              f"{ratio}{note}{oldest}")
        if e["last_error"]:
            print(f"    last error: {e['last_error']}")
    print(f"queue: {st['queue_queries']} queries, {st['queue_pairs']} pairs; "
          f"{st['inflight_batches']} batches in flight")
    print("datasets: " + (", ".join(f"{n} ({s} samples)" for n, s in st["datasets"].items()) or "none"))
    print("rates: " + (", ".join(f"{k} {v:,.1f}" for k, v in st["rates"].items()) or "n/a"))
    print("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(st["totals"].items())))
    if st["recent_errors"]:
        print("recent errors:")
        for line in st["recent_errors"]:
            print(f"  {line}")
    return ExitCode.OK


def reload_command(argv: Sequence[str]) -> int:
    from wire.client import Client
    from wire.errors import ConnectionFailed, DaemonError

    p = argparse.ArgumentParser(
        prog="dlrm-daemon reload", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="make a running daemon re-read its config file and swap in its model while it serves: "
                    "new engines load the new model beside the old ones, are verified (checksums, accuracy "
                    "profile, canary predictions), take the traffic, and the old ones drain and stop. Waits for "
                    "the outcome; exit 0 when the new model serves, 1 with the reason when it was refused (the "
                    "old model then serves on)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="the config file the daemon reads (default: the one it was started with); also where "
                        "its endpoint is found")
    p.add_argument("--endpoint", default=None, help="daemon endpoint (default: from --config, else as `status`)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait for the outcome (the daemon's own limit is reload_timeout_s)")
    args = p.parse_args(argv)
    endpoint = _daemon_endpoint("reload", args.endpoint, args.config)
    if isinstance(endpoint, ExitCode):
        return endpoint
    config = os.path.abspath(args.config) if args.config else ""
    try:
        with Client(endpoint, timeout_s=args.timeout) as c:
            done = c.reload(config)
    except ConnectionFailed as exc:
        print(f"dlrm-daemon reload: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_FAILURE
    except DaemonError as exc:
        print(f"dlrm-daemon reload: refused: {exc.message}", file=sys.stderr)
        return ExitCode.RUNTIME_FAILURE
    print(f"reloaded: {done['previous_model']} -> {done['model']} in {done['seconds']:.1f} s")
    for line in done["checks"]:
        print(f"  {line}")
    return ExitCode.OK


def keygen_command(argv: Sequence[str]) -> int:
    from wire.curve import keygen as make_keys

    p = argparse.ArgumentParser(prog="dlrm-daemon keygen", description="write a ZeroMQ CURVE key pair: "
                                "NAME.key (public: give the daemon's to clients, put clients' in "
                                "curve_authorized_keys_dir) and NAME.key_secret (mode 0600)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dir", help="directory to write the two files into (created)")
    p.add_argument("--name", default="server", help="file name stem of the pair")
    args = p.parse_args(argv)
    pub, sec = make_keys(args.dir, args.name)
    print(f"public {pub}\nsecret {sec}")
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe must not surface at interpreter exit
        return code
    except BrokenPipeError:
        # `dlrm-daemon status | head`: the reader left; say nothing more (and not at exit either).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check-config":
        return check_config(argv[1:])
    if argv and argv[0] == "status":
        return status(argv[1:])
    if argv and argv[0] == "keygen":
        return keygen_command(argv[1:])
    if argv and argv[0] == "reload":
        return reload_command(argv[1:])
    args = _serve_parser().parse_args(argv)
    return serve(_config_or_exit(args.config, args), os.path.abspath(args.config) if args.config else None,
                 overrides_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
