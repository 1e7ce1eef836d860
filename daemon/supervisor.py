"""Engine supervision: start engine processes, watch heartbeats and exits, restart with backoff.

The dispatcher owns the event loop; this module owns each engine's process, control socket, shared-
memory region and lifecycle (daemon/engine_state.py: the supervisor is its only writer), and tells the
dispatcher (through `EngineEvents`) what happened. An engine is declared lost when its process exits
(seen at once through its pidfd) or, once serving, when it is hung (it is then killed). Hung means not
making progress, never merely slow:
  * silent: nothing (heartbeat or any other message) came for `heartbeat_timeout_s`, after draining
    its socket, while the dispatcher itself was running (time the dispatcher's own loop stalled is not
    counted against the engine), and the process made no CPU or run-queue progress over the last half
    timeout (a process that computes or waits for a core while its heartbeats are late is starved,
    e.g. of the GIL or of cores, not hung, however long that lasts);
  * stuck: its oldest in-flight batch has run for `batch_timeout_s` and the threads that compute
    batches (named by the engine in EngineReady) made no CPU or run-queue progress for
    `heartbeat_timeout_s` (a backend call that blocks forever while the process still heartbeats). A
    batch that computes longer than `batch_timeout_s` on a loaded machine is slow, not hung.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import zmq

from daemon.config import DaemonConfig
from daemon.engine import Engine, EngineLiveness, EngineModel, EngineRole, InFlightBatch, model_of
from daemon.engine_process import EngineProcess, describe_exit, process_progress_ns
from daemon.engine_state import EngineEvent
from daemon.zmq_fd import fd_of, has_input
from wire import messages as M
from wire.shm import Region

log = logging.getLogger("dlrm.supervisor")
_MAX_BACKOFF_S = 60.0
_STABLE_S = 30.0  # a run this long resets the backoff


class EngineEvents(Protocol):
    """What the dispatcher does when something happens to an engine."""

    def on_engine_ready(self, engine: Engine) -> None: ...
    def on_engine_lost(self, engine: Engine, reason: str, batches: list[InFlightBatch]) -> None: ...
    def on_batch_done(self, engine: Engine, entry: InFlightBatch, msg: M.BatchDone) -> None: ...
    def on_batch_failed(self, engine: Engine, entry: InFlightBatch, msg: M.BatchFailed) -> None: ...
    def on_dataset_added(self, engine: Engine, msg: M.DatasetAdded) -> None: ...
    def on_engine_released(self, engine: Engine, batches: list[InFlightBatch]) -> None: ...
    def on_canary_done(self, engine: Engine, msg: M.CanaryDone) -> None: ...
    def datasets_for_new_engine(self) -> dict[str, str]: ...
    def after_io(self) -> None: ...


class Supervisor:
    def __init__(self, config: DaemonConfig, ctx: zmq.Context[Any], loop: asyncio.AbstractEventLoop,
                 events: EngineEvents, shm_prefix: str) -> None:
        self.config = config
        self.ctx = ctx
        self.loop = loop
        self.events = events
        self.engines: list[Engine] = []
        self.stopping = False
        self.shm_prefix = shm_prefix
        self._next_index = 0
        model = model_of(config)
        for name, dev in zip(config.engine_names, config.engines):
            self.add_engine(name, dev, model, EngineRole.ACTIVE)
        self.add_standbys()

    def add_standbys(self) -> list[Engine]:
        """With standby_engines: a spare (not started) for each device that has active engines and no
        spare, with that device's model; the ones added."""
        if not self.config.standby_engines:
            return []
        added = []
        for e in list(self.engines):
            if e.role is EngineRole.ACTIVE and not any(
                    s.role is EngineRole.STANDBY and s.device == e.device for s in self.engines):
                added.append(self.add_engine(f"{e.name.split('.')[0]}.standby", e.device, e.model,
                                             EngineRole.STANDBY))
        return added

    def standby_for(self, e: Engine) -> Engine | None:
        """A serving spare on `e`'s device with `e`'s model, if there is one."""
        return next((s for s in self.engines if s.role is EngineRole.STANDBY and s.device == e.device
                     and s.model == e.model and s.serving), None)

    def add_engine(self, name: str, device: str, model: EngineModel, role: EngineRole) -> Engine:
        """A new engine (not started) with its own shared-memory region; `start` runs it."""
        i = self._next_index
        self._next_index += 1
        path = Path("/dev/shm") / f"{self.shm_prefix}{i}"
        region = Region(path, self.config.inflight_batches, self.config.max_batch_pairs, owner=True)
        e = Engine(i, name, device, region, model, role)
        self.engines.append(e)
        return e

    # ---- views ----
    def any_serving(self, exclude: Engine | None = None) -> bool:
        """An active engine serves (one that takes new batches)."""
        return any(e.takes_batches for e in self.engines if e is not exclude)

    def all_settled(self) -> bool:
        """Every engine's first start ended (spares aside: they start once the active engines serve)."""
        return all(e.settled for e in self.engines if e.role is not EngineRole.STANDBY)

    def start_standbys(self) -> None:
        """Start the spares not started yet, once every active engine serves: loading beside an active
        engine that is still loading could take the device memory it needs (the spare is the one that
        may not fit)."""
        active = [e for e in self.engines if e.role is EngineRole.ACTIVE]
        if not active or not all(e.serving for e in active):
            return
        for e in self.engines:
            if e.role is EngineRole.STANDBY and e.proc is None and e.restart_handle is None and not e.retired:
                self.start(e)

    def loading_progress(self) -> int | None:
        """CPU and run-queue time (ns) of the engine processes still loading, or None when none is
        (or none can be read): growing while a load computes, reads or pins memory."""
        marks = [process_progress_ns(e.pid) for e in self.engines
                 if e.state is M.EngineState.STARTING and e.pid]
        known = [m for m in marks if m is not None]
        return sum(known) if known else None

    def start_failed(self) -> bool:
        """Every engine's first start ended and none became ready: the daemon cannot serve."""
        return self.all_settled() and not any(e.ever_ready for e in self.engines if e.role is not EngineRole.STANDBY)

    # ---- lifecycle ----
    def start(self, e: Engine) -> None:
        e.restart_handle = None
        if self.stopping:
            return
        if e.lifecycle.can(EngineEvent.RESTART_DUE):
            e.lifecycle.apply(EngineEvent.RESTART_DUE)
        try:
            self._spawn(e)
        except (OSError, zmq.ZMQError) as exc:  # the process or its socket could not be made: try later
            log.error("engine %s could not be started: %s", e.name, exc)
            e.last_error = f"start failed: {exc}"
            self._detach(e)
            e.lifecycle.apply(EngineEvent.SPAWN_FAILED)
            e.settled = True
            self.events.on_engine_lost(e, e.last_error, [])
            if not self.start_failed():
                self._schedule_restart(e, ran_s=0.0, was_serving=False)

    def _spawn(self, e: Engine) -> None:
        e.generation += 1
        e.endpoint = f"ipc://{self.config.runtime_dir}/engine-{e.index:02d}-{e.generation:06d}.sock"
        sock = self.ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(e.endpoint)
        e.sock = sock
        spec = M.EngineSpec(
            name=e.name, device=e.device, artifact=e.model.artifact,
            gpu_part=e.model.gpu_part, control_endpoint=e.endpoint,
            shm_path=str(e.region.path), slots=self.config.inflight_batches,
            max_batch_pairs=self.config.max_batch_pairs,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            datasets=self.events.datasets_for_new_engine(), parent_pid=os.getpid(),
            gpu_mlp_precision=e.model.gpu_mlp_precision, log_level=self.config.log_level.upper(),
            host_rows=self.config.host_rows, cold_row_gather=self.config.cold_row_gather)
        e.proc = EngineProcess(spec)
        if e.lifecycle.state is not M.EngineState.STARTING:
            e.lifecycle.apply(EngineEvent.SPAWN)
        e.started_at = time.monotonic()
        e.load_error = ""
        e.live = EngineLiveness(last_heard=e.started_at)
        e.free_slots = list(range(self.config.inflight_batches))
        self.loop.add_reader(fd_of(sock), self._readable, e, e.generation)
        if e.proc.pidfd is not None:
            self.loop.add_reader(e.proc.pidfd, self._exited, e, e.generation)
        log.info("engine %s (%s) starting, pid %d", e.name, e.device, e.proc.pid)

    def _detach(self, e: Engine) -> None:
        if e.sock is not None:
            self.loop.remove_reader(fd_of(e.sock))
            e.sock.close(0)
            e.sock = None
            if e.endpoint.startswith("ipc://"):
                try:
                    os.unlink(e.endpoint[6:])
                except OSError:
                    pass
        if e.proc is not None and e.proc.pidfd is not None:
            self.loop.remove_reader(e.proc.pidfd)

    def lose(self, e: Engine, reason: str, hung: bool = False) -> None:
        """The engine's process is gone or hung: kill it, tell the dispatcher, schedule a restart
        (none for a retired engine, which is released, or a reload's candidate, whose reload fails)."""
        if e.sock is None:  # already lost (or stopped): its process was reaped then
            return
        if e.retired:
            self._release(e, reason)
            return
        was_serving = e.serving
        if e.load_error:  # the engine said why before it exited: that is the cause, not the exit code
            reason = f"cannot load: {e.load_error} ({reason})"
        log.error("engine %s lost: %s", e.name, reason)
        e.last_error = reason
        self._detach(e)
        if hung and e.lifecycle.can(EngineEvent.HUNG):
            e.lifecycle.apply(EngineEvent.HUNG)
        if e.proc is not None:
            e.proc.kill()
            e.proc.wait(2.0)
            e.proc.close()
        e.lifecycle.apply(EngineEvent.EXIT)
        if not e.ever_ready:
            e.settled = True
        batches = list(e.inflight.values())
        e.inflight.clear()
        e.free_slots = []
        spare = self.standby_for(e) if e.role is EngineRole.ACTIVE and not self.stopping else None
        if spare is not None:  # before the dispatcher hears of the loss: its batches are retried on the spare
            spare.role, e.role = EngineRole.ACTIVE, EngineRole.STANDBY
            log.warning("engine %s lost; standby %s serves in its place, %s restarts as the standby",
                        e.name, spare.name, e.name)
        self.events.on_engine_lost(e, reason, batches)
        if self.stopping or self.start_failed() or e.role is EngineRole.CANDIDATE:
            return  # (after a failed start the daemon exits; a failed candidate fails its reload)
        ran = time.monotonic() - (e.ready_at if was_serving else e.started_at)
        e.counts.restarts += 1
        self._schedule_restart(e, ran, was_serving)

    def retire(self, e: Engine, grace_s: float = 10.0) -> None:
        """Stop an engine for good (a replaced model's once drained, or a failed reload's candidate):
        Shutdown, and at its exit (killed after `grace_s`) its process, socket and shared memory are
        released and it leaves `engines`."""
        e.retired = True
        if e.restart_handle is not None:
            e.restart_handle.cancel()
            e.restart_handle = None
        if e.sock is None or e.proc is None or not e.proc.alive():
            self._release(e, "retired")
            return
        self.send(e, M.Shutdown())
        self.loop.call_later(grace_s, self._kill_if_still_up, e, e.generation, grace_s)

    def _kill_if_still_up(self, e: Engine, generation: int, grace_s: float) -> None:
        if e.generation == generation and e.sock is not None:
            self.lose(e, f"did not exit within {grace_s:g} s of Shutdown")

    def _release(self, e: Engine, reason: str) -> None:
        self._detach(e)
        if e.proc is not None:
            if e.proc.wait(0.5) is None:
                e.proc.kill()
                e.proc.wait(2.0)
            e.proc.close()
        batches = list(e.inflight.values())  # none when retired drained; a candidate holds none
        e.inflight.clear()
        e.free_slots = []
        if e.lifecycle.can(EngineEvent.STOP):
            e.lifecycle.apply(EngineEvent.STOP)
        e.region.close()
        if e in self.engines:
            self.engines.remove(e)
        log.info("engine %s (%s, model %s) released: %s", e.name, e.device, e.model.model_id, reason)
        self.events.on_engine_released(e, batches)

    def _schedule_restart(self, e: Engine, ran_s: float, was_serving: bool) -> None:
        e.failures_in_row = 1 if (was_serving and ran_s > _STABLE_S) else e.failures_in_row + 1
        delay = min(_MAX_BACKOFF_S, self.config.restart_backoff_s * 2 ** (e.failures_in_row - 1))
        log.info("engine %s restarts in %.1f s", e.name, delay)
        e.restart_handle = self.loop.call_later(delay, self.start, e)

    def _exited(self, e: Engine, generation: int) -> None:
        if generation == e.generation and e.proc is not None:
            self.lose(e, f"engine process {e.proc.pid} {describe_exit(e.proc.wait(1.0))}")

    def poll_exits(self) -> None:
        """Where there is no pidfd: notice exited engine processes (called every tick)."""
        for e in list(self.engines):
            if e.proc is not None and e.proc.pidfd is None and e.sock is not None and not e.proc.alive():
                self._exited(e, e.generation)

    # ---- liveness ----
    def check_liveness(self, now: float, stalled_s: float = 0.0) -> None:
        """Declare hung engines lost. `stalled_s`: how long the dispatcher's own loop was late for
        this check; an engine is not blamed for time in which the dispatcher could not listen."""
        timeout = self.config.heartbeat_timeout_s
        for e in list(self.engines):  # lose() may release a retired engine
            if not e.serving:
                continue
            live = e.live
            if stalled_s > 0.0:
                live.last_heard = min(now, live.last_heard + stalled_s)
            head = e.oldest_batch(now)
            if head is not None and head[1] > self.config.batch_timeout_s:
                self.drain(e)  # its BatchDone may be waiting unread
                now = time.monotonic()
                head = e.oldest_batch(now) if e.serving else None
                if head is not None and head[1] > self.config.batch_timeout_s and not self._computing(e, now):
                    self.lose(e, f"batch {head[0].batch_id} ({head[0].num_pairs} pairs) running for "
                                 f"{head[1]:.2f} s, more than batch_timeout_s={self.config.batch_timeout_s}, "
                                 f"with no CPU or run-queue progress of its threads for {timeout:g} s (hung)",
                              hung=True)
                    continue
            elif live.batch_mark is not None:
                live.batch_mark = None
                live.slow_since = 0.0
            silent = now - live.last_heard
            if silent <= timeout / 2:
                live.cpu_mark = None
                live.starved_since = 0.0
                continue
            if live.cpu_mark is None:  # half the timeout silent: note its progress to compare later
                ticks = process_progress_ns(e.pid) if e.pid else None
                live.cpu_mark = None if ticks is None else (now, ticks)
            if silent <= timeout:
                continue
            self.drain(e)  # a busy dispatcher may not have read the engine's messages yet
            now = time.monotonic()
            silent = now - live.last_heard
            if not e.serving or silent <= timeout or self._starved(e, now):
                continue
            sent = f"{now - live.last_beat_sent:.2f} s ago" if live.last_beat_sent else "never"
            self.lose(e, f"no heartbeat for {silent:.2f} s (hung: last heartbeat sent {sent}, "
                         f"no CPU or run-queue progress)", hung=True)

    def _starved(self, e: Engine, now: float) -> bool:
        """Silent past the timeout, but its process computed or waited for a core over the last half
        timeout: late (short of the GIL or of cores), not hung."""
        live = e.live
        ticks = process_progress_ns(e.pid) if e.pid else None
        if ticks is None or live.cpu_mark is None:
            return False
        t0, k0 = live.cpu_mark
        if ticks == k0:
            return False  # neither ran nor waited to run for half a timeout: blocked for good
        if now - t0 >= self.config.heartbeat_timeout_s / 2:
            live.cpu_mark = (now, ticks)  # next window
        if not live.starved_since:
            live.starved_since = now
            e.lifecycle.apply(EngineEvent.SILENT)
            log.warning("engine %s: no message for %.2f s, but its process is running (%.1f ms of CPU "
                        "or run-queue wait in %.2f s): starved, not hung", e.name, now - live.last_heard,
                        (ticks - k0) / 1e6, now - t0)
        return True

    def _computing(self, e: Engine, now: float) -> bool:
        """An overdue batch: whether the engine's batch threads still make progress (CPU time or
        run-queue wait), judged over windows of heartbeat_timeout_s. A stopped or vanished process
        does not; without known threads (an older engine) the whole process is read."""
        live = e.live
        ticks = process_progress_ns(e.pid, live.work_tids or None) if e.pid else None
        if ticks is None:
            return False
        if live.batch_mark is None:
            live.batch_mark = (now, ticks)
            return True
        t0, k0 = live.batch_mark
        if ticks != k0:
            live.batch_mark = (now, ticks)
            if not live.slow_since:
                live.slow_since = now
                log.warning("engine %s: a batch has run past batch_timeout_s=%.1f s, but its threads are "
                            "computing (%.1f ms of CPU or run-queue wait in %.2f s): slow, not hung",
                            e.name, self.config.batch_timeout_s, (ticks - k0) / 1e6, now - t0)
            return True
        return now - t0 < self.config.heartbeat_timeout_s

    # ---- control messages ----
    def _readable(self, e: Engine, generation: int) -> None:
        self.events.after_io()  # the dispatcher's next I/O pass drains every engine

    def drain(self, e: Engine) -> None:
        sock = e.sock
        while sock is not None and e.sock is sock:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            e.live.last_heard = time.monotonic()
            if e.lifecycle.state is M.EngineState.STARVED:
                e.live.starved_since = 0.0
                e.lifecycle.apply(EngineEvent.HEARD)
                if e.inflight:
                    e.lifecycle.apply(EngineEvent.DISPATCH)
            try:
                msg = M.control_decoder.decode(data)
            except Exception as exc:
                self.lose(e, f"undecodable control message: {exc}")
                return
            try:
                self._on_message(e, msg)
            except Exception:  # keep draining: one bad message must not stall the engine's socket
                log.exception("handling %s from engine %s failed", type(msg).__name__, e.name)

    def _on_message(self, e: Engine, msg: Any) -> None:
        if isinstance(msg, M.Heartbeat):
            e.live.last_beat_sent = msg.sent_at
        elif isinstance(msg, (M.BatchDone, M.BatchFailed)):
            e.live.last_result_at = e.live.last_heard
            entry = self._returned(e, msg.batch_id)
            if entry is None:
                return
            if isinstance(msg, M.BatchDone):
                e.counts.batches_done += 1
                e.counts.hot_lookups += msg.hot_lookups
                e.counts.cold_lookups += msg.cold_lookups
                self.events.on_batch_done(e, entry, msg)
            else:
                self.events.on_batch_failed(e, entry, msg)
            e.free_slots.append(entry.slot)
        elif isinstance(msg, M.EngineReady):
            e.lifecycle.apply(EngineEvent.READY)
            e.ready_at = time.monotonic()
            e.ever_ready = e.settled = True
            e.counts.device_memory_bytes = msg.device_memory_bytes
            e.live.work_tids = list(msg.work_tids)
            e.device_name = msg.device_name
            log.info("engine %s ready (pid %d, %d bytes of device memory)", e.name, msg.pid,
                     msg.device_memory_bytes)
            self.events.on_engine_ready(e)
        elif isinstance(msg, M.EngineLoadFailed):
            e.lifecycle.apply(EngineEvent.LOAD_FAILED)
            e.settled = True
            e.last_error = e.load_error = msg.message
            log.error("engine %s (%s) cannot load: %s", e.name, e.device, msg.message)
        elif isinstance(msg, M.DatasetAdded):
            self.events.on_dataset_added(e, msg)
        elif isinstance(msg, M.CanaryDone):
            self.events.on_canary_done(e, msg)

    def _returned(self, e: Engine, batch_id: int) -> InFlightBatch | None:
        entry = e.inflight.pop(batch_id, None)
        if entry is not None and not e.inflight:
            e.lifecycle.apply(EngineEvent.IDLE)
        return entry

    def pending_input(self) -> bool:
        return any(e.sock is not None and has_input(e.sock) for e in self.engines)

    def send(self, e: Engine, msg: Any) -> None:
        """Never blocks: a PAIR socket whose engine process died blocks a plain send for ever (the
        dispatcher hung there when an engine was SIGKILLed between its exit and the pidfd event).
        What was not taken stays in flight; the engine's loss, noticed through its exit or its
        liveness, retries it."""
        assert e.sock is not None
        try:
            e.sock.send(M.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("engine %s: its control socket takes no message (process gone?): %s not sent",
                        e.name, type(msg).__name__)
            if e.proc is not None and not e.proc.alive():
                self.loop.call_soon(self._exited, e, e.generation)

    def send_batch(self, e: Engine, entry: InFlightBatch, msg: M.BatchReady) -> None:
        e.inflight[entry.batch.batch_id] = entry
        e.lifecycle.apply(EngineEvent.DISPATCH)
        self.send(e, msg)

    def take_slot(self, e: Engine) -> int:
        return e.free_slots.pop()

    def add_dataset(self, name: str, path: str) -> set[str]:
        """Send AddDataset to every engine that is starting or serving; their names."""
        sent: set[str] = set()
        for e in list(self.engines):
            if e.sock is not None and (e.serving or e.state is M.EngineState.STARTING):
                self.send(e, M.AddDataset(name=name, path=path))
                sent.add(e.name)
        return sent

    def release_output(self, path: str) -> None:
        """Tell every engine with a control socket to unmap an output region (after its earlier batches)."""
        for e in list(self.engines):
            if e.sock is not None and e.proc is not None:
                self.send(e, M.ReleaseOutput(path=path))

    # ---- shutdown ----
    def stop_all(self, timeout_s: float = 5.0) -> None:
        """Ask every engine to exit, wait, kill stragglers, remove sockets and shared memory."""
        self.stopping = True
        for e in self.engines:
            if e.restart_handle is not None:
                e.restart_handle.cancel()
            if e.sock is not None and e.proc is not None and e.proc.alive():
                try:
                    e.sock.send(M.encode(M.Shutdown()), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + timeout_s
        for e in self.engines:
            if e.proc is not None:
                if e.proc.wait(max(0.0, deadline - time.monotonic())) is None:
                    log.warning("engine %s did not exit; killing it", e.name)
                    e.proc.kill()
                    e.proc.wait(2.0)
            self._detach(e)
            if e.proc is not None:
                e.proc.close()
            e.lifecycle.apply(EngineEvent.STOP)
            e.region.close()


