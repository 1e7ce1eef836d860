"""The dispatcher: one asyncio (uvloop) process with a ZeroMQ ROUTER socket for clients.

`Dispatcher.run` is the process's life in a fixed order: take the runtime directory's lock, open the
configured datasets, bind the client socket, start the engines, serve until a signal, drain, stop the
engines, close the socket, release the lock; each step undoes only what the steps before it made.

Everything runs on the event loop thread; ZeroMQ sockets are watched through their FDs (edge-like, so
after every pass the sockets' EVENTS are re-checked). The parts get what they need and nothing more:
`RequestHandler` (daemon/requests.py) validates requests, `Scheduler` (daemon/scheduling.py) moves
batches to engines and results back, `Supervisor` (daemon/supervisor.py) owns the engine processes,
`ReplySender` (daemon/replies.py) answers. `_Serving` wires them together and takes the engines' events.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from daemon.batcher import Batcher
from daemon.config import DaemonConfig
from daemon.datasets import DatasetRegistry
from daemon.memory import IdleTrimmer
from daemon.metrics import DaemonMetrics
from daemon.model_swap import ModelSwap, reloaded_reply
from daemon.oip_frontend import OipFrontend
from daemon.reload_plan import ReloadRefused
from daemon.peers import PeerWatch
from daemon.replies import PIPE_HWM, ReplySender, Totals
from daemon.requests import RequestHandler
from daemon.scheduling import Scheduler
from daemon.sdnotify import Notifier
from daemon.security import ServerCurve, maybe_server_curve, remove_stale_sockets
from daemon.supervisor import Engine, EngineRole, InFlightBatch, Supervisor
from daemon.zmq_fd import fd_of, has_input
from formats.artifact import ArtifactError, read_model_config
from formats.model_config import DLRMConfig
from wire import messages as M
from wire.errors import BadRequest, ErrorCode
from wire.exitcodes import ExitCode
from wire.shm import remove_stale, run_prefix

log = logging.getLogger("dlrm.dispatcher")
_DRAIN_ROUTER_MAX = 512
_TICK_S = 0.05
# While engines load (minutes for a 24 GB model) and their processes make progress, ask systemd for
# more start time (EXTEND_TIMEOUT_USEC) every _EXTEND_EVERY_S, _EXTEND_BY_S from then; a load that
# makes no progress stops asking, and TimeoutStartSec ends it.
_EXTEND_EVERY_S = 1.0
_EXTEND_BY_S = 30.0
_PASS_BUDGET_S = 0.005
_NOBLOCK = int(zmq.NOBLOCK)


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
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class RuntimeDirLock:
    """One daemon per runtime directory (flock); leftovers of a crashed run are removed under it."""

    def __init__(self, runtime_dir: str) -> None:
        rt = Path(runtime_dir)
        rt.mkdir(mode=0o700, parents=True, exist_ok=True)
        if rt.stat().st_uid == os.getuid():
            os.chmod(rt, 0o700)  # sockets inside are reachable by whoever can enter the directory
        self.fd = os.open(rt / "dlrm-daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise StartupError(ExitCode.RUNTIME_FAILURE,
                               f"another dlrm-daemon is running with runtime_dir {rt}") from None
        remove_stale()
        remove_stale_sockets(rt)

    def release(self) -> None:
        os.close(self.fd)


class ClientSocket:
    """The ROUTER socket clients talk to, its context, CURVE (optional) and disconnect watch."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.endpoint = cfg.endpoint
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 1000)
        # A full pipe to one client makes its send say EAGAIN (ROUTER_MANDATORY) rather than queue
        # without end or drop; daemon/replies.py keeps a bounded backlog beyond it.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, PIPE_HWM)
        self.router.setsockopt(zmq.RCVHWM, 1_000_000)
        # Replies are MBs per batch: bigger kernel socket buffers mean fewer wakeups per reply
        # (the kernel caps them at net.core.wmem_max / rmem_max).
        self.router.setsockopt(zmq.SNDBUF, 8 << 20)
        self.router.setsockopt(zmq.RCVBUF, 8 << 20)
        # Hard per-frame bound (the peer is dropped beyond it); max_message_bytes itself is checked
        # per message so that a too-large request gets a typed BAD_REQUEST.
        self.router.setsockopt(zmq.MAXMSGSIZE, 4 * cfg.max_message_bytes)
        self.curve: ServerCurve | None = maybe_server_curve(self.ctx, cfg)
        if self.curve is not None:
            self.curve.apply(self.router)
        try:
            self.router.bind(cfg.endpoint)
        except zmq.ZMQError as exc:
            self._close_unbound()
            raise StartupError(ExitCode.RUNTIME_FAILURE, f"cannot bind {cfg.endpoint}: {exc}") from None
        self.peers = PeerWatch(self.router)  # drops queued work of clients that disconnect

    def _close_unbound(self) -> None:
        self.router.close(linger=0)
        if self.curve is not None:
            self.curve.close()
        self.ctx.term()

    def close(self) -> None:
        self.peers.close()
        self.router.close(linger=1000)
        if self.curve is not None:
            self.curve.close()  # its ZAP socket lives on this context: close it before term
        self.ctx.term()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[6:])
            except OSError:
                pass


class Dispatcher:
    def __init__(self, config: DaemonConfig, metrics: DaemonMetrics | None = None,
                 notifier: Notifier | None = None,
                 reload_config: Callable[[str | None], DaemonConfig] | None = None) -> None:
        """`reload_config(path)`: the config a reload serves (path None: the daemon's own file, with its
        command-line overrides); without it a reload re-reads nothing and only the given path counts."""
        self.cfg = config
        self.metrics = metrics
        self.notifier = notifier
        self.reload_config = reload_config

    async def run(self) -> int:
        _keep_large_allocations()
        model = _model_config(self.cfg)
        lock = RuntimeDirLock(self.cfg.runtime_dir)
        try:
            datasets = DatasetRegistry(model)
            for name, path in self.cfg.datasets.items():
                try:
                    datasets.add_configured(name, path)
                except BadRequest as exc:
                    raise StartupError(ExitCode.CONFIG_ERROR, f"config key 'datasets': {exc.message}") from None
            sock = ClientSocket(self.cfg)
            try:
                serving = _Serving(self.cfg, asyncio.get_running_loop(), sock, datasets, self.metrics,
                                   self.notifier, self.reload_config)
                try:
                    return await serving.serve()
                finally:
                    serving.close()
            finally:
                sock.close()
        finally:
            lock.release()


def _model_config(cfg: DaemonConfig) -> DLRMConfig | None:
    """The model's shape, to check ids against (None without an artifact: 'null' engines need none)."""
    if not cfg.model or not (Path(cfg.model) / "meta.json").is_file():
        return None
    try:
        return read_model_config(cfg.model)
    except ArtifactError as exc:
        raise StartupError(ExitCode.CONFIG_ERROR, f"config key 'model': {exc}") from None


class _Serving:
    """The serving dispatcher: its parts, the I/O pass, the ticker, and the engines' events."""

    def __init__(self, cfg: DaemonConfig, loop: asyncio.AbstractEventLoop, sock: ClientSocket,
                 datasets: DatasetRegistry, metrics: DaemonMetrics | None, notifier: Notifier | None,
                 reload_config: Callable[[str | None], DaemonConfig] | None = None) -> None:
        self.cfg = cfg
        self.loop = loop
        self.sock = sock
        self.router = sock.router
        self.metrics = metrics
        self.notifier = notifier
        self.state = M.DaemonState.STARTING
        self.started_mono = time.monotonic()
        self.datasets = datasets
        self.totals = Totals()
        self.replies = ReplySender(self.router, metrics, self.totals, cfg.max_client_backlog_bytes)
        self.batcher = Batcher(cfg.max_batch_pairs, cfg.max_queue_pairs, cfg.max_queue_delay_s)
        self.sup = Supervisor(cfg, sock.ctx, loop, self, run_prefix())
        if metrics is not None:
            for engine in self.sup.engines:  # each engine's gpu and model labels, before its first sample
                metrics.register_engine(engine.name, engine.device, engine.model.model_id)
        self.scheduler = Scheduler(self.batcher, self.sup, self.replies, metrics, loop, self.after_io)
        self.requests = RequestHandler(cfg, datasets, self.scheduler, self.sup, self.replies,
                                       lambda: self.state, self.started_mono, self._on_reload)
        self.swap = ModelSwap(self, reload_config or _load_named, loop)
        self.oip = OipFrontend(cfg, loop)  # the Open Inference Protocol front end, when configured
        self._reload_requested = False  # SIGHUP: the ticker starts a reload (handlers only record)
        self._trimmer = IdleTrimmer(cfg.malloc_trim_interval_s)  # returns heap freed after bursts to the OS (daemon/memory.py)
        self._io_scheduled = False
        self._closed = False
        self._signal: int | None = None
        self._last_watchdog = 0.0
        self._last_status = ""
        # (when, loading_progress()) last checked; from 0: the first tick asks if the engines ran at all
        self._load_mark: tuple[float, int | None] = (0.0, 0)
        self._stop = asyncio.Event()
        self._started: asyncio.Future[bool] = loop.create_future()

    # ================= lifecycle =================
    async def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self.loop.add_reader(fd_of(self.router), self._on_io)
        self._notify("status", f"loading model on {len(self.sup.engines)} engine(s)")
        for e in self.sup.engines:
            if e.role is not EngineRole.STANDBY:  # spares start once these serve (Supervisor.start_standbys)
                self.sup.start(e)
        tick = self.loop.create_task(self._ticker())
        try:
            waits: list[asyncio.Future[Any]] = [self._started, self.loop.create_task(self._stop.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if self._started.done() and self.sup.start_failed():
                reasons = "; ".join(f"{e.name} ({e.device}): {e.last_error}" for e in self.sup.engines)
                log.error("no engine could start: %s", reasons)
                self.scheduler.fail_queued(ErrorCode.ENGINE_FAILED, "no engine could start")
                return ExitCode.ENGINE_LOAD_FAILURE
            if not self._stop.is_set():
                self.state = M.DaemonState.SERVING
                log.info("serving on %s with engines %s", self.cfg.endpoint,
                         ", ".join(f"{e.name}={e.state}" for e in self.sup.engines))
                for note in self.cfg.advisories():
                    log.warning("%s", note)
                self._notify("ready", self._status_line())
                self._last_status = self._status_line()
                self.oip.start()  # a client of ours: once we serve
                await self._stop.wait()
            await self._drain()
            return ExitCode.OK
        finally:
            tick.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        # Only record it; the main coroutine does the work.
        self._signal = sig
        self._stop.set()

    def _on_sighup(self) -> None:
        self._reload_requested = True  # the ticker starts the reload

    # ================= reload (daemon/model_swap.py) =================
    def set_config(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.sup.config = cfg
        self.requests.cfg = cfg

    def dataset_names(self) -> list[str]:
        return self.datasets.ready_names()

    def serving(self) -> bool:
        return self.state is M.DaemonState.SERVING

    def _on_reload(self, client: bytes | None, request_id: int, config_path: str) -> None:
        """A Reload request (client None: SIGHUP): runs as a task, answered when it ends."""
        self._notify("reloading")
        task = self.loop.create_task(self.swap.run(config_path or None))

        def finished(t: asyncio.Task[M.Reloaded]) -> None:
            ok = not t.cancelled() and t.exception() is None
            self._notify("ready", self._status_line())
            self._last_status = self._status_line()
            if client is None:
                return
            if ok:
                self.replies.send(client, reloaded_reply(request_id, t.result()))
            else:
                exc = t.exception() if not t.cancelled() else None
                why = str(exc) if isinstance(exc, ReloadRefused) else (
                    "cancelled (the daemon is shutting down)" if exc is None else f"{type(exc).__name__}: {exc}")
                if exc is not None and not isinstance(exc, ReloadRefused):
                    log.error("reload failed: %s", why)
                self.replies.error(client, request_id, ErrorCode.RELOAD_FAILED, why)
            self.replies.flush()

        task.add_done_callback(finished)

    async def _drain(self) -> None:
        self.state = M.DaemonState.DRAINING
        log.info("signal %s: draining (up to %.1f s)", self._signal, self.cfg.drain_timeout_s)
        self._notify("stopping")
        self.oip.request_stop()  # it takes no new requests; what it sent us is answered below
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while time.monotonic() < deadline and self.sup.any_serving() and self.scheduler.busy():
            self.scheduler.pump()
            await asyncio.sleep(0.005)
        message = "daemon stopped before this request was computed"
        self.scheduler.fail_queued(ErrorCode.SHUTTING_DOWN, message)
        self.scheduler.fail_inflight(ErrorCode.SHUTTING_DOWN, message)

    def close(self) -> None:
        """Stop the engines and stop watching the client socket (the caller closes it)."""
        self._closed = True
        self.oip.stop()
        self.sup.stop_all()
        self.loop.remove_reader(fd_of(self.router))

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
            self.sup.poll_exits()
            self.oip.poll()
            self.sup.check_liveness(now, stalled_s=late if late > _TICK_S else 0.0)
            self._trimmer.tick(now, not self.scheduler.busy())
            self.totals.mark(now)
            wd = self.notifier.watchdog_interval_s() if self.notifier is not None else None
            # The watchdog says the dispatcher is alive (this loop runs), never whether every engine
            # is: systemd would kill a service that still serves with its other engines, or while an
            # engine reloads for longer than WatchdogSec. Engine health goes to STATUS=, metrics and
            # `status`. Not before READY=1: the ticker can run between the last engine's EngineReady
            # and the coroutine that announces readiness.
            if wd and self.state is not M.DaemonState.STARTING and now - self._last_watchdog >= wd / 2:
                self._notify("watchdog")
                self._last_watchdog = now
            if self.state is M.DaemonState.STARTING and self.notifier is not None and self.notifier.enabled:
                self._extend_start(now)
            if self.metrics is not None:
                self.metrics.set_queue_depth(self.batcher.queued_queries, self.batcher.queued_pairs)
            if self._reload_requested and self.state is M.DaemonState.SERVING:
                self._reload_requested = False
                log.info("SIGHUP: reloading the configuration")
                self._on_reload(None, 0, "")
            # Also a safety net for ZeroMQ's edge-like FDs: a full I/O pass every tick.
            self.after_io()

    def _extend_start(self, now: float) -> None:
        when, before = self._load_mark
        if now - when < _EXTEND_EVERY_S:
            return
        progress = self.sup.loading_progress()
        self._load_mark = (now, progress)
        if progress is not None and before is not None and progress > before:
            self._notify("extend_timeout", _EXTEND_BY_S)

    def _status_line(self) -> str:
        """systemd's STATUS=: how many engines serve (or are ready, while starting), and why each
        other one does not."""
        engines = [e for e in self.sup.engines if e.role is EngineRole.ACTIVE]
        up = sum(e.serving for e in engines)
        down = [f"{e.name} {e.state}" + (f" ({e.last_error})" if e.last_error else "")
                for e in engines if not e.serving]
        head = ("serving with {}/{} engines" if self.state is M.DaemonState.SERVING else
                "loading the model: {}/{} engines ready")
        line = head.format(up, len(engines)) + (": " + "; ".join(down) if down else "")
        spares = [f"{e.name} {e.state}" for e in self.sup.engines if e.role is EngineRole.STANDBY]
        if spares:
            line += "; standby " + ", ".join(spares)
        if self.swap.running_since is not None:
            others = [f"{e.name} {e.role} {e.state}" for e in self.sup.engines
                      if e.role not in (EngineRole.ACTIVE, EngineRole.STANDBY)]
            line += "; reloading" + (f" ({', '.join(others)})" if others else "")
        elif self.swap.last_outcome:
            line += f"; last {self.swap.last_outcome}"
        return line

    def _report_engines(self) -> None:
        """Send STATUS= when an engine became ready, was lost or came back (only on a change)."""
        if self.state not in (M.DaemonState.SERVING, M.DaemonState.STARTING):
            return
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self._notify("status", line)

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
        for e in list(self.sup.engines):  # a retired engine may leave the list meanwhile
            self.sup.drain(e)
        gone = self.sock.peers.take_gone()
        if gone:
            self.datasets.forget_clients(set(gone))
            for path in self.requests.outputs.forget_clients(set(gone)):
                self.sup.release_output(path)
            self.replies.forget(set(gone))
            dropped = self.batcher.drop_clients(set(gone))
            self.totals.counts["cancelled_disconnected"] += dropped
            if self.metrics is not None and dropped:
                self.metrics.queries_dropped("client_disconnected", dropped)
        recv = self.router.recv
        t_end = time.monotonic() + _PASS_BUDGET_S
        for i in range(_DRAIN_ROUTER_MAX):
            try:
                frames = [recv(_NOBLOCK, copy=False)]
            except zmq.Again:
                break
            while frames[-1].more:
                frames.append(recv(_NOBLOCK, copy=False))
            self.sock.peers.note(frames)
            self.requests.handle(frames)
            if i & 15 == 15 and time.monotonic() > t_end:
                break  # let engine messages and timers in (large by-value requests)
        for e in list(self.sup.engines):
            self.sup.drain(e)
        self.scheduler.pump()
        self.replies.flush()
        # ZeroMQ FDs are edge-like: re-check after our own sends, which may have consumed the edge.
        if has_input(self.router) or self.sup.pending_input():
            self.after_io()

    def after_io(self) -> None:
        if not self._io_scheduled:
            self._io_scheduled = True
            self.loop.call_soon(self._on_io)

    # ================= engine events (supervisor.EngineEvents) =================
    def on_engine_ready(self, engine: Engine) -> None:
        if self.metrics is not None:
            self.metrics.set_engine_info(engine.name, engine.device_name)
            self.metrics.set_engine_up(engine.name, True)
            self.metrics.set_device_memory(engine.name, engine.counts.device_memory_bytes)
        self.scheduler.engine_back()
        self.sup.start_standbys()
        self._report_engines()
        self._check_started()

    def on_engine_lost(self, engine: Engine, reason: str, batches: list[InFlightBatch]) -> None:
        if engine.role is EngineRole.CANDIDATE:
            self.swap.engine_lost(engine, reason)
        self.scheduler.on_engine_lost(engine, reason, batches, self.state is M.DaemonState.SERVING)
        self.requests.engine_gone(engine)
        if self.metrics is not None:
            self.metrics.set_engine_up(engine.name, False)
            self.metrics.set_inflight(engine.name, 0)
            if not self.sup.stopping:
                self.metrics.engine_restarted(engine.name)
        self._report_engines()
        self._check_started()
        self.loop.call_soon(self.after_io)

    def on_batch_done(self, engine: Engine, entry: InFlightBatch, msg: M.BatchDone) -> None:
        self.scheduler.on_batch_done(engine, entry, msg)

    def on_batch_failed(self, engine: Engine, entry: InFlightBatch, msg: M.BatchFailed) -> None:
        self.scheduler.on_batch_failed(engine, entry, msg)

    def on_dataset_added(self, engine: Engine, msg: M.DatasetAdded) -> None:
        ds = self.datasets.entries.get(msg.name)
        if ds is not None and engine.name in ds.waiting:
            self.requests.dataset_progress(ds, engine.name, msg.error)

    def datasets_for_new_engine(self) -> dict[str, str]:
        return self.datasets.paths()

    def on_engine_released(self, engine: Engine, batches: list[InFlightBatch]) -> None:
        """A retired engine left for good: its metric series go; what it still held is retried."""
        if batches:
            self.scheduler.on_engine_lost(engine, "stopped by a reload", batches, self.state is M.DaemonState.SERVING)
        self.requests.engine_gone(engine)
        if self.metrics is not None:
            self.metrics.remove_engine(engine.name)
        self._report_engines()
        self.loop.call_soon(self.after_io)

    def on_canary_done(self, engine: Engine, msg: M.CanaryDone) -> None:
        self.swap.canary_done(engine, msg)

    def _check_started(self) -> None:
        if not self._started.done() and self.sup.all_settled():
            self._started.set_result(True)


def _load_named(path: str | None) -> DaemonConfig:
    """A reload's config without the daemon's own loader (tests, embedders): the named file, or refused."""
    from daemon.config import load_config

    if path is None:
        raise ReloadRefused("this daemon was started without a config file to re-read: name one (reload --config)")
    return load_config(path)
