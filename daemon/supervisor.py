"""Engine supervision: spawn engine processes, watch heartbeats and exits, restart with backoff.

The dispatcher owns the event loop; this module owns each engine's process, control socket and
shared-memory region, and tells the dispatcher (through `EngineEvents`) what happened. An engine is
declared lost when its process exits (seen at once through its sentinel) or, once ready, when it is
hung (it is then killed). Hung means not making progress, never merely slow:
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
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

import zmq

from daemon import protocol as P
from daemon.batcher import Batch
from daemon.config import DaemonConfig
from daemon.shm import Region

log = logging.getLogger("dlrm.supervisor")
_MAX_BACKOFF_S = 60.0
_STABLE_S = 30.0  # a run this long resets the backoff
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_progress_ns(pid: int, tids: Sequence[int] | None = None) -> int | None:
    """CPU time plus run-queue wait of a process's threads (all, or only `tids`), in ns (Linux
    schedstat), or None if the process is gone, stopped (SIGSTOP), a zombie, or this is not Linux.

    Either part growing means the threads are alive: computing, or runnable and waiting for a core.
    A deadlocked or stopped process grows neither. Without schedstat (some kernels, gVisor), the
    process's CPU time from /proc/PID/stat (10 ms ticks) stands in."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # the command name may hold spaces and ')'
    if not fields or fields[0] in (b"T", b"t", b"Z", b"X"):
        return None
    total = 0
    seen = False
    if tids is None:
        try:
            names = os.listdir(f"/proc/{pid}/task")
        except OSError:
            names = []
    else:
        names = [str(t) for t in tids]
    for tid in names:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                cpu, wait = f.read().split()[:2]
            total += int(cpu) + int(wait)
            seen = True
        except (OSError, ValueError):
            continue  # a thread that just ended, or no schedstat here
    if seen:
        return total
    try:
        return (int(fields[11]) + int(fields[12])) * (1_000_000_000 // _CLK_TCK)
    except (IndexError, ValueError):
        return None


class EngineEvents(Protocol):
    def on_control(self, engine: "Engine", msg: Any) -> None: ...
    def on_engine_lost(self, engine: "Engine", reason: str) -> None: ...
    def engine_spec_datasets(self) -> dict[str, str]: ...
    def after_io(self) -> None: ...


class Engine:
    """One configured device: its current process (if any), slots and in-flight batches."""

    def __init__(self, index: int, name: str, device: str, region: Region) -> None:
        self.index = index
        self.name = name
        self.device = device
        self.region = region
        self.state = "stopped"  # starting | ready | dead | stopped
        self.proc: Any = None
        self.sock: zmq.Socket | None = None
        self.endpoint = ""
        self.generation = 0
        self.free_slots: list[int] = []
        # batch_id -> (batch, slot, sent at, assembly seconds); dicts keep insertion order: oldest first
        self.inflight: dict[int, tuple[Batch, int, float, float]] = {}
        self.last_heartbeat = 0.0  # when the dispatcher last received anything from the engine
        self.last_beat_sent = 0.0  # the engine's own send time of its last heartbeat
        self.cpu_mark: tuple[float, int] | None = None  # (when, process_progress_ns) while silent
        self.starved_since = 0.0  # silent but burning CPU since then (0: not so)
        self.work_tids: list[int] = []  # the engine's batch-computing threads (EngineReady)
        self.batch_mark: tuple[float, int] | None = None  # (when, their progress) while a batch is overdue
        self.slow_since = 0.0  # an overdue batch has been progressing since then (0: none is)
        self.last_result_at = 0.0  # when its last BatchDone/BatchFailed arrived
        self.hot_lookups = 0
        self.cold_lookups = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self.restarts = 0
        self.failures_in_row = 0
        self.batches_done = 0
        self.device_memory_bytes = 0
        self.last_error = ""
        self.ever_ready = False
        self.load_failed = False
        self.restart_handle: asyncio.TimerHandle | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def oldest_batch(self, now: float) -> tuple[Batch, float] | None:
        """The batch the engine works on (its oldest in flight) and for how long: from its dispatch
        or the engine's previous batch result, whichever is later (batches queued on the engine
        behind a slow one do not run yet)."""
        if not self.inflight:
            return None
        b, _, sent, _ = next(iter(self.inflight.values()))
        return b, now - max(sent, self.last_result_at)

    @property
    def pid(self) -> int:
        return int(self.proc.pid) if self.proc is not None and self.proc.pid else 0


class Supervisor:
    def __init__(self, config: DaemonConfig, ctx: zmq.Context, loop: asyncio.AbstractEventLoop,
                 events: EngineEvents, shm_prefix: str) -> None:
        self.config = config
        self.ctx = ctx
        self.loop = loop
        self.events = events
        self.mp = multiprocessing.get_context("spawn")
        self.engines: list[Engine] = []
        self.stopping = False
        for i, (name, dev) in enumerate(zip(config.engine_names, config.engines)):
            path = Path("/dev/shm") / f"{shm_prefix}{i}"
            region = Region(path, config.inflight_batches, config.max_batch_pairs, owner=True)
            self.engines.append(Engine(i, name, dev, region))

    # ---- lifecycle ----
    def start(self, e: Engine) -> None:
        e.restart_handle = None
        if self.stopping:
            return
        try:
            self._start(e)
        except (OSError, zmq.ZMQError) as exc:  # e.g. fork/spawn or socket bind failed: try later
            log.error("engine %s could not be started: %s", e.name, exc)
            e.last_error = f"start failed: {exc}"
            self._detach(e)
            e.state = "dead"
            self.events.on_engine_lost(e, e.last_error)
            e.failures_in_row += 1
            delay = min(_MAX_BACKOFF_S, self.config.restart_backoff_s * 2 ** (e.failures_in_row - 1))
            e.restart_handle = self.loop.call_later(delay, self.start, e)

    def _start(self, e: Engine) -> None:
        e.generation += 1
        e.endpoint = f"ipc://{self.config.runtime_dir}/engine-{e.index:02d}-{e.generation:06d}.sock"
        sock = self.ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(e.endpoint)
        e.sock = sock
        spec = P.EngineSpec(
            name=e.name, device=e.device, artifact=self.config.model,
            gpu_part=self.config.embedding_weights_on_gpu_part, control_endpoint=e.endpoint,
            shm_path=str(e.region.path), slots=self.config.inflight_batches,
            max_batch_pairs=self.config.max_batch_pairs,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            datasets=self.events.engine_spec_datasets(), parent_pid=os.getpid(),
            gpu_mlp_precision=self.config.gpu_mlp_precision)
        from engines.process import engine_main

        proc = self.mp.Process(target=engine_main, args=(P.encode(spec),), name=f"dlrm-engine-{e.name}",
                               daemon=True)
        proc.start()
        e.proc = proc
        e.state = "starting"
        e.started_at = e.last_heartbeat = time.monotonic()
        e.cpu_mark = None
        e.starved_since = 0.0
        e.work_tids = []
        e.batch_mark = None
        e.slow_since = 0.0
        e.free_slots = list(range(self.config.inflight_batches))
        self.loop.add_reader(sock.getsockopt(zmq.FD), self._readable, e, e.generation)
        self.loop.add_reader(proc.sentinel, self._exited, e, e.generation)
        log.info("engine %s (%s) starting, pid %d", e.name, e.device, proc.pid)

    def _detach(self, e: Engine) -> None:
        if e.sock is not None:
            self.loop.remove_reader(e.sock.getsockopt(zmq.FD))
            e.sock.close(0)
            e.sock = None
            if e.endpoint.startswith("ipc://"):
                try:
                    os.unlink(e.endpoint[6:])
                except OSError:
                    pass
        if e.proc is not None:
            self.loop.remove_reader(e.proc.sentinel)

    def lose(self, e: Engine, reason: str) -> None:
        """The engine's process is gone or hung: kill it, tell the dispatcher, schedule a restart."""
        if e.state in ("dead", "stopped"):
            return
        was_ready = e.ready
        log.error("engine %s lost: %s", e.name, reason)
        e.last_error = reason
        self._detach(e)
        if e.proc is not None and e.proc.is_alive():
            e.proc.kill()
        if e.proc is not None:
            e.proc.join(timeout=2.0)
        e.state = "dead"
        self.events.on_engine_lost(e, reason)
        if self.stopping:
            return
        ran = time.monotonic() - (e.ready_at if was_ready else e.started_at)
        e.failures_in_row = 1 if (was_ready and ran > _STABLE_S) else e.failures_in_row + 1
        delay = min(_MAX_BACKOFF_S, self.config.restart_backoff_s * 2 ** (e.failures_in_row - 1))
        log.info("engine %s restarts in %.1f s", e.name, delay)
        e.restarts += 1
        e.restart_handle = self.loop.call_later(delay, self.start, e)

    def _exited(self, e: Engine, generation: int) -> None:
        if generation == e.generation and e.proc is not None:
            e.proc.join(timeout=1.0)
            self.lose(e, f"engine process {e.pid} exited with code {e.proc.exitcode}")

    def check_heartbeats(self, now: float, stalled_s: float = 0.0) -> None:
        """Declare hung engines lost. `stalled_s`: how long the dispatcher's own loop was late for
        this check; an engine is not blamed for time in which the dispatcher could not listen."""
        timeout = self.config.heartbeat_timeout_s
        for e in self.engines:
            if not e.ready:
                continue
            if stalled_s > 0.0:
                e.last_heartbeat = min(now, e.last_heartbeat + stalled_s)
            head = e.oldest_batch(now)
            if head is not None and head[1] > self.config.batch_timeout_s:
                self.drain(e)  # its BatchDone may be waiting unread
                now = time.monotonic()
                head = e.oldest_batch(now) if e.ready else None
                if head is not None and head[1] > self.config.batch_timeout_s and not self._computing(e, now):
                    self.lose(e, f"batch {head[0].batch_id} ({head[0].num_pairs} pairs) running for "
                                 f"{head[1]:.2f} s, more than batch_timeout_s={self.config.batch_timeout_s}, "
                                 f"with no CPU or run-queue progress of its threads for "
                                 f"{self.config.heartbeat_timeout_s:g} s (hung)")
                    continue
            elif e.batch_mark is not None:
                e.batch_mark = None
                e.slow_since = 0.0
            silent = now - e.last_heartbeat
            if silent <= timeout / 2:
                e.cpu_mark = None
                e.starved_since = 0.0
                continue
            if e.cpu_mark is None:  # half the timeout silent: note its progress to compare later
                ticks = process_progress_ns(e.pid) if e.pid else None
                e.cpu_mark = None if ticks is None else (now, ticks)
            if silent <= timeout:
                continue
            self.drain(e)  # a busy dispatcher may not have read the engine's messages yet
            now = time.monotonic()
            silent = now - e.last_heartbeat
            if not e.ready or silent <= timeout or self._starved(e, now):
                continue
            sent = f"{now - e.last_beat_sent:.2f} s ago" if e.last_beat_sent else "never"
            self.lose(e, f"no heartbeat for {silent:.2f} s (hung: last heartbeat sent {sent}, "
                         f"no CPU or run-queue progress)")

    def _starved(self, e: Engine, now: float) -> bool:
        """Silent past the timeout, but its process computed or waited for a core over the last half
        timeout: late (short of the GIL or of cores), not hung."""
        ticks = process_progress_ns(e.pid) if e.pid else None
        if ticks is None or e.cpu_mark is None:
            return False
        t0, k0 = e.cpu_mark
        if ticks == k0:
            return False  # neither ran nor waited to run for half a timeout: blocked for good
        if now - t0 >= self.config.heartbeat_timeout_s / 2:
            e.cpu_mark = (now, ticks)  # next window
        if not e.starved_since:
            e.starved_since = now
            log.warning("engine %s: no message for %.2f s, but its process is running (%.1f ms of CPU "
                        "or run-queue wait in %.2f s): starved, not hung", e.name, now - e.last_heartbeat,
                        (ticks - k0) / 1e6, now - t0)
        return True

    def _computing(self, e: Engine, now: float) -> bool:
        """An overdue batch: whether the engine's batch threads still make progress (CPU time or
        run-queue wait), judged over windows of heartbeat_timeout_s. A stopped or vanished process
        does not; without known threads (an older engine) the whole process is read."""
        ticks = process_progress_ns(e.pid, e.work_tids or None) if e.pid else None
        if ticks is None:
            return False
        if e.batch_mark is None:
            e.batch_mark = (now, ticks)
            return True
        t0, k0 = e.batch_mark
        if ticks != k0:
            e.batch_mark = (now, ticks)
            if not e.slow_since:
                e.slow_since = now
                log.warning("engine %s: a batch has run past batch_timeout_s=%.1f s, but its threads are "
                            "computing (%.1f ms of CPU or run-queue wait in %.2f s): slow, not hung",
                            e.name, self.config.batch_timeout_s, (ticks - k0) / 1e6, now - t0)
            return True
        return now - t0 < self.config.heartbeat_timeout_s

    def all_heartbeats_recent(self, now: float) -> bool:
        return all(e.ready and now - e.last_heartbeat <= self.config.heartbeat_timeout_s
                   for e in self.engines)

    # ---- control messages ----
    def _readable(self, e: Engine, generation: int) -> None:
        self.events.after_io()  # the dispatcher's next I/O pass drains every engine

    def drain(self, e: Engine, generation: int | None = None) -> None:
        sock = e.sock
        if sock is None or (generation is not None and generation != e.generation):
            return
        while e.sock is sock:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            e.last_heartbeat = time.monotonic()
            try:
                msg = P.control_decoder.decode(data)
            except Exception as exc:
                self.lose(e, f"undecodable control message: {exc}")
                return
            if isinstance(msg, P.Heartbeat):
                e.last_beat_sent = msg.sent_at
                continue  # nothing else to do with it: keep it off the dispatcher's handler
            if isinstance(msg, (P.BatchDone, P.BatchFailed)):
                e.last_result_at = e.last_heartbeat
            try:
                self.events.on_control(e, msg)
            except Exception:  # keep draining: one bad message must not stall the engine's socket
                log.exception("handling %s from engine %s failed", type(msg).__name__, e.name)

    def pending_input(self) -> bool:
        return any(e.sock is not None and e.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN for e in self.engines)

    def send(self, e: Engine, msg: Any) -> None:
        assert e.sock is not None
        e.sock.send(P.encode(msg))

    # ---- shutdown ----
    def stop_all(self, timeout_s: float = 5.0) -> None:
        """Ask every engine to exit, wait, kill stragglers, remove sockets and shared memory."""
        self.stopping = True
        for e in self.engines:
            if e.restart_handle is not None:
                e.restart_handle.cancel()
            if e.sock is not None and e.proc is not None and e.proc.is_alive():
                try:
                    e.sock.send(P.encode(P.Shutdown()), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + timeout_s
        for e in self.engines:
            if e.proc is not None:
                e.proc.join(timeout=max(0.0, deadline - time.monotonic()))
                if e.proc.is_alive():
                    log.warning("engine %s did not exit; killing it", e.name)
                    e.proc.kill()
                    e.proc.join(timeout=2.0)
            self._detach(e)
            e.state = "stopped"
            e.region.close()
