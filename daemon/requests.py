"""Client requests: validation of every request kind, dataset registration and the status reply.

`RequestHandler.handle` takes one received multipart message. Every malformed request becomes a typed
DaemonError that is answered as an Error reply; a bug costs one request, never the dispatcher's pass.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import msgspec
import numpy as np

from daemon.batcher import BY_VALUE_KEY, Query
from daemon.config import DaemonConfig
from daemon.datasets import DatasetEntry, DatasetRegistry, DatasetState
from daemon.outputs import OutputRegistry
from daemon.replies import ReplySender
from daemon.scheduling import Scheduler
from daemon.supervisor import Engine, Supervisor
from wire import messages as M
from wire.errors import BadRequest, DaemonError, ErrorCode
from wire.errors import Timeout

log = logging.getLogger("dlrm.dispatcher")


class RequestHandler:
    def __init__(self, cfg: DaemonConfig, datasets: DatasetRegistry, scheduler: Scheduler, supervisor: Supervisor,
                 replies: ReplySender, state: Callable[[], M.DaemonState], started_mono: float,
                 reload: Callable[[bytes | None, int, str], None] | None = None,
                 outputs: OutputRegistry | None = None) -> None:
        self.cfg = cfg
        self.datasets = datasets
        self.scheduler = scheduler
        self.sup = supervisor
        self.replies = replies
        self._state = state
        self.started_mono = started_mono
        self._reload = reload  # starts a reload and answers it when done (daemon/model_swap.py)
        self.outputs = outputs if outputs is not None else OutputRegistry()
        model = datasets.model
        self._rows = None if model is None else np.asarray(model.table_rows, np.int64)
        self._handlers: dict[type, Callable[[bytes, Any, list[Any]], None]] = {
            M.InferByRef: self._infer_by_ref, M.InferByValue: self._infer_by_value,
            M.LoadSamples: self._load_samples, M.UnloadSamples: self._load_samples,
            M.RegisterDataset: self._register, M.GetStatus: self._status, M.Reload: self._reload_request,
            M.RegisterOutput: self._register_output, M.UnregisterOutput: self._unregister_output,
        }

    def handle(self, frames: list[Any]) -> None:
        client = frames[0].bytes
        if len(frames) < 2:
            self.replies.error(client, -1, ErrorCode.BAD_REQUEST, "empty message (no header frame)")
            return
        size = sum(len(f) for f in frames[1:])
        header = frames[1].buffer
        if size > self.cfg.max_message_bytes:
            self.replies.error(client, M.salvage_request_id(header), ErrorCode.BAD_REQUEST,
                               f"message of {size} bytes exceeds max_message_bytes={self.cfg.max_message_bytes}")
            return
        try:
            req = M.request_decoder.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # msgspec: bad utf-8
            self.replies.error(client, M.salvage_request_id(header), ErrorCode.BAD_REQUEST,
                               f"undecodable request header: {exc}")
            return
        if self._state() is M.DaemonState.DRAINING and not isinstance(req, M.GetStatus):
            self.replies.error(client, req.request_id, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            return
        if isinstance(req, (M.InferByRef, M.InferByValue)) and self.replies.not_reading(client):
            self.replies.error(client, req.request_id, ErrorCode.CLIENT_NOT_READING,
                               f"more than max_client_backlog_bytes={self.cfg.max_client_backlog_bytes} of "
                               "replies to this client are unread: read them before sending more",
                               "by_ref" if isinstance(req, M.InferByRef) else "by_value")
            return
        try:
            self._handlers[type(req)](client, req, frames)
        except DaemonError as exc:
            kind = "by_ref" if isinstance(req, M.InferByRef) else "by_value" if isinstance(
                req, M.InferByValue) else None
            self.replies.error(client, req.request_id, ErrorCode(exc.code), exc.message, kind)
        except Exception as exc:  # a bug must cost one request, not the dispatcher's I/O pass
            log.exception("request %s failed", type(req).__name__)
            self.replies.error(client, req.request_id, ErrorCode.ENGINE_FAILED,
                               f"internal dispatcher error: {type(exc).__name__}: {exc}")

    # ---- validation helpers ----
    @staticmethod
    def _frames(frames: list[Any], n: int, what: str) -> None:
        if len(frames) - 2 != n:
            raise BadRequest(f"{what} needs {n} array frame(s), got {len(frames) - 2}")

    @staticmethod
    def _array(frame: Any, dtype: str, want: str, count: int, width: int, what: str) -> np.ndarray:
        if dtype != want:
            raise BadRequest(f"{what}: dtype {dtype!r} not accepted, send {want!r}")
        try:
            return M.as_array(frame.buffer, dtype, count, width)
        except ValueError as exc:
            raise BadRequest(f"{what}: {exc}") from None

    @staticmethod
    def _deadline(now: float, deadline_s: float | None) -> float | None:
        if deadline_s is None or deadline_s == M.NO_DEADLINE:
            return None
        if not deadline_s > 0:
            raise Timeout(f"deadline_s={deadline_s} leaves no time to compute")
        return now + deadline_s

    def _starting(self) -> bool:
        return self._state() is M.DaemonState.STARTING

    def _reload_request(self, client: bytes, req: M.Reload, frames: list[Any]) -> None:
        self._frames(frames, 0, "Reload")
        if self._reload is None:
            raise BadRequest("this dispatcher cannot reload")
        self._reload(client, req.request_id, req.config)

    # ---- inference ----
    def _infer_by_ref(self, client: bytes, req: M.InferByRef, frames: list[Any]) -> None:
        now = time.monotonic()
        self._frames(frames, 1, "InferByRef")
        ds = self.datasets.get_ready(req.dataset)
        if req.num_samples < 0:
            raise BadRequest(f"num_samples={req.num_samples} is negative")
        ids = self._array(frames[2], req.ids_dtype, M.SAMPLE_ID_DTYPE, req.num_samples, 1, "sample ids")
        starts, counts, pairs = ds.pair_ranges(ids, client)
        if pairs > self.cfg.max_pairs_per_query:
            raise BadRequest(f"query has {pairs} pairs, more than max_pairs_per_query={self.cfg.max_pairs_per_query}")
        if req.output:
            self.outputs.check(req.output, req.output_offset, pairs)
        q = Query(client, req.request_id, ds.name, req.num_samples, pairs, now,
                  self._deadline(now, req.deadline_s), self.scheduler.admission.budget(req.deadline_s),
                  starts=starts, counts=counts, output=req.output, output_offset=req.output_offset)
        self.scheduler.submit(q, self._starting())

    def _infer_by_value(self, client: bytes, req: M.InferByValue, frames: list[Any]) -> None:
        now = time.monotonic()
        self._frames(frames, 2, "InferByValue")
        n = req.num_pairs
        if n < 0 or n > self.cfg.max_pairs_per_query:
            raise BadRequest(f"num_pairs={n} outside [0, max_pairs_per_query={self.cfg.max_pairs_per_query}]")
        dense = self._array(frames[2], req.dense_dtype, M.DENSE_DTYPE, n, M.DENSE_FEATURES, "dense")
        sparse = self._array(frames[3], req.sparse_dtype, M.SPARSE_DTYPE, n, M.SPARSE_FEATURES, "sparse")
        if n and not np.isfinite(dense).all():
            raise BadRequest("dense features contain NaN or infinity")
        if n and self._rows is not None:
            bad = (sparse < 0) | (sparse >= self._rows)
            if bad.any():
                r, t = (int(v) for v in np.argwhere(bad)[0])
                raise BadRequest(f"sparse id {int(sparse[r, t])} of pair {r} table {t} outside "
                                 f"[0, {int(self._rows[t])})")
        elif n and int(sparse.min()) < 0:
            raise BadRequest("sparse ids must be >= 0")
        q = Query(client, req.request_id, BY_VALUE_KEY, 0, n, now, self._deadline(now, req.deadline_s),
                  self.scheduler.admission.budget(req.deadline_s), dense=dense, sparse=sparse, frames=frames)
        self.scheduler.submit(q, self._starting())

    # ---- output regions ----
    def _register_output(self, client: bytes, req: M.RegisterOutput, frames: list[Any]) -> None:
        self._frames(frames, 0, "RegisterOutput")
        self.outputs.register(client, req.path, req.num_predictions)
        self.replies.ack(client, req.request_id)

    def _unregister_output(self, client: bytes, req: M.UnregisterOutput, frames: list[Any]) -> None:
        self._frames(frames, 0, "UnregisterOutput")
        if not self.outputs.unregister(req.path):
            raise BadRequest(f"output region {req.path!r} is not registered")
        self.sup.release_output(req.path)
        self.replies.ack(client, req.request_id)

    # ---- datasets ----
    def _load_samples(self, client: bytes, req: M.LoadSamples | M.UnloadSamples, frames: list[Any]) -> None:
        self._frames(frames, 1, type(req).__name__)
        ds = self.datasets.get_ready(req.dataset)
        ids = self._array(frames[2], req.ids_dtype, M.SAMPLE_ID_DTYPE, req.num_samples, 1, "sample ids")
        ds.set_loaded(ids, isinstance(req, M.LoadSamples), client)
        self.replies.ack(client, req.request_id)

    def _register(self, client: bytes, req: M.RegisterDataset, frames: list[Any]) -> None:
        self._frames(frames, 0, "RegisterDataset")
        old = self.datasets.entries.get(req.name)
        ds = self.datasets.begin(req.name, req.path, set())
        if ds is None:  # the same dataset again: answer now, or with the registration under way
            assert old is not None
            if old.state is DatasetState.READY:
                self.replies.ack(client, req.request_id)
            else:
                old.waiters.append((client, req.request_id))
            return
        ds.waiters.append((client, req.request_id))
        ds.waiting = self.sup.add_dataset(ds.name, ds.path)
        if not ds.waiting:
            self.dataset_progress(ds, "", "")

    def dataset_progress(self, ds: DatasetEntry, engine: str, error: str) -> None:
        """An engine added `ds` (or failed to, or is gone): answer the waiters once it is settled."""
        if not self.datasets.engine_done(ds, engine, error):
            return
        for client, rid in ds.waiters:
            if error:
                self.replies.error(client, rid, ErrorCode.BAD_REQUEST,
                                   f"dataset {ds.name!r}: an engine could not add it: {engine}: {error}")
            else:
                self.replies.ack(client, rid)
        if not error:
            log.info("dataset %s registered (%d samples) from %s", ds.name, ds.num_samples, ds.path)
        ds.waiters.clear()

    def engine_gone(self, e: Engine) -> None:
        """A lost engine will not add the datasets under way: stop waiting for it."""
        for ds in list(self.datasets.entries.values()):
            if e.name in ds.waiting:
                self.dataset_progress(ds, e.name, "")

    # ---- status ----
    def _status(self, client: bytes, req: M.GetStatus, frames: list[Any]) -> None:
        now = time.monotonic()
        engines = [self._engine_status(e, now) for e in self.sup.engines]
        batcher = self.scheduler.batcher
        totals = self.replies.totals
        self.replies.send(client, M.Status(
            request_id=req.request_id, pid=os.getpid(), uptime_s=now - self.started_mono, state=self._state(),
            endpoint=self.cfg.endpoint, engines=engines, queue_queries=batcher.queued_queries,
            queue_pairs=batcher.queued_pairs, inflight_batches=sum(len(e.inflight) for e in self.sup.engines),
            datasets={n: d.num_samples for n, d in self.datasets.entries.items()}, rates=totals.rates(now),
            totals=dict(totals.counts), recent_errors=list(totals.recent_errors),
            model=next((e.model.model_id for e in self.sup.engines if e.role == "active"), ""),
            max_queue_pairs=self.cfg.max_queue_pairs, max_pairs_per_query=self.cfg.max_pairs_per_query))

    def _engine_status(self, e: Engine, now: float) -> M.EngineStatus:
        c = e.counts
        head = e.oldest_batch(now)
        alive = e.serving or e.state is M.EngineState.STARTING
        return M.EngineStatus(
            name=e.name, device=e.device, state=e.state, pid=e.pid,
            gpu_part=e.model.gpu_part if e.kind is M.EngineKind.CUDA else 0.0,
            inflight=len(e.inflight), restarts=c.restarts, batches_done=c.batches_done,
            last_heartbeat_age_s=(now - e.live.last_heard) if alive else None,
            device_memory_bytes=c.device_memory_bytes, last_error=e.last_error,
            hot_lookups=c.hot_lookups, cold_lookups=c.cold_lookups,
            hot_ratio=c.hot_lookups / (c.hot_lookups + c.cold_lookups) if c.hot_lookups + c.cold_lookups else None,
            oldest_batch_s=None if head is None else head[1], model=e.model.model_id, role=str(e.role))
