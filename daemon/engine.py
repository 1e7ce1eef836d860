"""An engine as the dispatcher knows it: its process, lifecycle, slots, batches in flight, model and role.

The supervisor (daemon/supervisor.py) is the only writer of these records; the scheduler, the request
handler and a reload (daemon/model_swap.py) read them.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

import zmq

from daemon.batcher import Batch
from daemon.config import DaemonConfig
from daemon.engine_process import EngineProcess
from daemon.engine_state import EngineLifecycle
from wire import messages as M
from wire.shm import Region


class EngineRole(enum.StrEnum):
    """Where an engine stands in a model swap (daemon/model_swap.py); ACTIVE outside one."""

    ACTIVE = "active"  # serves the current model: new batches go to it
    CANDIDATE = "candidate"  # loads or is verified for a reload: no traffic yet
    RETIRING = "retiring"  # replaced by a reload: finishes the batches it holds, then stops
    STANDBY = "standby"  # loaded and ready, no traffic: takes an active engine's place when it is lost


@dataclass(frozen=True)
class EngineModel:
    """What an engine process loads: the model and the daemon keys a reload may change with it."""

    artifact: str
    model_id: str  # daemon.metrics.model_id: directory @ checksum, named in every reply
    gpu_part: float
    gpu_mlp_precision: M.MlpPrecision


@dataclass(eq=False)
class InFlightBatch:
    batch: Batch
    slot: int
    sent_at: float  # when BatchReady was sent
    assembly_s: float  # filling the slot


@dataclass
class EngineLiveness:
    """What the supervisor knows of an engine's signs of life (reset at every start)."""

    last_heard: float = 0.0  # when the dispatcher last received anything from the engine
    last_beat_sent: float = 0.0  # the engine's own send time of its last heartbeat
    cpu_mark: tuple[float, int] | None = None  # (when, process progress) while silent
    starved_since: float = 0.0  # silent but progressing since then (0: not so)
    work_tids: list[int] = field(default_factory=list)  # the engine's batch threads (EngineReady)
    batch_mark: tuple[float, int] | None = None  # (when, their progress) while a batch is overdue
    slow_since: float = 0.0  # an overdue batch has been progressing since then (0: none is)
    last_result_at: float = 0.0  # when its last BatchDone/BatchFailed arrived


@dataclass
class EngineCounters:
    hot_lookups: int = 0
    cold_lookups: int = 0
    batches_done: int = 0
    restarts: int = 0
    device_memory_bytes: int = 0


class Engine:
    """One configured device: its current process (if any), lifecycle, slots and in-flight batches."""

    def __init__(self, index: int, name: str, device: str, region: Region, model: EngineModel,
                 role: EngineRole = EngineRole.ACTIVE) -> None:
        self.index = index
        self.name = name
        self.device = device
        self.model = model
        self.role = role
        self.kind = M.EngineKind.of_device(device)
        self.region = region
        self.lifecycle = EngineLifecycle()
        self.proc: EngineProcess | None = None
        self.sock: zmq.Socket[Any] | None = None
        self.endpoint = ""
        self.generation = 0
        self.free_slots: list[int] = []
        self.inflight: dict[int, InFlightBatch] = {}  # batch_id -> entry; insertion order: oldest first
        self.live = EngineLiveness()
        self.counts = EngineCounters()
        self.last_error = ""
        self.load_error = ""  # its current process's EngineLoadFailed message ("" if none)
        self.device_name = ""  # the GPU's name, from EngineReady ("" for cpu and null engines)
        self.failures_in_row = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self.ever_ready = False
        self.settled = False  # its first start ended: ready, or failed (the dispatcher waits for all)
        self.restart_handle: asyncio.TimerHandle | None = None
        self.retired = False  # stopped for good (Supervisor.retire): its exit releases it, no restart

    @property
    def state(self) -> M.EngineState:
        return self.lifecycle.state

    @property
    def serving(self) -> bool:
        return self.lifecycle.serving

    @property
    def takes_batches(self) -> bool:
        """Serving and active: the scheduler may give it new batches."""
        return self.role is EngineRole.ACTIVE and self.lifecycle.serving

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def oldest_batch(self, now: float) -> tuple[Batch, float] | None:
        """The batch the engine works on (its oldest in flight) and for how long: from its dispatch
        or the engine's previous batch result, whichever is later (batches queued on the engine
        behind a slow one do not run yet)."""
        if not self.inflight:
            return None
        entry = next(iter(self.inflight.values()))
        return entry.batch, now - max(entry.sent_at, self.live.last_result_at)

def model_of(config: DaemonConfig) -> EngineModel:
    from daemon.metrics import model_id

    return EngineModel(config.model, model_id(config.model), config.embedding_weights_on_gpu_part,
                       config.gpu_mlp_precision)
