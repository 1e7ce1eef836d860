"""The daemon's one frozen, typed configuration: TOML file < DLRM_* environment < command-line flags.

Every key is a TOML key, a `--kebab-case` flag and a `DLRM_UPPER_CASE` environment variable. Values are
converted to the key's type by msgspec (strings from flags and the environment with its lax rules).
Unknown TOML keys are errors, and so is an unknown `DLRM_*` variable (a typo must not pass silently);
every error names the key and where its value came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import msgspec

from daemon.security import curve_problem, exposure_problem, oip_exposure_problem
from daemon.precision_plan import PlanError, plan
from formats.artifact import ArtifactError, read_calibration, read_model_config
from wire.endpoints import client_endpoint, default_runtime_dir, endpoint_in
from wire.messages import ColdRowGather, EngineKind, HostRows, MlpPrecision

ENV_PREFIX = "DLRM_"
# max_batch_pairs = 0 picks by engine kind: a CPU engine does ~10k pairs/s on 2 cores, so a
# 65,536-pair batch would hold it (and every query batched behind it) for seconds.
CPU_BATCH_PAIRS = 8192
DEFAULT_BATCH_PAIRS = 65536
DEFAULT_LATENCY_TARGET_S = 0.030  # latency_target_s = -1 (auto) unless every engine is a CPU engine
_IPC_PATH_MAX = 107  # sun_path limit of a unix socket address
# DLRM_* variables that are not config keys: read by clients (CURVE keys, the endpoint lookup) and by
# the null engine's test and benchmark hooks (engines/null_backend.py).
NON_CONFIG_ENV = frozenset(("DLRM_CURVE_SERVER_KEY", "DLRM_CURVE_CLIENT_KEY", "DLRM_NULL_DELAY_S",
                            "DLRM_NULL_GIL_S", "DLRM_NULL_SPIN_S", "DLRM_NULL_FILL"))


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the source of its value (or, with
    key "", the config file that cannot be read)."""

    def __init__(self, key: str, message: str, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"config key '{key}'{where}: {message}" if key else message)
        self.key = key


class AccuracyTarget(enum.StrEnum):
    """MLPerf's two DLRM accuracy profiles: the share of the fp32 model's AUC a result must keep."""

    HIGH = "99.9"
    DEFAULT = "99"
    NONE = "none"  # no profile: speed runs of synthetic models, whose AUC means nothing

    @property
    def share(self) -> float | None:
        return None if self is AccuracyTarget.NONE else float(self.value) / 100


class ReloadStrategy(enum.StrEnum):
    """How a reload brings in the new model (daemon/model_swap.py)."""

    AUTO = "auto"  # side by side; engine by engine when a device has no room for both
    PARALLEL = "parallel"  # side by side only (a device without room for both refuses the reload)
    ROLLING = "rolling"  # engine by engine: each old engine stops before its replacement loads


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class DaemonConfig:
    endpoint: str = field(default="", metadata=_h(
        "ZeroMQ endpoint the dispatcher binds; default ipc://RUNTIME_DIR/dlrm.sock. tcp:// must be set "
        "explicitly (non-loopback tcp exposes the daemon to the network)"))
    runtime_dir: str = field(default="", metadata=_h(
        "directory for sockets and the lock file (created 0700); default $RUNTIME_DIRECTORY, else "
        "$XDG_RUNTIME_DIR/dlrm-daemon, else /tmp/dlrm-daemon-UID"))
    model: str = field(default="", metadata=_h("model artifact directory (formats/artifact); "
                                                "not needed when every engine is 'null'"))
    datasets: dict[str, str] = field(default_factory=dict, metadata=_h(
        "datasets registered at start, name -> directory (flag/env: name=path[,name=path])"))
    engines: tuple[str, ...] = field(default=("cpu",), metadata=_h(
        "one engine process per device: 'cpu', 'cuda:N', 'cuda:all' (one per visible GPU) or 'null' "
        "(benchmark engine), flag/env comma-separated; a device may repeat (two engines share a GPU)"))
    embedding_weights_on_gpu_part: float = field(default=1.0, metadata=_h(
        "share of embedding rows (most frequent first) kept in device memory, 0..1"))
    host_rows: HostRows = field(default=HostRows.PRIVATE, metadata=_h(
        "GPU engines' cold embedding rows (those past embedding_weights_on_gpu_part) in host memory: "
        "'private' (default: each engine page-locks a copy of its own) or 'shared' (the artifact file's "
        "pages page-locked in place: one copy per host for every engine; the same rate as a private copy "
        "on an H100, docs/OPERATIONS.md)"))
    cold_row_gather: ColdRowGather = field(default=ColdRowGather.KERNEL, metadata=_h(
        "GPU engines with cold rows: where a by-reference batch reads them: 'kernel' (default: the fused "
        "gather reads pinned host memory zero-copy) or 'host' (the engine's CPU gathers the batch's cold "
        "rows from its per-dataset index and one copy puts them on the device before the forward; by-value "
        "batches always read zero-copy; measured slower than 'kernel' on an H100: docs/OPERATIONS.md)"))
    gpu_mlp_precision: MlpPrecision = field(default=MlpPrecision.AUTO, metadata=_h(
        "GPU engines' MLP arithmetic: 'auto' (default: the fastest precision the artifact's calibration "
        "measured keeping accuracy_target, else fp16), 'fp16' or 'bf16' (cuBLAS), 'int8' (top MLP through "
        "the Triton int8 kernel; measured slower than fp16 on an H200) or 'fp8' (top MLP in fp8 e4m3 "
        "through cuBLASLt, needs nvmath-python; 99.68% of the fp32 AUC on the demo day, BENCHMARKS.md). "
        "int8 and fp8 need the artifact calibrated (`dlrm-prepare calibrate`: scales and each precision's "
        "measured AUC) and are refused below accuracy_target. The CPU engine always computes in fp32"))
    accuracy_target: AccuracyTarget = field(default=AccuracyTarget.HIGH, metadata=_h(
        "the accuracy profile served: '99.9' (default) or '99' (% of the fp32 AUC); a gpu_mlp_precision "
        "that the artifact's calibration measured below it is refused, and 'auto' picks the fastest one "
        "measured keeping it; 'none' = no profile (speed runs of synthetic models: any calibrated precision)"))
    max_batch_pairs: int = field(default=0, metadata=_h(
        "largest batch sent to an engine, in pairs; 0 (default) = 8192 when every engine is 'cpu' (about "
        "1 s of a 2-core CPU engine), else 65536 (a GPU runs 262144 faster: see config.example.toml)"))
    latency_target_s: float = field(default=-1.0, metadata=_h(
        "admission: a query without deadline_s is refused with OVERLOADED at once when the work ahead, at "
        "the engines' measured rate, would not let it finish within this (daemon/admission.py); a query "
        "with deadline_s is held to its deadline (TIMEOUT), one with deadline_s=inf to nothing; 0 = off; "
        "-1 (default) = 0.030 (the MLPerf Server bound), or off when every engine is 'cpu' (~10k pairs/s: "
        "any queue passes 30 ms)"))
    max_queue_delay_s: float = field(default=0.002, metadata=_h(
        "a partial batch closes once its oldest query waited this long (busy engines only)"))
    inflight_batches: int = field(default=2, metadata=_h("shared-memory slots (batches in flight) per engine"))
    max_queue_pairs: int = field(default=8_000_000, metadata=_h("queue bound in pairs; beyond it OVERLOADED"))
    max_pairs_per_query: int = field(default=4_000_000, metadata=_h("largest query accepted, in pairs"))
    max_message_bytes: int = field(default=256 << 20, metadata=_h("largest request message accepted"))
    max_client_backlog_bytes: int = field(default=128 << 20, metadata=_h(
        "unread replies kept for one client (beyond what ZeroMQ holds, 16 replies); past it the client's "
        "results become CLIENT_NOT_READING errors and its new requests are refused"))
    heartbeat_interval_s: float = field(default=0.2, metadata=_h("engine heartbeat period"))
    heartbeat_timeout_s: float = field(default=1.0, metadata=_h(
        "an engine silent this long is declared hung and restarted"))
    batch_timeout_s: float = field(default=10.0, metadata=_h(
        "an engine whose oldest in-flight batch has run this long and whose batch threads then make no "
        "CPU or run-queue progress for heartbeat_timeout_s is declared hung and restarted (its batches are "
        "retried once on another engine), even while it still heartbeats; a batch that is still "
        "computing is slow, not hung"))
    drain_timeout_s: float = field(default=10.0, metadata=_h("on SIGTERM, time allowed to finish accepted work"))
    malloc_trim_interval_s: float = field(default=60.0, metadata=_h(
        "when idle, give freed heap back to the OS at most this often (daemon/memory.py); 0 = never"))
    engine_restart_wait_s: float = field(default=60.0, metadata=_h(
        "when the last serving engine is lost, its batches (retried once), the queue and new queries wait "
        "this long for a restarted engine, each within its own deadline; 0 = fail them at once"))
    restart_backoff_s: float = field(default=1.0, metadata=_h(
        "first delay before restarting a failed engine; doubles per consecutive failure (max 60 s)"))
    standby_engines: bool = field(default=False, metadata=_h(
        "keep one loaded spare engine per device (the model a second time in its memory): when an active "
        "engine of that device is lost, the spare takes its batches at once and the lost one restarts "
        "as the new spare. For one-engine hosts where a restart (seconds on a full-size model) must not "
        "stop the service"))
    reload_canary_dataset: str = field(default="", metadata=_h(
        "registered dataset a reload's new engines predict before traffic moves to them, checked against "
        "the reference of their arithmetic (engines/canary.py); default: the first configured dataset "
        "(none configured: no canary, said in the reload's checks)"))
    reload_canary_pairs: int = field(default=2000, metadata=_h("pairs of the canary dataset a reload predicts"))
    reload_min_auc_ratio: float = field(default=0.0, metadata=_h(
        "a reload is refused when the new model's AUC on the canary pairs is below this share of the served "
        "model's on the same pairs (e.g. 0.99); 0 = no AUC gate"))
    reload_strategy: ReloadStrategy = field(default=ReloadStrategy.AUTO, metadata=_h(
        "how a reload brings the new model in: 'auto' (default: new engines beside the old ones, and engine "
        "by engine where a device has no room for both), 'parallel' (side by side only) or 'rolling' (engine "
        "by engine: each old engine stops before its replacement loads; with one engine queries queue meanwhile)"))
    reload_timeout_s: float = field(default=900.0, metadata=_h(
        "a reload whose new engines are not loaded and verified within this fails (the old model serves on)"))
    oip_http_port: int = field(default=0, metadata=_h(
        "Open Inference Protocol (KServe v2) REST port of the front end process (oip/: model `oip_model_name`, "
        "inputs dense/sparse or sample_ids, output probability); 0 = off"))
    oip_grpc_port: int = field(default=0, metadata=_h("Open Inference Protocol gRPC port of the front end; 0 = off"))
    oip_host: str = field(default="127.0.0.1", metadata=_h(
        "address the front end's ports bind; beyond loopback needs allow_remote"))
    oip_model_name: str = field(default="dlrm", metadata=_h("the model name the front end serves"))
    oip_workers: int = field(default=1, metadata=_h(
        "front end processes sharing its ports (SO_REUSEPORT: the kernel spreads client connections over "
        "them); one Python process serves about a core's worth of requests"))
    metrics_host: str = field(default="127.0.0.1", metadata=_h("Prometheus exporter address"))
    metrics_port: int = field(default=0, metadata=_h("Prometheus exporter port; 0 = off"))
    log_level: str = field(default="INFO", metadata=_h("DEBUG, INFO, WARNING or ERROR"))
    allow_remote: bool = field(default=False, metadata=_h(
        "allow a tcp endpoint, metrics_host or oip_host beyond loopback (default: loopback / ipc only)"))
    curve_secret_key_file: str = field(default="", metadata=_h(
        "the daemon's CURVE key pair (NAME.key_secret from `dlrm-daemon keygen`): clients must authenticate"))
    curve_authorized_keys_dir: str = field(default="", metadata=_h(
        "directory of authorized clients' public keys (*.key); required with curve_secret_key_file"))

    @property
    def engine_names(self) -> tuple[str, ...]:
        """Stable per-engine names for logs and metrics: cuda:1 -> cuda1; repeats get a suffix."""
        names: list[str] = []
        for dev in self.engines:
            base = dev.replace(":", "")
            if dev in ("cpu", "null"):
                base = f"{dev}{sum(1 for d in self.engines[:len(names)] if d == dev)}"
            names.append(base if base not in names else f"{base}-{len(names)}")
        return tuple(names)

    def describe(self) -> str:
        return "\n".join(f"{k} = {json.dumps(_jsonable(v))}" for k, v in dataclasses.asdict(self).items())

    def advisories(self) -> list[str]:
        """Valid settings that are likely to hold throughput back (check-config prints them, the daemon logs
        them at start). A client that keeps its pairs in flight within max_queue_pairs (loadgen_driver does,
        so that it is never refused OVERLOADED) cannot fill engine slots beyond that bound: with a queue
        bound below the engines' slots, engines wait for work while no process is busy (BENCHMARKS.md,
        "LoadGen's own ceiling": the round trip times that window is the rate)."""
        slots = len(self.engines) * self.inflight_batches * self.max_batch_pairs
        if self.max_queue_pairs >= slots:
            return []
        return [f"max_queue_pairs = {self.max_queue_pairs} is below what the engines hold in flight "
                f"({len(self.engines)} engines x {self.inflight_batches} inflight_batches x {self.max_batch_pairs} "
                f"max_batch_pairs = {slots} pairs): a client that keeps its work within the queue bound "
                f"(loadgen_driver) may leave engines idle; for throughput runs raise it to {slots} or more"]


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


FIELDS = {f.name: f for f in dataclasses.fields(DaemonConfig)}
_TYPES: dict[str, Any] = typing.get_type_hints(DaemonConfig)
_WHAT = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
         tuple[str, ...]: "a list of strings", dict[str, str]: 'a table of name = "path" strings'}


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _coerce(key: str, value: Any, source: str, from_text: bool) -> Any:
    """A TOML value (or a flag/environment string when from_text) as the key's type, by msgspec."""
    t = _TYPES[key]
    try:
        if from_text and t == tuple[str, ...] and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif from_text and t == dict[str, str] and isinstance(value, (str, list)):
            value = _parse_pairs(value)
        if t is bool and from_text and isinstance(value, str):
            value = value.strip().lower()
            value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(value, value)
        return msgspec.convert(value, type=t, strict=not from_text)
    except msgspec.ValidationError:  # (a ValueError too: first)
        if isinstance(t, type) and issubclass(t, enum.Enum):
            what = "one of " + ", ".join(repr(m.value) for m in t)
        else:
            what = _WHAT.get(t, str(t))
        raise ConfigError(key, f"must be {what}, got {value!r}", source) from None
    except ValueError as exc:  # _parse_pairs
        raise ConfigError(key, str(exc), source) from None


def _parse_pairs(text: str | list[str]) -> dict[str, str]:
    items = text if isinstance(text, list) else [p for p in text.split(",") if p.strip()]
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"expected name=path, got {item!r}")
        out[name.strip()] = path.strip()
    return out


def _validate(cfg: DaemonConfig, sources: Mapping[str, str]) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(key, msg, sources.get(key, "default"))

    for key in ("max_batch_pairs", "inflight_batches", "max_queue_pairs", "max_pairs_per_query",
                "max_message_bytes", "max_client_backlog_bytes", "reload_canary_pairs"):
        if getattr(cfg, key) <= 0:
            raise bad(key, f"must be positive, got {getattr(cfg, key)}")
    for key in ("heartbeat_interval_s", "heartbeat_timeout_s", "restart_backoff_s", "batch_timeout_s",
                "reload_timeout_s"):
        if not getattr(cfg, key) > 0:
            raise bad(key, f"must be > 0 seconds, got {getattr(cfg, key)}")
    for key in ("max_queue_delay_s", "drain_timeout_s", "engine_restart_wait_s", "latency_target_s"):
        if not getattr(cfg, key) >= 0:
            raise bad(key, f"must be >= 0 seconds, got {getattr(cfg, key)}")
    if cfg.heartbeat_timeout_s <= cfg.heartbeat_interval_s:
        raise bad("heartbeat_timeout_s", f"must exceed heartbeat_interval_s={cfg.heartbeat_interval_s}")
    if cfg.max_pairs_per_query > cfg.max_queue_pairs:
        raise bad("max_pairs_per_query", f"must be <= max_queue_pairs={cfg.max_queue_pairs}")
    if cfg.max_queue_pairs < cfg.max_batch_pairs:
        raise bad("max_queue_pairs", f"must be >= max_batch_pairs={cfg.max_batch_pairs}")
    if not 0.0 <= cfg.reload_min_auc_ratio <= 1.0:
        raise bad("reload_min_auc_ratio", f"must lie in [0, 1], got {cfg.reload_min_auc_ratio}")
    if cfg.reload_canary_dataset and cfg.reload_canary_dataset not in cfg.datasets:
        raise bad("reload_canary_dataset", f"{cfg.reload_canary_dataset!r} is not one of the configured datasets "
                                           f"{sorted(cfg.datasets)}")
    if not 0.0 <= cfg.embedding_weights_on_gpu_part <= 1.0:
        raise bad("embedding_weights_on_gpu_part", f"must lie in [0, 1], got {cfg.embedding_weights_on_gpu_part}")
    for key in ("metrics_port", "oip_http_port", "oip_grpc_port"):
        if not 0 <= getattr(cfg, key) <= 65535:
            raise bad(key, f"must be a TCP port 0..65535, got {getattr(cfg, key)}")
    if not 1 <= cfg.oip_workers <= 64:
        raise bad("oip_workers", f"must be 1 to 64, got {cfg.oip_workers}")
    if (cfg.oip_http_port or cfg.oip_grpc_port) and cfg.oip_http_port == cfg.oip_grpc_port:
        raise bad("oip_grpc_port", f"must differ from oip_http_port ({cfg.oip_http_port})")
    if not cfg.oip_model_name or not cfg.oip_model_name.replace("-", "").replace("_", "").isalnum():
        raise bad("oip_model_name", f"use letters, digits, '-' and '_', got {cfg.oip_model_name!r}")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise bad("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {cfg.log_level!r}")
    if not cfg.engines:
        raise bad("engines", "at least one engine device is needed")
    for dev in cfg.engines:
        try:
            EngineKind.of_device(dev)
        except ValueError as exc:
            raise bad("engines", str(exc)) from None
    if cfg.malloc_trim_interval_s < 0:
        raise bad("malloc_trim_interval_s", f"must be >= 0 seconds, got {cfg.malloc_trim_interval_s}")
    if any(d != "null" for d in cfg.engines):
        if not cfg.model:
            raise bad("model", "required (the model artifact directory) unless every engine is 'null'")
        if not (Path(cfg.model) / "meta.json").is_file():
            raise bad("model", f"{cfg.model!r} is not an artifact directory (no meta.json)")
    if cfg.model and (Path(cfg.model) / "meta.json").is_file():
        try:
            read_model_config(cfg.model)  # format, version and shape; engines check the data files
        except ArtifactError as exc:
            raise bad("model", str(exc)) from None
    for name, path in cfg.datasets.items():
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise bad("datasets", f"dataset name {name!r}: use letters, digits, '-', '_', '.'")
        if not (Path(path) / "meta.json").is_file():
            raise bad("datasets", f"dataset {name!r}: {path!r} is not a dataset directory (no meta.json)")
    scheme = cfg.endpoint.split("://", 1)[0]
    if scheme not in ("ipc", "tcp") or "://" not in cfg.endpoint:
        raise bad("endpoint", f"must be ipc://PATH or tcp://HOST:PORT, got {cfg.endpoint!r}")
    if scheme == "ipc" and len(cfg.endpoint[6:]) > _IPC_PATH_MAX:
        raise bad("endpoint", f"ipc path longer than {_IPC_PATH_MAX} bytes (unix socket limit)")
    for problem in (exposure_problem(cfg.endpoint, cfg.metrics_host, cfg.metrics_port, cfg.allow_remote),
                    oip_exposure_problem(cfg.oip_host, cfg.oip_http_port or cfg.oip_grpc_port, cfg.allow_remote),
                    curve_problem(cfg.curve_secret_key_file, cfg.curve_authorized_keys_dir)):
        if problem is not None:
            raise bad(*problem)
    if len(os.path.join(cfg.runtime_dir, "engine-00-000000.sock")) > _IPC_PATH_MAX:
        raise bad("runtime_dir", f"path too long for unix sockets inside it (limit {_IPC_PATH_MAX})")


def check_environment(env: Mapping[str, str]) -> None:
    """ConfigError naming the first DLRM_* variable that is neither a config key nor a known hook."""
    known = {env_name(k) for k in FIELDS} | NON_CONFIG_ENV
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            raise ConfigError(name, f"unknown environment variable (config keys are DLRM_<KEY>: "
                                    f"{', '.join(sorted(env_name(k) for k in FIELDS))})", "environment")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TOML table of a config file; ConfigError naming the file when it cannot be read."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"config file {path} is not valid TOML: {exc}") from None


def find_endpoint(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """The endpoint of a running daemon, for its clients (`dlrm-daemon status`): from the config
    file's `endpoint` or `runtime_dir` (nothing else of it is read or checked), else DLRM_ENDPOINT /
    DLRM_RUNTIME_DIR, else the default (daemon.endpoints.client_endpoint)."""
    env = os.environ if env is None else env
    if path is not None:
        raw = read_config_file(path)
        for key in ("endpoint", "runtime_dir"):
            if key in raw and not isinstance(raw[key], str):
                raise ConfigError(key, f"must be a string, got {raw[key]!r}", str(path))
        if raw.get("endpoint"):
            return str(raw["endpoint"])
        if raw.get("runtime_dir"):
            return endpoint_in(str(raw["runtime_dir"]))
    return client_endpoint(env)


def visible_gpus(env: Mapping[str, str], proc_gpus: str = "/proc/driver/nvidia/gpus") -> int:
    """How many GPUs CUDA will number 0..n-1 here, without loading CUDA (the dispatcher never does):
    CUDA_VISIBLE_DEVICES when set (its entries up to the first invalid one, as CUDA reads it), else
    the devices the NVIDIA driver lists."""
    try:
        installed = len(os.listdir(proc_gpus))
    except OSError:
        installed = 0
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return installed
    count = 0
    for item in (m.strip() for m in mask.split(",")):
        if not item or item.startswith("-") or (item.isdigit() and int(item) >= installed):
            break  # CUDA stops at the first invalid entry
        count += 1
    return count


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> DaemonConfig:
    """Build the config: defaults < TOML `path` < DLRM_* in `env` < `overrides` (flag strings)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        raw = read_config_file(path)
        for key, value in raw.items():
            if key not in FIELDS:
                known = ", ".join(FIELDS)
                raise ConfigError(key, f"unknown key (known keys: {known})", str(path))
            values[key] = _coerce(key, value, str(path), from_text=False)
            sources[key] = str(path)
    check_environment(env)
    for key in FIELDS:
        name = env_name(key)
        if name in env:
            values[key] = _coerce(key, env[name], f"environment {name}", from_text=True)
            sources[key] = f"environment {name}"
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise ConfigError(key, "unknown key", "command line")
        if value is None:
            continue
        values[key] = _coerce(key, value, flag_name(key), from_text=isinstance(value, (str, list)))
        sources[key] = flag_name(key)
    if not values.get("runtime_dir"):
        values["runtime_dir"] = default_runtime_dir(env)
    values["runtime_dir"] = os.path.abspath(values["runtime_dir"])
    if not values.get("endpoint"):
        values["endpoint"] = endpoint_in(values["runtime_dir"])
    if "cuda:all" in values.get("engines", ()):
        n = visible_gpus(env)
        if n == 0:
            raise ConfigError("engines", "'cuda:all' but no NVIDIA GPU is visible (/proc/driver/nvidia/gpus, "
                              "CUDA_VISIBLE_DEVICES)", sources.get("engines", "default"))
        values["engines"] = tuple(d for dev in values["engines"]
                                  for d in ([f"cuda:{i}" for i in range(n)] if dev == "cuda:all" else [dev]))
    if not values.get("max_batch_pairs"):
        engines = values.get("engines", DaemonConfig.engines)
        values["max_batch_pairs"] = CPU_BATCH_PAIRS if engines and all(d == "cpu" for d in engines) else DEFAULT_BATCH_PAIRS
    if values.get("latency_target_s", -1.0) == -1.0:
        engines = values.get("engines", DaemonConfig.engines)
        values["latency_target_s"] = 0.0 if engines and all(d == "cpu" for d in engines) else DEFAULT_LATENCY_TARGET_S
    cfg = DaemonConfig(**values)
    _validate(cfg, sources)
    return _resolve_precision(cfg, sources)


def _resolve_precision(cfg: DaemonConfig, sources: Mapping[str, str]) -> DaemonConfig:
    """The GPU MLP precision to run for accuracy_target, from the artifact's measured accuracy
    (daemon/precision_plan.py); a ConfigError when the profile cannot be served as configured."""
    if not any(EngineKind.of_device(d) is EngineKind.CUDA for d in cfg.engines):
        if cfg.gpu_mlp_precision is MlpPrecision.AUTO:  # no GPU engine: nothing computes it
            return dataclasses.replace(cfg, gpu_mlp_precision=MlpPrecision.FP16)
        return cfg
    try:
        cal = read_calibration(cfg.model)
    except ArtifactError as exc:
        raise ConfigError("model", str(exc), sources.get("model", "default")) from None
    try:
        precision, _why = plan(cfg.gpu_mlp_precision, cfg.accuracy_target.share,
                               cal.accuracy if cal is not None else None, cal is not None)
    except PlanError as exc:
        raise ConfigError("gpu_mlp_precision", str(exc), sources.get("gpu_mlp_precision", "default")) from None
    return dataclasses.replace(cfg, gpu_mlp_precision=precision)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per key (strings; load_config coerces and validates them)."""
    for key, f in FIELDS.items():
        text = f"{f.metadata['help']} [{_shown_default(f)}env {env_name(key)}]"
        kwargs: dict[str, Any] = {"dest": key, "default": None, "help": text.replace("%", "%%")}
        if key == "datasets":
            kwargs.update(action="append", metavar="NAME=PATH")
        parser.add_argument(flag_name(key), **kwargs)


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value in ("", 0) and not isinstance(value, bool) and f.name in ("endpoint", "runtime_dir", "max_batch_pairs"):
        return ""  # the help text says how the default is chosen
    text = ",".join(value) if isinstance(value, tuple) else json.dumps(value) if isinstance(value, (dict, str)) else str(value)
    return "default: " + text.replace("%", "%%") + "; "


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in FIELDS if getattr(args, key, None) is not None}
