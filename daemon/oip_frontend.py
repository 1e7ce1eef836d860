"""The Open Inference Protocol front end process, as the dispatcher runs it.

With `oip_http_port` or `oip_grpc_port` set, the dispatcher starts `oip_workers` processes of
`python -m oip` (oip/server.py; each its OipSpec on stdin) once it serves; they share the ports
(SO_REUSEPORT), so the kernel spreads client connections over them. Each is one more client of the
dispatcher (the wire client over the daemon's endpoint), so the front end has no engine of its own and
nothing to drain: it is started after READY=1, each worker restarted with backoff when it exits, asked to
stop (SIGTERM: its servers finish what they hold) when the daemon drains, and killed if it has not exited
when the engines stop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from daemon.config import DaemonConfig
from daemon.engine_process import ChildProcess, describe_exit
from wire import messages as M

log = logging.getLogger("dlrm.oip")
OIP_MODULE = "oip"
_MAX_BACKOFF_S = 60.0


class OipFrontend:
    """`oip_workers` front end processes on the same ports; each restarted on its own when it exits."""

    def __init__(self, cfg: DaemonConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.procs: dict[int, ChildProcess] = {}  # worker number -> its running process
        self.restarts = 0
        self._failures: dict[int, int] = {}  # worker -> exits in a row (its restart backoff)
        self._stopping = False
        self._restarts: dict[int, asyncio.TimerHandle] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.oip_http_port or self.cfg.oip_grpc_port)

    def start(self) -> None:
        for worker in range(self.cfg.oip_workers):
            self._start(worker)

    def _start(self, worker: int) -> None:
        self._restarts.pop(worker, None)
        if self._stopping or not self.enabled:
            return
        spec = M.OipSpec(endpoint=self.cfg.endpoint, model_name=self.cfg.oip_model_name, host=self.cfg.oip_host,
                         http_port=self.cfg.oip_http_port, grpc_port=self.cfg.oip_grpc_port,
                         parent_pid=os.getpid(), log_level=self.cfg.log_level, worker=worker,
                         workers=self.cfg.oip_workers)
        proc = ChildProcess(OIP_MODULE, spec)
        self.procs[worker] = proc
        if proc.pidfd is not None:
            self.loop.add_reader(proc.pidfd, self._exited, worker, proc)
        log.info("Open Inference Protocol front end %d/%d starting, pid %d (REST %s, gRPC %s on %s)", worker + 1,
                 self.cfg.oip_workers, proc.pid, self.cfg.oip_http_port or "off", self.cfg.oip_grpc_port or "off",
                 self.cfg.oip_host)

    def poll(self) -> None:
        """Where there is no pidfd: notice an exit (called every tick)."""
        for worker, proc in list(self.procs.items()):
            if proc.pidfd is None and not proc.alive():
                self._exited(worker, proc)

    def _exited(self, worker: int, proc: ChildProcess) -> None:
        if self.procs.get(worker) is not proc:
            return
        if proc.pidfd is not None:
            self.loop.remove_reader(proc.pidfd)
        code = proc.wait(1.0)
        proc.close()
        del self.procs[worker]
        if self._stopping:
            return
        self.restarts += 1
        self._failures[worker] = self._failures.get(worker, 0) + 1
        delay = min(_MAX_BACKOFF_S, 2.0 ** min(self._failures[worker] - 1, 6))
        log.error("Open Inference Protocol front end %d %s; restarting in %.0f s", worker + 1, describe_exit(code),
                  delay)
        self._restarts[worker] = self.loop.call_later(delay, self._start, worker)

    def request_stop(self) -> None:
        """Ask the front end to stop (SIGTERM): it stops taking requests and finishes those it holds."""
        self._stopping = True
        for handle in self._restarts.values():
            handle.cancel()
        self._restarts.clear()
        for proc in self.procs.values():
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every worker and wait (each killed after `timeout_s`)."""
        self.request_stop()
        for worker, proc in list(self.procs.items()):
            if proc.pidfd is not None:
                self.loop.remove_reader(proc.pidfd)
            if proc.wait(timeout_s) is None:
                log.warning("Open Inference Protocol front end %d did not stop; killing it", worker + 1)
                proc.kill()
                proc.wait(2.0)
            proc.close()
        self.procs.clear()
