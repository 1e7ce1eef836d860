"""Prometheus metrics of the dispatcher (the daemon's only exporter).

Every metric lives in the registry the caller injects, never in prometheus_client's global one, so
tests and several daemons in one process do not collide. Names follow Prometheus conventions: the
`dlrm_` prefix, base units (`_seconds`, `_bytes`), `_total` on counters, histograms rather than
summaries (summaries cannot be aggregated across engines or instances), and labels with a handful of
values each (engine, kind, outcome, code, stage, tier).

Label values the dispatcher uses:
  kind     "by_ref" | "by_value"
  outcome  "ok" or an error code of the wire protocol ("BAD_REQUEST", "OVERLOADED", ...)
  code     an error code of the wire protocol
  stage    "queue_wait" | "batch_assembly" | "engine_compute" | "reply"
  tier     "device" | "host" (where an embedding row was read from; hot rows live on the device; a
           CPU engine reads every row from host memory)
  engine   the engine's name from the config (e.g. "cuda0", "cpu0")
  gpu      beside engine: the CUDA device index of the engine ("0" for cuda:0; "" for cpu and null
           engines); dlrm_engine_info{engine, gpu, model, device, gpu_name} carries the GPU's name
  model    beside engine: the model the engine serves (model_id: directory @ 12 hex digits of its
           meta.json's sha256); a reload starts engines of the new model (names cuda0.m2, ...)
  reason   why work was dropped: "client_disconnected" (queued queries of a client that is gone) or
           "client_not_reading" (error replies beyond twice max_client_backlog_bytes of unread replies)

The registry also gets prometheus_client's process and platform collectors (process_resident_memory_bytes,
process_cpu_seconds_total, process_open_fds, python_info: the dispatcher's own), and dlrm_build_info.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               start_http_server)

from wire.errors import ErrorCode

# Dense around the 30 ms Server bound (REFERENCE) so p99 near the bound is resolved to 2.5 ms, and on to
# 60 s: an overload's p99 of seconds must show as seconds, not as the last bucket (it once stopped at 1 s
# while LoadGen measured 3.6 s).
LATENCY_BUCKETS_S: tuple[float, ...] = tuple(
    ms / 1000.0
    for ms in (0.5, 1, 2, 3, 5, 7.5, 10, 12.5, 15, 17.5, 20, 22.5, 25, 27.5, 30, 32.5, 35, 40, 50,
               75, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 30000, 60000)
)
# Batches range from one small query (100 pairs) to NVIDIA's 350,000-pair GPU batch (REFERENCE).
BATCH_PAIRS_BUCKETS: tuple[float, ...] = (
    100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 65536, 131072, 262144, 350000, 524288,
)
ERROR_CODES: tuple[str, ...] = tuple(ErrorCode)
STAGES: tuple[str, ...] = ("queue_wait", "batch_assembly", "engine_compute", "reply")
# client_disconnected: queued queries of a client that is gone; client_not_reading: error replies beyond
# twice max_client_backlog_bytes of unread replies (the results were already replaced by errors)
DROP_REASONS: tuple[str, ...] = ("client_disconnected", "client_not_reading")
KINDS: tuple[str, ...] = ("by_ref", "by_value")
TIERS: tuple[str, ...] = ("device", "host")


class DaemonMetrics:
    """The dispatcher's metrics; all methods are cheap and thread-safe (prometheus_client locks)."""

    def __init__(self, registry: CollectorRegistry, process_metrics: bool = True) -> None:
        """`process_metrics`: register the process and platform collectors (once per registry)."""
        r = registry
        self.registry = registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.build_info = Gauge("dlrm_build_info", "1, labelled with the daemon's version and the model served.",
                                ["version", "model"], registry=r)
        self.reloads = Counter("dlrm_reloads_total", "Model reloads, by outcome (ok: the new model serves; failed: "
                               "refused or a check failed, the old one serves on).", ["outcome"], registry=r)
        self.retries = Counter("dlrm_batch_retries_total",
                               "Batches of a lost engine queued again (each runs at most twice), by that engine.",
                               ["engine", "gpu", "model"], registry=r)
        self.dropped = Counter("dlrm_dropped_queries_total",
                               "Queued queries dropped unanswered, by reason (their client is gone).",
                               ["reason"], registry=r)
        self.queries = Counter("dlrm_queries_total", "Inference requests answered, by kind and outcome.",
                               ["kind", "outcome"], registry=r)
        self.samples = Counter("dlrm_samples_total", "LoadGen samples (users) in answered requests.",
                               ["kind", "outcome"], registry=r)
        self.pairs = Counter("dlrm_pairs_total", "User-item pairs in answered requests.",
                             ["kind", "outcome"], registry=r)
        self.latency = Histogram("dlrm_query_latency_seconds",
                                 "End-to-end request latency in the dispatcher (receive to reply sent).",
                                 ["kind"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.stage_latency = Histogram("dlrm_stage_latency_seconds",
                                       "Latency of one stage of the query path, per engine.",
                                       ["stage", "engine", "gpu", "model"], buckets=LATENCY_BUCKETS_S, registry=r)
        # Queries are packed into batches, so per-engine latency is measured per batch: from the
        # oldest query's enqueue to the engine's BatchDone (queue wait + assembly + compute).
        self.batch_latency = Histogram("dlrm_batch_latency_seconds",
                                       "Batch latency per engine: queue wait + assembly + compute.",
                                       ["engine", "gpu", "model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_pairs = Histogram("dlrm_batch_size_pairs", "Pairs per batch sent to an engine.",
                                     ["engine", "gpu", "model"], buckets=BATCH_PAIRS_BUCKETS, registry=r)
        self.batches = Counter("dlrm_batches_total", "Batches completed by an engine.", ["engine", "gpu", "model"],
                               registry=r)
        self.queue_queries = Gauge("dlrm_queue_depth_queries", "Queries waiting in the batcher queue.",
                                   registry=r)
        self.queue_pairs = Gauge("dlrm_queue_depth_pairs", "Pairs waiting in the batcher queue.",
                                 registry=r)
        self.inflight = Gauge("dlrm_engine_inflight_batches", "Batches sent to an engine, not yet done.",
                              ["engine", "gpu", "model"], registry=r)
        self.engine_up = Gauge("dlrm_engine_up", "1 while the engine is ready and heartbeating.",
                               ["engine", "gpu", "model"], registry=r)
        self.restarts = Counter("dlrm_engine_restarts_total", "Engine process restarts by the supervisor.",
                                ["engine", "gpu", "model"], registry=r)
        self.errors = Counter("dlrm_errors_total", "Error replies, by wire-protocol error code.",
                              ["code"], registry=r)
        self.lookups = Counter("dlrm_embedding_lookups_total",
                               "Embedding rows read, by where they were read from (device = hot rows).",
                               ["engine", "gpu", "model", "tier"], registry=r)
        self.device_memory = Gauge("dlrm_device_memory_used_bytes", "Device memory held by an engine.",
                                   ["engine", "gpu", "model"], registry=r)
        self.engine_info = Gauge("dlrm_engine_info",
                                 "1 per engine, labelled with its device and the GPU's name (from the engine).",
                                 ["engine", "gpu", "model", "device", "gpu_name"], registry=r)
        # Pre-create every fixed-label child so rate() and dashboards see 0 rather than no series.
        for code in ERROR_CODES:
            self.errors.labels(code=code)
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)
        for outcome in ("ok", "failed"):
            self.reloads.labels(outcome=outcome)
        for kind in KINDS:
            self.latency.labels(kind=kind)
            self.queries.labels(kind=kind, outcome="ok")
            self.samples.labels(kind=kind, outcome="ok")
            self.pairs.labels(kind=kind, outcome="ok")
        self._engines: dict[str, dict[str, str]] = {}  # engine name -> its label values
        self._devices: dict[str, tuple[str, str]] = {}  # engine name -> (device, model id) (register_engine)
        self._info: dict[str, tuple[str, ...]] = {}  # engine name -> its dlrm_engine_info labels
        self._build: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def _per_engine(self) -> tuple[Any, ...]:
        return (self.batch_latency, self.batch_pairs, self.batches, self.inflight, self.engine_up, self.restarts,
                self.retries, self.device_memory)

    def register_engine(self, engine: str, device: str, model: str = "") -> None:
        """Name an engine's device and model before its first sample: its `gpu` label is the CUDA device
        index ("0" for cuda:0; "" for the cpu and null engines, which have none), `model` the model id
        it serves (daemon.metrics.model_id; an engine serves one model for its life)."""
        self._devices[engine] = (device, model)
        self._engine(engine)

    def _engine(self, engine: str) -> dict[str, str]:
        """The engine's label values; creates its children on first sight, so a new engine shows zeros,
        not gaps."""
        e = self._engines.get(engine)
        if e is not None:
            return e
        with self._lock:
            device, model = self._devices.get(engine, ("", ""))
            gpu = device.split(":", 1)[1] if device.startswith("cuda:") else ""
            e = {"engine": engine, "gpu": gpu, "model": model}
            for metric in self._per_engine():
                metric.labels(**e)
            for stage in STAGES:
                self.stage_latency.labels(stage=stage, **e)
            for tier in TIERS:
                self.lookups.labels(tier=tier, **e)
            self._engines[engine] = e
            return e

    def remove_engine(self, engine: str) -> None:
        """An engine left for good (a reload retired it): its series go, so dashboards show the engines
        that exist (its counts stay in the engines' sums until Prometheus's next scrape)."""
        with self._lock:
            e = self._engines.pop(engine, None)
            self._devices.pop(engine, None)
            info = self._info.pop(engine, None)
            if info is not None:
                self.engine_info.remove(*info)
            if e is None:
                return
            values = (e["engine"], e["gpu"], e["model"])
            for metric in self._per_engine():
                metric.remove(*values)
            for stage in STAGES:
                self.stage_latency.remove(stage, *values)
            for tier in TIERS:
                self.lookups.remove(*values, tier)

    def set_engine_info(self, engine: str, device_name: str) -> None:
        """The engine reported its device's name (EngineReady): one dlrm_engine_info series per engine."""
        e = self._engine(engine)
        device = self._devices.get(engine, ("", ""))[0]
        labels = (engine, e["gpu"], e["model"], device, device_name)  # in labelnames order
        with self._lock:
            old = self._info.get(engine)
            if old is not None and old != labels:  # a restart on another device name replaces the series
                self.engine_info.remove(*old)
            self.engine_info.labels(*labels).set(1)
            self._info[engine] = labels

    def observe_query(self, kind: str, outcome: str, samples: int, pairs: int, latency_s: float) -> None:
        """One answered inference request; `outcome` is "ok" or the error code of its Error reply.

        Errors are counted in dlrm_errors_total by observe_error alone (the dispatcher calls it for
        every Error reply, inference or not), so this does not count them a second time.
        """
        self.queries.labels(kind=kind, outcome=outcome).inc()
        self.samples.labels(kind=kind, outcome=outcome).inc(samples)
        self.pairs.labels(kind=kind, outcome=outcome).inc(pairs)
        self.latency.labels(kind=kind).observe(latency_s)

    def observe_error(self, code: str) -> None:
        """One Error reply, to any request (inference, register, load, status, malformed)."""
        self.errors.labels(code=code).inc()

    def observe_batch(self, engine: str, pairs: int, queue_wait_s: float, assembly_s: float,
                      compute_s: float, hot_lookups: int, cold_lookups: int) -> None:
        """One batch completed by `engine`; hot lookups were served from device memory."""
        e = self._engine(engine)
        self.stage_latency.labels(stage="queue_wait", **e).observe(queue_wait_s)
        self.stage_latency.labels(stage="batch_assembly", **e).observe(assembly_s)
        self.stage_latency.labels(stage="engine_compute", **e).observe(compute_s)
        self.batch_latency.labels(**e).observe(queue_wait_s + assembly_s + compute_s)
        self.batch_pairs.labels(**e).observe(pairs)
        self.batches.labels(**e).inc()
        self.lookups.labels(tier="device", **e).inc(hot_lookups)
        self.lookups.labels(tier="host", **e).inc(cold_lookups)

    def observe_reply(self, engine: str, seconds: float) -> None:
        """Time to split a batch's predictions (computed by `engine`) and send the replies."""
        self.stage_latency.labels(stage="reply", **self._engine(engine)).observe(seconds)

    def set_build_info(self, version: str, model: str) -> None:
        """The version and the model served (after a reload: the new model's series replaces the old)."""
        with self._lock:
            if self._build is not None and self._build != (version, model):
                self.build_info.remove(*self._build)
            self.build_info.labels(version=version, model=model).set(1)
            self._build = (version, model)

    def reload_done(self, ok: bool) -> None:
        self.reloads.labels(outcome="ok" if ok else "failed").inc()

    def batch_retried(self, engine: str) -> None:
        self.retries.labels(**self._engine(engine)).inc()

    def queries_dropped(self, reason: str, n: int) -> None:
        self.dropped.labels(reason=reason).inc(n)

    def set_queue_depth(self, queries: int, pairs: int) -> None:
        self.queue_queries.set(queries)
        self.queue_pairs.set(pairs)

    def set_inflight(self, engine: str, batches: int) -> None:
        self.inflight.labels(**self._engine(engine)).set(batches)

    def set_engine_up(self, engine: str, up: bool) -> None:
        self.engine_up.labels(**self._engine(engine)).set(1 if up else 0)

    def engine_restarted(self, engine: str) -> None:
        self.restarts.labels(**self._engine(engine)).inc()

    def set_device_memory(self, engine: str, nbytes: int) -> None:
        self.device_memory.labels(**self._engine(engine)).set(nbytes)


def daemon_version() -> str:
    """The installed package's version; from pyproject.toml in a source tree that is not installed."""
    import importlib.metadata
    import re
    from pathlib import Path

    try:
        return importlib.metadata.version("dlrm-daemon")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


def model_id(artifact: str) -> str:
    """A short, stable name of the model served: directory name @ 12 hex digits of its meta.json's
    sha256 (which holds every data file's checksum); "none" without a model (null engines)."""
    import hashlib
    from pathlib import Path

    meta = Path(artifact) / "meta.json" if artifact else None
    if meta is None or not meta.is_file():
        return "none"
    return f"{Path(artifact).resolve().name}@{hashlib.sha256(meta.read_bytes()).hexdigest()[:12]}"


@dataclass
class Exporter:
    """A running exporter; `port` is the bound port (useful when 0 was asked for)."""

    host: str
    port: int
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_exporter(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9464) -> Exporter:
    """Serve `registry` at http://host:port/metrics from a daemon thread (prometheus_client's server).

    Loopback by default: the metrics reveal load and topology; expose them deliberately.
    Raises OSError (e.g. address in use) with the address in the message.
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"metrics exporter cannot bind {host}:{port}: {exc.strerror}") from exc
    return Exporter(host=host, port=int(server.server_address[1]), _server=server, _thread=thread)
