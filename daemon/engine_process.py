"""One engine process as the dispatcher sees it: started by module name, watched, killed, reaped.

The dispatcher never imports the engine code (nor torch): it starts `python -m engines.process` (a
fresh interpreter, as multiprocessing's spawn would, never a fork of itself, which CUDA would not
survive) and writes the engine's `EngineSpec` to its stdin as msgpack. Nothing is pickled. The
process's exit is seen at once through a pidfd (Linux 5.3+; elsewhere the supervisor's tick polls).
Progress (CPU time and run-queue wait of its threads, Linux schedstat) tells slow from hung.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from wire import messages as M

ENGINE_MODULE = "engines.process"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _child_env(module: str, env: Mapping[str, str]) -> dict[str, str]:
    """The dispatcher's environment, with the directory that holds the module's package first on the
    path (found without importing it), so `-m engines.process` imports the same tree."""
    out = dict(env)
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is not None and spec.origin:
        root = str(Path(spec.origin).resolve().parents[1])
        out["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return out


class ChildProcess:
    """A process started as `python -m MODULE` with its spec (a wire struct) as msgpack on stdin.
    `pidfd` is readable once it has exited (None where unsupported)."""

    def __init__(self, module: str, spec: Any, env: Mapping[str, str] | None = None) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                      env=_child_env(module, os.environ if env is None else env), close_fds=True)
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(M.encode(spec))
            self.popen.stdin.close()
        except OSError:  # it died at once; its exit code will say why
            pass
        self.pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(self.popen.pid)
            except OSError:
                self.pidfd = None

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        """Its exit status (negative: killed by that signal), None while it runs."""
        return self.popen.poll()

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Release the pidfd (after the process is reaped or abandoned)."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class EngineProcess(ChildProcess):
    """A started engine process (`python -m engines.process`)."""

    def __init__(self, spec: M.EngineSpec, env: Mapping[str, str] | None = None) -> None:
        super().__init__(ENGINE_MODULE, spec, env)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code}"


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
