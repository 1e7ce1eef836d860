"""The dispatcher: one asyncio (uvloop) process with a ZeroMQ ROUTER socket for clients.

Everything runs on the event loop thread; ZeroMQ sockets are watched through their FDs
(edge-triggered, so after every pass the sockets' EVENTS are re-checked). Requests are validated and
queued in the batcher; `_pump` hands batches to free engine slots; BatchDone splits predictions per
query and replies at once (copying straight out of the shared-memory slot into the reply frame).
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon import errors as E
from daemon import exitcodes
from daemon import protocol as P
from daemon.batcher import Batch, Batcher, Query, fill_slot
from daemon.config import DaemonConfig
from daemon.datasets import DatasetEntry, model_table_rows, open_dataset
from daemon.memory import IdleTrimmer
from daemon.peers import PeerWatch
from daemon.requests import RequestHandler
from daemon.security import maybe_server_curve, remove_stale_sockets
from daemon.shm import remove_stale, run_prefix
from daemon.supervisor import Engine, Supervisor

log = logging.getLogger("dlrm.dispatcher")
_DRAIN_ROUTER_MAX = 512
_TICK_S = 0.05
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_PASS_BUDGET_S = 0.005
_ZERO_COPY_MIN = 1 << 16


def _keep_large_allocations() -> None:
    """Serve reply buffers (up to 64 MiB) from the malloc heap instead of fresh mmaps: a fresh
    mapping page-faults on every reply, which costs more than the copy itself (glibc only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class StartupError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Dispatcher(RequestHandler):
    def __init__(self, config: DaemonConfig, metrics: Any = None, notifier: Any = None) -> None:
        self.cfg = config
        self.metrics = metrics
        self.notifier = notifier
        self.batcher = Batcher(config.max_batch_pairs, config.max_queue_pairs, config.max_queue_delay_s)
        self.datasets: dict[str, DatasetEntry] = {}
        self.table_rows = model_table_rows(config.model)
        self._rows = None if self.table_rows is None else np.asarray(self.table_rows, np.int64)
        self.state = "starting"
        self.started_mono = time.monotonic()
        self.totals: collections.Counter[str] = collections.Counter()
        self.recent_errors: collections.deque[str] = collections.deque(maxlen=20)
        self._trimmer = IdleTrimmer()  # returns heap freed after bursts to the OS (daemon/memory.py)
        self._rate_marks: collections.deque[tuple[float, int, int, int, int]] = collections.deque(maxlen=11)
        self._io_scheduled = False
        self._closed = False
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = 0.0
        self._signal: int | None = None
        self._last_watchdog = 0.0
        self._handlers = {
            P.InferByRef: self._infer_by_ref, P.InferByValue: self._infer_by_value,
            P.LoadSamples: self._load_samples, P.UnloadSamples: self._load_samples,
            P.RegisterDataset: self._register, P.GetStatus: self._status,
        }

    # ================= lifecycle =================
    async def run(self) -> int:
        _keep_large_allocations()
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._started = self.loop.create_future()
        rt = Path(self.cfg.runtime_dir)
        rt.mkdir(mode=0o700, parents=True, exist_ok=True)
        if rt.stat().st_uid == os.getuid():
            os.chmod(rt, 0o700)  # sockets inside are reachable by whoever can enter the directory
        self._lock_fd = os.open(rt / "dlrm-daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(exitcodes.RUNTIME_FAILURE,
                               f"another dlrm-daemon is running with runtime_dir {rt}") from None
        remove_stale()
        remove_stale_sockets(rt)
        for name, path in self.cfg.datasets.items():
            try:
                self.datasets[name] = open_dataset(name, path, self.table_rows)
            except E.BadRequest as exc:
                raise StartupError(exitcodes.CONFIG_ERROR, f"config key 'datasets': {exc.message}") from None
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.SNDHWM, 1_000_000)
        self.router.setsockopt(zmq.RCVHWM, 1_000_000)
        # Replies are MBs per batch: bigger kernel socket buffers mean fewer wakeups per reply
        # (the kernel caps them at net.core.wmem_max / rmem_max).
        self.router.setsockopt(zmq.SNDBUF, 8 << 20)
        self.router.setsockopt(zmq.RCVBUF, 8 << 20)
        # Hard per-frame bound (the peer is dropped beyond it); max_message_bytes itself is checked
        # per message below so that a too-large request gets a typed BAD_REQUEST.
        self.router.setsockopt(zmq.MAXMSGSIZE, 4 * self.cfg.max_message_bytes)
        self._curve = maybe_server_curve(self.ctx, self.cfg)  # None unless CURVE keys are configured
        if self._curve is not None:
            self._curve.apply(self.router)
        try:
            self.router.bind(self.cfg.endpoint)
        except zmq.ZMQError as exc:
            raise StartupError(exitcodes.RUNTIME_FAILURE, f"cannot bind {self.cfg.endpoint}: {exc}") from None
        self.peers = PeerWatch(self.router)  # drops queued work of clients that disconnect
        self.sup = Supervisor(self.cfg, self.ctx, self.loop, self, run_prefix())
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        self.loop.add_reader(self.router.getsockopt(zmq.FD), self._on_io)
        self._notify("status", f"loading model on {len(self.sup.engines)} engine(s)")
        for e in self.sup.engines:
            self.sup.start(e)
        tick = self.loop.create_task(self._ticker())
        try:
            await asyncio.wait([self._started, self.loop.create_task(self._stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
            if self._started.done() and not any(e.ready for e in self.sup.engines):
                reasons = "; ".join(f"{e.name} ({e.device}): {e.last_error}" for e in self.sup.engines)
                log.error("no engine could start: %s", reasons)
                self._fail_queued(E.ENGINE_FAILED, "no engine could start")
                return exitcodes.ENGINE_LOAD_FAILURE
            if not self._stop.is_set():
                self.state = "serving"
                log.info("serving on %s with engines %s", self.cfg.endpoint,
                         ", ".join(f"{e.name}={e.state}" for e in self.sup.engines))
                self._notify("ready")
                self._notify("status", "serving")
                await self._stop.wait()
            await self._drain()
            return exitcodes.OK
        finally:
            tick.cancel()
            self._shutdown()

    def _on_signal(self, sig: int) -> None:
        # Only record it; the main coroutine does the work.
        self._signal = sig
        self._stop.set()

    async def _drain(self) -> None:
        self.state = "draining"
        log.info("signal %s: draining (up to %.1f s)", self._signal, self.cfg.drain_timeout_s)
        self._notify("stopping")
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while time.monotonic() < deadline and any(e.ready for e in self.sup.engines) and (
                self.batcher.pending() or any(e.inflight for e in self.sup.engines)):
            self._pump()
            await asyncio.sleep(0.005)
        self._fail_queued(E.SHUTTING_DOWN, "daemon stopped before this request was computed")
        for e in self.sup.engines:
            for b, _, _, _ in list(e.inflight.values()):
                self._fail_batch(b, E.SHUTTING_DOWN, "daemon stopped before this request was computed")
            e.inflight.clear()

    def _shutdown(self) -> None:
        self._closed = True
        if hasattr(self, "sup"):
            self.sup.stop_all()
        if hasattr(self, "router"):
            self.loop.remove_reader(self.router.getsockopt(zmq.FD))
            if hasattr(self, "peers"):
                self.peers.close()
            self.router.close(linger=1000)
            if getattr(self, "_curve", None) is not None:
                self._curve.close()  # its ZAP socket lives on this context: close it before term
            self.ctx.term()
            if self.cfg.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.cfg.endpoint[6:])
                except OSError:
                    pass
        if hasattr(self, "_lock_fd"):
            os.close(self._lock_fd)

    async def _ticker(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_S)
            now = time.monotonic()
            # A tick that comes late means this loop was stalled (a long pass, GC, no core free):
            # engines are not blamed for the time in which the dispatcher could not listen.
            late = now - last - _TICK_S
            last = now
            if late > self.cfg.heartbeat_timeout_s / 2:
                log.warning("dispatcher loop stalled for %.2f s (not counted against engines)", late)
            self.sup.check_heartbeats(now, stalled_s=late if late > _TICK_S else 0.0)
            self._trimmer.tick(now, not self.batcher.pending() and not any(e.inflight for e in self.sup.engines))
            if not self._rate_marks or now - self._rate_marks[-1][0] >= 1.0:
                t = self.totals
                self._rate_marks.append((now, t["queries"], t["samples"], t["pairs"], t["batches"]))
            wd = self.notifier.watchdog_interval_s() if self.notifier is not None else None
            # Not before READY=1: the ticker can run between the last engine's EngineReady and
            # the coroutine that announces readiness.
            if (wd and self.state != "starting" and now - self._last_watchdog >= wd / 2
                    and self.sup.all_heartbeats_recent(now)):
                self._notify("watchdog")
                self._last_watchdog = now
            if self.metrics is not None:
                self.metrics.set_queue_depth(self.batcher.queued_queries, self.batcher.queued_pairs)
            # Also a safety net for ZeroMQ's edge-like FDs: a full I/O pass every tick.
            self.after_io()

    def _notify(self, what: str, *args: Any) -> None:
        if self.notifier is not None:
            try:
                getattr(self.notifier, what)(*args)
            except OSError as exc:
                log.warning("systemd notify %s failed: %s", what, exc)

    # ================= I/O =================
    def _on_io(self) -> None:
        """One pass over every socket; all readiness callbacks funnel here (one pump per pass)."""
        self._io_scheduled = False
        if self._closed:
            return
        # Engines first: their BatchDone frees slots and their heartbeats must not wait behind a
        # burst of client requests.
        for e in self.sup.engines:
            self.sup.drain(e)
        gone = self.peers.take_gone()
        if gone:
            self.totals["cancelled_disconnected"] += self.batcher.drop_clients(set(gone))
        recv = self.router.recv
        t_end = time.monotonic() + _PASS_BUDGET_S
        for i in range(_DRAIN_ROUTER_MAX):
            try:
                frames = [recv(_NOBLOCK, copy=False)]
            except zmq.Again:
                break
            while frames[-1].more:
                frames.append(recv(_NOBLOCK, copy=False))
            self.peers.note(frames)
            self._handle(frames)
            if i & 15 == 15 and time.monotonic() > t_end:
                break  # let engine messages and timers in (large by-value requests)
        for e in self.sup.engines:
            self.sup.drain(e)
        self._pump()
        # ZeroMQ FDs are edge-like: re-check after our own sends, which may have consumed the edge.
        if self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN or self.sup.pending_input():
            self.after_io()

    def after_io(self) -> None:
        if not self._io_scheduled:
            self._io_scheduled = True
            self.loop.call_soon(self._on_io)

    def _send(self, client: bytes, msg: Any, frame: np.ndarray | None = None, owned: bool = False) -> None:
        # Plain int flags: pyzmq's enum arithmetic costs more than the send on this path.
        send = self.router.send
        try:
            send(client, _SNDMORE)
            if frame is None:
                send(P.encode(msg))
            else:
                send(P.encode(msg), _SNDMORE)
                if frame.nbytes < _ZERO_COPY_MIN:
                    send(frame, 0)
                else:
                    # The slot is reused at once, so hand ZeroMQ a private copy without copying
                    # again (pyzmq's copy=True path is several times slower than np.copy here).
                    send(frame.copy() if not owned else frame, 0, copy=False)
        except zmq.ZMQError as exc:
            log.warning("reply to a client failed: %s", exc)

    def _error(self, client: bytes, request_id: int, code: str, message: str, kind: str | None = None,
               q: Query | None = None) -> None:
        self._send(client, P.Error(request_id=request_id, code=code, message=message))
        self.totals[code] += 1
        self.recent_errors.append(f"{time.strftime('%H:%M:%S')} {code} request {request_id}: {message}")
        if self.metrics is not None:
            self.metrics.observe_error(code)
            if q is not None:
                self.metrics.observe_query(q.kind, code, q.num_samples, q.num_pairs, time.monotonic() - q.arrival)
            elif kind is not None:
                self.metrics.observe_query(kind, code, 0, 0, 0.0)

    # ================= batches =================
    def _pump(self) -> None:
        now = time.monotonic()
        for q in self.batcher.expire(now):
            self._error(q.client, q.request_id, E.TIMEOUT, "deadline passed while queued", q=q)
        while self.batcher.pending():
            best: Engine | None = None
            for e in self.sup.engines:
                if e.ready and e.free_slots and (best is None or len(e.inflight) < len(best.inflight)):
                    best = e
            if best is None or not self.batcher.should_close(now, engine_idle=not best.inflight):
                break
            b = self.batcher.take(now)
            if b is None:
                break
            self._dispatch(best, b, now)
        self._arm_wakeup(now)

    def _dispatch(self, e: Engine, b: Batch, now: float) -> None:
        slot = e.free_slots.pop()
        t0 = time.perf_counter()
        ranges = fill_slot(b, e.region.slots[slot])
        assembly = time.perf_counter() - t0
        e.inflight[b.batch_id] = (b, slot, now, assembly)
        self.sup.send(e, P.BatchReady(batch_id=b.batch_id, slot=slot, kind="ref" if b.key else "value",
                                      dataset=b.key, num_ranges=ranges, num_pairs=b.num_pairs))
        if self.metrics is not None:
            self.metrics.set_inflight(e.name, len(e.inflight))

    def _arm_wakeup(self, now: float) -> None:
        t = self.batcher.next_wakeup()
        if t is None:
            return
        if self._wake is not None and self._wake_at <= t + 1e-4:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = t
        # uvloop timers have millisecond resolution and may fire early: aim 1 ms late, never spin.
        self._wake = self.loop.call_later(max(0.0, t - now) + 0.001, self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wake = None
        self.after_io()

    def on_control(self, e: Engine, msg: Any) -> None:
        if isinstance(msg, P.BatchDone):
            self._batch_done(e, msg)
        elif isinstance(msg, P.Heartbeat):
            pass
        elif isinstance(msg, P.BatchFailed):
            entry = e.inflight.pop(msg.batch_id, None)
            if entry is not None:
                e.free_slots.append(entry[1])
                self._fail_batch(entry[0], E.ENGINE_FAILED, f"engine {e.name} failed the batch: {msg.message}")
        elif isinstance(msg, P.EngineReady):
            e.state = "ready"
            e.ready_at = time.monotonic()
            e.ever_ready = True
            e.device_memory_bytes = msg.device_memory_bytes
            e.work_tids = list(msg.work_tids)
            log.info("engine %s ready (pid %d, %d bytes of device memory)", e.name, msg.pid, msg.device_memory_bytes)
            if self.metrics is not None:
                self.metrics.set_engine_up(e.name, True)
                self.metrics.set_device_memory(e.name, msg.device_memory_bytes)
            self._check_started()
        elif isinstance(msg, P.EngineFailed):
            e.load_failed = True
            e.last_error = msg.message
            log.error("engine %s (%s) cannot load: %s", e.name, e.device, msg.message)
        elif isinstance(msg, P.DatasetAdded):
            ds = self.datasets.get(msg.name)
            if ds is not None and ds.state == "registering":
                ds.waiting.discard(e.name)
                self._dataset_progress(ds, f"{e.name}: {msg.error}" if msg.error else "")

    def _batch_done(self, e: Engine, msg: P.BatchDone) -> None:
        entry = e.inflight.pop(msg.batch_id, None)
        if entry is None:
            return
        b, slot, sent, assembly = entry
        now = time.monotonic()
        e.batches_done += 1
        e.hot_lookups += msg.hot_lookups
        e.cold_lookups += msg.cold_lookups
        self.totals["batches"] += 1
        preds = e.region.slots[slot].out[:b.num_pairs]
        by_client: dict[bytes, list[tuple[Query, np.ndarray, int]]] = {}
        for item in Batcher.complete(b, preds):
            q = item[0]
            if q.deadline is not None and now > q.deadline:
                self._error(q.client, q.request_id, E.TIMEOUT, "deadline passed before the result was ready", q=q)
            else:
                by_client.setdefault(q.client, []).append(item)
        t0 = time.perf_counter()
        for client, items in by_client.items():
            if len(items) == 1:
                self._reply_result(items[0][0], items[0][1], now)
            else:
                self._reply_results(client, items, preds, now)
        e.free_slots.append(slot)
        if self.metrics is not None:
            self.metrics.observe_reply(time.perf_counter() - t0)
            self.metrics.observe_batch(e.name, b.num_pairs, sent - b.oldest_arrival, assembly, msg.compute_s,
                                       msg.hot_lookups, msg.cold_lookups)
            self.metrics.set_inflight(e.name, len(e.inflight))

    def _reply_result(self, q: Query, preds: np.ndarray, now: float) -> None:
        self._send(q.client, P.InferResult(request_id=q.request_id, num_pairs=q.num_pairs), preds,
                   owned=preds is q.result)
        q.frames = q.dense = q.sparse = q.result = None
        t = self.totals
        t["queries"] += 1
        t["samples"] += q.num_samples
        t["pairs"] += q.num_pairs
        if self.metrics is not None:
            self.metrics.observe_query(q.kind, "ok", q.num_samples, q.num_pairs, now - q.arrival)

    def _reply_results(self, client: bytes, items: list[tuple[Query, np.ndarray, int]], preds: np.ndarray,
                       now: float) -> None:
        """One InferResults message for several queries of one client finished by the same batch."""
        qs = [it[0] for it in items]
        adjacent = items[0][2] >= 0
        end = items[0][2]
        for q, _, pos in items:  # per query, not per pair
            if pos != end:
                adjacent = False
                break
            end = pos + q.num_pairs
        if adjacent:
            frame: np.ndarray = preds[items[0][2]:end]  # adjacent in the slot: no gather
        else:
            frame = np.concatenate([it[1] for it in items])
        self._send(client, P.InferResults(request_ids=[q.request_id for q in qs],
                                          num_pairs=[q.num_pairs for q in qs]), frame, owned=not adjacent)
        t = self.totals
        t["queries"] += len(qs)
        for q in qs:
            t["samples"] += q.num_samples
            t["pairs"] += q.num_pairs
            q.frames = q.dense = q.sparse = q.result = None
            if self.metrics is not None:
                self.metrics.observe_query(q.kind, "ok", q.num_samples, q.num_pairs, now - q.arrival)

    def _fail_batch(self, b: Batch, code: str, message: str) -> None:
        for q in self.batcher.fail(b):
            self._error(q.client, q.request_id, code, message, q=q)

    def _fail_queued(self, code: str, message: str) -> None:
        for q in self.batcher.drain_all():
            self._error(q.client, q.request_id, code, message, q=q)

    def on_engine_lost(self, e: Engine, reason: str) -> None:
        others = any(o.ready for o in self.sup.engines if o is not e)
        for b, _, _, _ in list(e.inflight.values()):
            if b.attempts < 2 and others and not self.sup.stopping:
                self.batcher.retry(b)
            else:
                self._fail_batch(b, E.ENGINE_FAILED, f"engine {e.name} was lost while computing: {reason}")
        e.inflight.clear()
        e.free_slots = []
        if not e.ever_ready:
            e.load_failed = True
        for ds in list(self.datasets.values()):
            if e.name in ds.waiting:
                ds.waiting.discard(e.name)
                self._dataset_progress(ds, "")
        if self.metrics is not None:
            self.metrics.set_engine_up(e.name, False)
            self.metrics.set_inflight(e.name, 0)
            if not self.sup.stopping:
                self.metrics.engine_restarted(e.name)
        if not others and self.state == "serving":
            self._fail_queued(E.ENGINE_FAILED, f"every engine is down (last: {e.name}: {reason})")
        self._check_started()
        if hasattr(self, "loop"):
            self.loop.call_soon(self.after_io)

    def _check_started(self) -> None:
        if not self._started.done() and all(e.ready or e.load_failed for e in self.sup.engines):
            self._started.set_result(True)
