"""The Open Inference Protocol front end process, as the dispatcher runs it.

With `oip_http_port` or `oip_grpc_port` set, the dispatcher starts `python -m oip` (oip/server.py; its
OipSpec on stdin) once it serves. The front end is one more client of the dispatcher (the wire client
over the daemon's endpoint), so it has no engine of its own and nothing to drain: it is started after
READY=1, restarted with backoff when it exits, asked to stop (SIGTERM: its servers finish what they
hold) when the daemon drains, and killed if it has not exited when the engines stop.
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
    def __init__(self, cfg: DaemonConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.proc: ChildProcess | None = None
        self.restarts = 0
        self._stopping = False
        self._restart: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.oip_http_port or self.cfg.oip_grpc_port)

    def start(self) -> None:
        self._restart = None
        if self._stopping or not self.enabled:
            return
        spec = M.OipSpec(endpoint=self.cfg.endpoint, model_name=self.cfg.oip_model_name, host=self.cfg.oip_host,
                         http_port=self.cfg.oip_http_port, grpc_port=self.cfg.oip_grpc_port,
                         parent_pid=os.getpid(), log_level=self.cfg.log_level)
        self.proc = ChildProcess(OIP_MODULE, spec)
        if self.proc.pidfd is not None:
            self.loop.add_reader(self.proc.pidfd, self._exited, self.proc)
        log.info("Open Inference Protocol front end starting, pid %d (REST %s, gRPC %s on %s)", self.proc.pid,
                 self.cfg.oip_http_port or "off", self.cfg.oip_grpc_port or "off", self.cfg.oip_host)

    def poll(self) -> None:
        """Where there is no pidfd: notice an exit (called every tick)."""
        if self.proc is not None and self.proc.pidfd is None and not self.proc.alive():
            self._exited(self.proc)

    def _exited(self, proc: ChildProcess) -> None:
        if proc is not self.proc:
            return
        if proc.pidfd is not None:
            self.loop.remove_reader(proc.pidfd)
        code = proc.wait(1.0)
        proc.close()
        self.proc = None
        if self._stopping:
            return
        self.restarts += 1
        delay = min(_MAX_BACKOFF_S, 2.0 ** min(self.restarts - 1, 6))
        log.error("Open Inference Protocol front end %s; restarting in %.0f s", describe_exit(code), delay)
        self._restart = self.loop.call_later(delay, self.start)

    def request_stop(self) -> None:
        """Ask the front end to stop (SIGTERM): it stops taking requests and finishes those it holds."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        if self.proc is not None and self.proc.alive():
            self.proc.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop it and wait (killed after `timeout_s`)."""
        self.request_stop()
        proc = self.proc
        if proc is None:
            return
        if proc.pidfd is not None:
            self.loop.remove_reader(proc.pidfd)
        if proc.wait(timeout_s) is None:
            log.warning("Open Inference Protocol front end did not stop; killing it")
            proc.kill()
            proc.wait(2.0)
        proc.close()
        self.proc = None
