"""Client request handling for the dispatcher: validation of every request kind and the status reply.

A mixin of `daemon.dispatcher.Dispatcher` (split out to keep each file to one concern): it reads the
dispatcher's config, datasets, batcher and engines, and answers through its `_send` / `_error`.
Every malformed request becomes a typed `DaemonError` that `_handle` turns into an Error reply.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import msgspec
import numpy as np

from daemon import errors as E
from daemon import protocol as P
from daemon.batcher import BY_VALUE_KEY, Batcher, Query
from daemon.config import DaemonConfig
from daemon.datasets import DatasetEntry, open_dataset

log = logging.getLogger("dlrm.dispatcher")


class RequestHandler:
    cfg: DaemonConfig
    datasets: dict[str, DatasetEntry]
    batcher: Batcher
    table_rows: tuple[int, ...] | None
    _rows: np.ndarray | None
    state: str
    sup: Any
    totals: Any
    recent_errors: Any
    started_mono: float
    _rate_marks: Any
    _handlers: dict[type, Any]

    def _send(self, client: bytes, msg: Any, frame: np.ndarray | None = None, owned: bool = False) -> None:
        raise NotImplementedError

    def _error(self, client: bytes, request_id: int, code: str, message: str, kind: str | None = None,
               q: Query | None = None) -> None:
        raise NotImplementedError

    def _reply_result(self, q: Query, preds: np.ndarray, now: float) -> None:
        raise NotImplementedError

    def _handle(self, frames: list[Any]) -> None:
        client = frames[0].bytes
        if len(frames) < 2:
            self._error(client, -1, E.BAD_REQUEST, "empty message (no header frame)")
            return
        size = sum(len(f) for f in frames[1:])
        header = frames[1].buffer
        if size > self.cfg.max_message_bytes:
            self._error(client, P.salvage_request_id(header), E.BAD_REQUEST,
                        f"message of {size} bytes exceeds max_message_bytes={self.cfg.max_message_bytes}")
            return
        try:
            req = P.request_decoder.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # msgspec: bad utf-8
            self._error(client, P.salvage_request_id(header), E.BAD_REQUEST, f"undecodable request header: {exc}")
            return
        if self.state == "draining" and not isinstance(req, P.GetStatus):
            self._error(client, req.request_id, E.SHUTTING_DOWN, "the daemon is shutting down")
            return
        try:
            self._handlers[type(req)](client, req, frames)
        except E.DaemonError as exc:
            kind = "by_ref" if isinstance(req, P.InferByRef) else "by_value" if isinstance(
                req, P.InferByValue) else None
            self._error(client, req.request_id, exc.code, exc.message, kind)
        except Exception as exc:  # a bug must cost one request, not the dispatcher's I/O pass
            log.exception("request %s failed", type(req).__name__)
            self._error(client, req.request_id, E.ENGINE_FAILED,
                        f"internal dispatcher error: {type(exc).__name__}: {exc}")

    @staticmethod
    def _frames(frames: list[Any], n: int, what: str) -> None:
        if len(frames) - 2 != n:
            raise E.BadRequest(f"{what} needs {n} array frame(s), got {len(frames) - 2}")

    @staticmethod
    def _array(frame: Any, dtype: str, want: str, count: int, width: int, what: str) -> np.ndarray:
        if dtype != want:
            raise E.BadRequest(f"{what}: dtype {dtype!r} not accepted, send {want!r}")
        try:
            return P.as_array(frame.buffer, dtype, count, width)
        except ValueError as exc:
            raise E.BadRequest(f"{what}: {exc}") from None

    def _dataset(self, name: str) -> DatasetEntry:
        ds = self.datasets.get(name)
        if ds is None:
            raise E.BadRequest(f"unknown dataset {name!r} (registered: {', '.join(self.datasets) or 'none'})")
        if ds.state != "ready":
            raise E.BadRequest(f"dataset {name!r} is still being registered")
        return ds

    def _deadline(self, now: float, deadline_s: float | None) -> float | None:
        if deadline_s is None:
            return None
        if not deadline_s > 0:
            raise E.Timeout(f"deadline_s={deadline_s} leaves no time to compute")
        return now + deadline_s

    def _infer_by_ref(self, client: bytes, req: P.InferByRef, frames: list[Any]) -> None:
        now = time.monotonic()
        self._frames(frames, 1, "InferByRef")
        ds = self._dataset(req.dataset)
        if req.num_samples < 0:
            raise E.BadRequest(f"num_samples={req.num_samples} is negative")
        ids = self._array(frames[2], req.ids_dtype, P.SAMPLE_ID_DTYPE, req.num_samples, 1, "sample ids")
        starts, counts, pairs = ds.pair_ranges(ids)
        if pairs > self.cfg.max_pairs_per_query:
            raise E.BadRequest(f"query has {pairs} pairs, more than max_pairs_per_query={self.cfg.max_pairs_per_query}")
        q = Query(client, req.request_id, ds.name, req.num_samples, pairs, now,
                  self._deadline(now, req.deadline_s), starts=starts, counts=counts)
        self._submit(q)

    def _infer_by_value(self, client: bytes, req: P.InferByValue, frames: list[Any]) -> None:
        now = time.monotonic()
        self._frames(frames, 2, "InferByValue")
        n = req.num_pairs
        if n < 0 or n > self.cfg.max_pairs_per_query:
            raise E.BadRequest(f"num_pairs={n} outside [0, max_pairs_per_query={self.cfg.max_pairs_per_query}]")
        dense = self._array(frames[2], req.dense_dtype, P.DENSE_DTYPE, n, P.DENSE_FEATURES, "dense")
        sparse = self._array(frames[3], req.sparse_dtype, P.SPARSE_DTYPE, n, P.SPARSE_FEATURES, "sparse")
        if n and not np.isfinite(dense).all():
            raise E.BadRequest("dense features contain NaN or infinity")
        if n and self._rows is not None:
            bad = (sparse < 0) | (sparse >= self._rows)
            if bad.any():
                r, t = (int(v) for v in np.argwhere(bad)[0])
                raise E.BadRequest(f"sparse id {int(sparse[r, t])} of pair {r} table {t} outside [0, {self.table_rows[t]})")
        elif n and int(sparse.min()) < 0:
            raise E.BadRequest("sparse ids must be >= 0")
        q = Query(client, req.request_id, BY_VALUE_KEY, 0, n, now, self._deadline(now, req.deadline_s),
                  dense=dense, sparse=sparse, frames=frames)
        self._submit(q)

    def _submit(self, q: Query) -> None:
        if q.num_pairs == 0:
            q.finished = True
            self._reply_result(q, np.empty(0, np.float32), time.monotonic())
            return
        if self.state != "starting" and not any(e.ready for e in self.sup.engines):
            raise E.EngineFailed("no engine is running (restarting); "
                                 + "; ".join(f"{e.name}: {e.last_error}" for e in self.sup.engines))
        self.batcher.submit(q)

    def _load_samples(self, client: bytes, req: P.LoadSamples | P.UnloadSamples, frames: list[Any]) -> None:
        self._frames(frames, 1, type(req).__name__)
        ds = self._dataset(req.dataset)
        ids = self._array(frames[2], req.ids_dtype, P.SAMPLE_ID_DTYPE, req.num_samples, 1, "sample ids")
        ds.set_loaded(ids, isinstance(req, P.LoadSamples))
        self._send(client, P.Ack(request_id=req.request_id))

    def _register(self, client: bytes, req: P.RegisterDataset, frames: list[Any]) -> None:
        self._frames(frames, 0, "RegisterDataset")
        old = self.datasets.get(req.name)
        if old is not None:
            if os.path.realpath(old.path) != os.path.realpath(req.path):
                raise E.BadRequest(f"dataset {req.name!r} is already registered with path {old.path}")
            if old.state == "ready":
                self._send(client, P.Ack(request_id=req.request_id))
            else:
                old.waiters.append((client, req.request_id))
            return
        if not req.name or not req.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise E.BadRequest(f"dataset name {req.name!r}: use letters, digits, '-', '_', '.'")
        ds = open_dataset(req.name, req.path, self.table_rows)
        ds.state = "registering"
        ds.waiters.append((client, req.request_id))
        self.datasets[req.name] = ds
        for e in self.sup.engines:
            if e.sock is not None and e.state in ("starting", "ready"):
                self.sup.send(e, P.AddDataset(name=ds.name, path=ds.path))
                ds.waiting.add(e.name)
        self._dataset_progress(ds, "")

    def _dataset_progress(self, ds: DatasetEntry, error: str) -> None:
        if error:
            self.datasets.pop(ds.name, None)
            for client, rid in ds.waiters:
                self._error(client, rid, E.BAD_REQUEST, f"dataset {ds.name!r}: an engine could not add it: {error}")
            ds.waiters.clear()
        elif not ds.waiting and ds.state != "ready":
            ds.state = "ready"
            log.info("dataset %s registered (%d samples) from %s", ds.name, ds.num_samples, ds.path)
            for client, rid in ds.waiters:
                self._send(client, P.Ack(request_id=rid))
            ds.waiters.clear()

    def engine_spec_datasets(self) -> dict[str, str]:
        return {name: ds.path for name, ds in self.datasets.items()}

    def _status(self, client: bytes, req: P.GetStatus, frames: list[Any]) -> None:
        now = time.monotonic()
        engines = [P.EngineStatus(
            name=e.name, device=e.device, state=e.state, pid=e.pid,
            gpu_part=self.cfg.embedding_weights_on_gpu_part if e.device.startswith("cuda") else 0.0,
            inflight=len(e.inflight), restarts=e.restarts, batches_done=e.batches_done,
            last_heartbeat_age_s=(now - e.last_heartbeat) if e.state in ("ready", "starting") else None,
            device_memory_bytes=e.device_memory_bytes, last_error=e.last_error,
            hot_lookups=e.hot_lookups, cold_lookups=e.cold_lookups,
            hot_ratio=e.hot_lookups / (e.hot_lookups + e.cold_lookups) if e.hot_lookups + e.cold_lookups else None,
            oldest_batch_s=None if (head := e.oldest_batch(now)) is None else head[1])
            for e in self.sup.engines]
        rates: dict[str, float] = {}
        t = self.totals
        if self._rate_marks:
            t0, q0, s0, p0, b0 = self._rate_marks[0]
            dt = max(1e-9, now - t0)
            rates = {"queries_per_s": (t["queries"] - q0) / dt, "samples_per_s": (t["samples"] - s0) / dt,
                     "pairs_per_s": (t["pairs"] - p0) / dt, "batches_per_s": (t["batches"] - b0) / dt}
        self._send(client, P.Status(
            request_id=req.request_id, pid=os.getpid(), uptime_s=now - self.started_mono, state=self.state,
            endpoint=self.cfg.endpoint, engines=engines, queue_queries=self.batcher.queued_queries,
            queue_pairs=self.batcher.queued_pairs, inflight_batches=sum(len(e.inflight) for e in self.sup.engines),
            datasets={n: d.num_samples for n, d in self.datasets.items()}, rates=rates,
            totals=dict(self.totals), recent_errors=list(self.recent_errors)))
