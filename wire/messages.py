"""The wire format: msgspec structs (tagged unions) for headers, raw array frames for data.

Client <-> dispatcher (DEALER <-> ROUTER): frame 0 is a msgpack header (`Request` / `Reply`
union), frames 1.. are raw little-endian array bytes whose dtype and shape the header states.
Dispatcher <-> engine (PAIR over ipc://): one msgpack frame per `Control` message; batch data
travels through the engine's shared-memory slots, never through the socket. The engine's start
parameters (`EngineSpec`) reach it as msgpack bytes on its stdin. Nothing is pickled.
Fixed sets of values are enums; they travel as their string values.
"""
from __future__ import annotations

import enum
import re
from typing import Any, Union

import msgspec
import numpy as np

from wire.errors import ErrorCode

SAMPLE_ID_DTYPE = "<i8"
DENSE_DTYPE = "<f4"
SPARSE_DTYPE = "<i4"
PRED_DTYPE = "<f4"
DENSE_FEATURES = 13
SPARSE_FEATURES = 26


class EngineKind(enum.StrEnum):
    """What an engine process computes on; its device string says it ('cpu', 'cuda:N', 'null')."""

    CPU = "cpu"
    CUDA = "cuda"
    NULL = "null"  # answers at once with a function of the inputs (benchmarks, tests)

    @classmethod
    def of_device(cls, device: str) -> "EngineKind":
        """ValueError for anything but 'cpu', 'cuda:N' or 'null'."""
        if device in ("cpu", "null"):
            return cls(device)
        if re.fullmatch(r"cuda:\d+", device):
            return cls.CUDA
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda:N' or 'null'")


class EngineState(enum.StrEnum):
    """An engine's lifecycle (daemon/engine_state.py holds the transitions)."""

    STOPPED = "stopped"  # no process (before the first start, after shutdown)
    STARTING = "starting"  # process started, loading the model
    READY = "ready"  # serving, nothing in flight
    BUSY = "busy"  # serving, batches in flight
    STARVED = "starved"  # serving, but silent while its process progresses (short of the GIL or cores)
    HUNG = "hung"  # declared hung (no progress): being killed
    RESTARTING = "restarting"  # lost after it served; restart scheduled
    FAILED = "failed"  # could not start or load; restart scheduled with backoff


class DaemonState(enum.StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


class BatchKind(enum.StrEnum):
    REF = "ref"  # pair ranges of a registered dataset
    VALUE = "value"  # dense and sparse rows in the slot


class HostRows(enum.StrEnum):
    """Where a GPU engine's cold embedding rows live in host memory (engines/host_rows.py)."""

    PRIVATE = "private"  # a page-locked copy of its own (one per engine)
    SHARED = "shared"  # the artifact file's pages, page-locked in place (one copy per host)


class ColdRowGather(enum.StrEnum):
    """Where a GPU engine's by-reference batches read their cold rows (engines/cold_rows.py)."""

    KERNEL = "kernel"  # the fused gather reads them from pinned host memory, zero-copy over PCIe
    HOST = "host"  # the engine's CPU gathers a batch's cold rows; one copy puts them on the device first


class MlpPrecision(enum.StrEnum):
    """A GPU engine's MLP arithmetic."""

    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # the top MLP through kernels.quant_linear, with the artifact's calibration.json
    FP8 = "fp8"  # the top MLP in fp8 e4m3 through cuBLASLt (nvmath-python), with calibration.json
    AUTO = "auto"  # config only: the daemon resolves it (daemon/precision_plan.py) before engines start


class _Msg(msgspec.Struct, tag=True, array_like=True, frozen=True):
    pass


# ---- requests (client -> dispatcher) ----
NO_DEADLINE = float("inf")  # deadline_s of throughput work (see InferByRef)


class InferByRef(_Msg, frozen=True):
    """+ one frame: sample ids (`ids_dtype`, num_samples values) of a registered dataset."""

    request_id: int
    dataset: str
    num_samples: int
    # budget from arrival at the daemon: a number = admitted only if the work ahead lets it finish in
    # time, TIMEOUT once it passes; None = admitted against the daemon's latency_target_s (answered even
    # if late); NO_DEADLINE (inf) = throughput work, never refused for latency (LoadGen runs)
    deadline_s: float | None = None
    ids_dtype: str = SAMPLE_ID_DTYPE
    # "" = predictions come back in the reply; else the path of an output region this daemon has
    # registered (RegisterOutput): the engines write the predictions there, from element
    # `output_offset` on, and the reply (InferWritten) carries no data
    output: str = ""
    output_offset: int = 0


class InferByValue(_Msg, frozen=True):
    """+ two frames: dense [num_pairs, 13] and sparse [num_pairs, 26]."""

    request_id: int
    num_pairs: int
    deadline_s: float | None = None  # as InferByRef's
    dense_dtype: str = DENSE_DTYPE
    sparse_dtype: str = SPARSE_DTYPE


class LoadSamples(_Msg, frozen=True):
    """+ one frame: sample ids. Marks them servable (the LoadGen working set)."""

    request_id: int
    dataset: str
    num_samples: int
    ids_dtype: str = SAMPLE_ID_DTYPE


class UnloadSamples(_Msg, frozen=True):
    request_id: int
    dataset: str
    num_samples: int
    ids_dtype: str = SAMPLE_ID_DTYPE


class RegisterDataset(_Msg, frozen=True):
    request_id: int
    name: str
    path: str


class RegisterOutput(_Msg, frozen=True):
    """An output region: a shared-memory file of the client's (on this host, under /dev/shm, owned by
    the daemon's user) holding `num_predictions` float32 values. InferByRef requests that name it get
    their predictions written there by the engines, with no bytes in the reply (Triton's system
    shared memory for outputs). Released when the registering client disconnects or unregisters."""

    request_id: int
    path: str
    num_predictions: int


class UnregisterOutput(_Msg, frozen=True):
    request_id: int
    path: str


class GetStatus(_Msg, frozen=True):
    request_id: int


class Reload(_Msg, frozen=True):
    """Re-read the daemon's config (or `config`, a path on the daemon's host) and swap in its model:
    new engines load it beside the old ones, are verified, then take the traffic. Answered when done
    (Reloaded) or refused (Error RELOAD_FAILED, the old model still serving)."""

    request_id: int
    config: str = ""  # "" = the file the daemon was started with


Request = Union[InferByRef, InferByValue, LoadSamples, UnloadSamples, RegisterDataset, GetStatus, Reload,
                RegisterOutput, UnregisterOutput]


# ---- replies (dispatcher -> client) ----
class InferResult(_Msg, frozen=True):
    """+ one frame: float32 predictions, request order."""

    request_id: int
    num_pairs: int
    model: str = ""  # the model that computed them (daemon.metrics.model_id: directory @ checksum)


class InferResults(_Msg, frozen=True):
    """Several results for one client at once (queries answered by the same batch) + one frame:
    their float32 predictions concatenated in this order. Saves a message per query."""

    request_ids: list[int]
    num_pairs: list[int]
    model: str = ""  # as InferResult's: one batch, one model


class InferWritten(_Msg, frozen=True):
    """Results of requests that named an output region: their predictions are in that region, at the
    offsets the requests gave (written before this reply was sent). No frame."""

    request_ids: list[int]
    num_pairs: list[int]
    model: str = ""


class Ack(_Msg, frozen=True):
    request_id: int


class EngineStatus(msgspec.Struct, frozen=True):
    name: str
    device: str
    state: EngineState
    pid: int
    gpu_part: float
    inflight: int
    restarts: int
    batches_done: int
    last_heartbeat_age_s: float | None
    device_memory_bytes: int
    last_error: str
    # Added fields (defaults keep older peers decodable): embedding lookups served from device
    # memory (hot) and host memory (cold) since start, hot / (hot + cold), and the age of the
    # engine's oldest in-flight batch (the batch_timeout_s clock).
    hot_lookups: int = 0
    cold_lookups: int = 0
    hot_ratio: float | None = None
    oldest_batch_s: float | None = None
    model: str = ""  # the model it serves (daemon.metrics.model_id)
    role: str = "active"  # "active", or during a reload "candidate" (new model) / "retiring" (old)


class Status(_Msg, frozen=True):
    request_id: int
    pid: int
    uptime_s: float
    state: DaemonState
    endpoint: str
    engines: list[EngineStatus]
    queue_queries: int
    queue_pairs: int
    inflight_batches: int
    datasets: dict[str, int]  # name -> number of samples
    rates: dict[str, float]  # queries/s, samples/s, pairs/s, batches/s over the last seconds
    totals: dict[str, int]  # counts by outcome since start
    recent_errors: list[str]
    model: str = ""  # the model served (that of the active engines)
    # the queue bound (config max_queue_pairs) beyond which a query is refused OVERLOADED, so that a
    # client can keep its own work in flight under it; 0 from a daemon that does not say
    max_queue_pairs: int = 0
    max_pairs_per_query: int = 0  # the largest query it accepts (BAD_REQUEST beyond); 0 as above


class Error(_Msg, frozen=True):
    request_id: int
    code: ErrorCode
    message: str


class Reloaded(_Msg, frozen=True):
    """A Reload that took effect: `model` serves every query batched from now on."""

    request_id: int
    model: str
    previous_model: str
    seconds: float
    checks: list[str]  # what was verified before traffic moved, one line each


Reply = Union[InferResult, InferResults, InferWritten, Ack, Status, Error, Reloaded]


# ---- control (dispatcher <-> engine process) ----
class BatchReady(_Msg, frozen=True):
    """Slot `slot` holds a batch: kind REF = int64 starts/counts of `num_ranges` pair ranges of
    `dataset`; kind VALUE = dense f32 / sparse i32 rows of `num_pairs` pairs."""

    batch_id: int
    slot: int
    kind: BatchKind
    dataset: str
    num_ranges: int
    num_pairs: int
    # Where the predictions go, in batch order: (output region path, element offset, pairs); a path
    # of "" = the slot's own output at that batch position. Empty = all into the slot (as before).
    outputs: list[tuple[str, int, int]] = []


class BatchDone(_Msg, frozen=True):
    batch_id: int
    slot: int
    num_pairs: int
    hot_lookups: int
    cold_lookups: int
    compute_s: float


class BatchFailed(_Msg, frozen=True):
    batch_id: int
    slot: int
    message: str


class Heartbeat(_Msg, frozen=True):
    seq: int
    busy_s: float  # how long the current batch has been running (0 when idle)
    batches_done: int
    # The engine's time.monotonic() when sent: CLOCK_MONOTONIC is one clock for every process of
    # a host, so the dispatcher can tell a late read (its own stall) from a late send.
    sent_at: float = 0.0


class EngineReady(_Msg, frozen=True):
    device: str
    pid: int
    device_memory_bytes: int
    device_name: str = ""  # the GPU's name ("NVIDIA H200"); "" for the cpu and null engines
    # Native ids of the threads that compute batches (work and completion threads): the dispatcher
    # reads their CPU and run-queue time to tell a long batch that progresses from a hung one.
    work_tids: list[int] = []


class EngineLoadFailed(_Msg, frozen=True, tag="EngineFailed"):
    """The engine cannot work (model failed to load, backend broken); it exits after sending.
    (Tagged "EngineFailed" on the wire, as before; the class name is unique beside wire.errors.)"""

    message: str


class AddDataset(_Msg, frozen=True):
    name: str
    path: str


class DatasetAdded(_Msg, frozen=True):
    name: str
    error: str  # "" on success


class Shutdown(_Msg, frozen=True):
    pass


class ReleaseOutput(_Msg, frozen=True):
    """An output region is gone (its client unregistered it or disconnected): unmap it once the
    batches sent before this message are done."""

    path: str


class RunCanary(_Msg, frozen=True):
    """Predict the first `pairs` pairs of registered dataset `dataset` with the engine's backend and with
    the plain reference of its arithmetic (engines.reference), before a reload moves traffic to it."""

    dataset: str
    pairs: int
    reference: bool = True  # False: predictions and their AUC only (the serving engine, for the AUC gate)


class CanaryDone(_Msg, frozen=True):
    dataset: str
    pairs: int
    max_abs_diff: float  # backend vs its reference, over the pairs
    tolerance: float  # what the engine's arithmetic allows (the GPU tests' bound for its precision)
    auc: float | None  # the backend's AUC over the pairs (None: a single class in them)
    error: str = ""  # the canary could not run (unknown dataset, a failure): why


Control = Union[
    BatchReady, BatchDone, BatchFailed, Heartbeat, EngineReady, EngineLoadFailed, AddDataset,
    DatasetAdded, Shutdown, RunCanary, CanaryDone, ReleaseOutput,
]


class EngineSpec(msgspec.Struct, frozen=True):
    """Everything an engine process needs, handed over as msgspec bytes (nothing pickled)."""

    name: str
    device: str
    artifact: str
    gpu_part: float
    control_endpoint: str
    shm_path: str
    slots: int
    max_batch_pairs: int
    heartbeat_interval_s: float
    datasets: dict[str, str]
    parent_pid: int
    gpu_mlp_precision: MlpPrecision = MlpPrecision.FP16  # GPU engines (daemon.config)
    log_level: str = "INFO"  # the daemon's log_level: DEBUG, INFO, WARNING or ERROR
    host_rows: HostRows = HostRows.PRIVATE  # GPU engines with cold rows (daemon.config)
    cold_row_gather: ColdRowGather = ColdRowGather.KERNEL  # GPU engines with cold rows (daemon.config)

    @property
    def kind(self) -> EngineKind:
        return EngineKind.of_device(self.device)


class OipSpec(msgspec.Struct, frozen=True):
    """What the Open Inference Protocol front end process (`python -m oip`) needs, on its stdin."""

    endpoint: str  # the dispatcher's client endpoint: the front end is one of its clients
    model_name: str
    host: str  # what its ports bind
    http_port: int  # 0: no REST server
    grpc_port: int  # 0: no gRPC server
    parent_pid: int  # the dispatcher: the front end exits when it is gone
    log_level: str = "INFO"
    worker: int = 0  # which of the `workers` processes sharing the ports (SO_REUSEPORT) this is
    workers: int = 1


_ENC = msgspec.msgpack.Encoder()
encode = _ENC.encode
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)
control_decoder = msgspec.msgpack.Decoder(Control)
spec_decoder = msgspec.msgpack.Decoder(EngineSpec)
oip_spec_decoder = msgspec.msgpack.Decoder(OipSpec)
_raw_decoder = msgspec.msgpack.Decoder()


def salvage_request_id(header: Any) -> int:
    """Best-effort request id of a header that failed validation (-1 if none can be read)."""
    try:
        raw = _raw_decoder.decode(header)
    except Exception:
        return -1
    if isinstance(raw, list) and len(raw) > 1 and isinstance(raw[1], int) and not isinstance(raw[1], bool):
        return raw[1]
    return -1


def as_array(buf: Any, dtype: str, count: int, width: int = 1) -> np.ndarray:
    """View a received frame as `count` x `width` values of `dtype`; ValueError if the size is wrong."""
    view = memoryview(buf)
    itemsize = np.dtype(dtype).itemsize
    expected = count * width * itemsize
    if view.nbytes != expected:
        raise ValueError(
            f"frame has {view.nbytes} bytes, expected {expected} ({count} x {width} x {dtype})"
        )
    arr = np.frombuffer(view, dtype=dtype)
    return arr.reshape(count, width) if width > 1 else arr
