"""Helpers for the daemon tests (no tests here): datasets, a running daemon process, clients."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wire.client import Client
from wire.errors import DaemonError
from engines.null_backend import null_ref_prediction
from formats.dataset import write_dataset

REPO = Path(__file__).resolve().parents[1]
TABLE_ROWS = tuple([50] * 26)


def make_dataset(path: Path, sizes: np.ndarray, seed: int = 0, table_rows: tuple[int, ...] = TABLE_ROWS) -> Path:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    sparse = np.stack([rng.integers(0, r, size=n) for r in table_rows], axis=1).astype(np.int32)
    dense = np.log1p(rng.integers(0, 2000, size=(n, 13))).astype(np.float32)
    labels = rng.integers(0, 2, size=n).astype(np.float32)
    return write_dataset(path, labels, dense, sparse, offsets, table_rows, "daemon-test")


def wait_for(pred: Any, timeout_s: float, what: str) -> Any:
    """Poll `pred()` until it returns something true (returned), or fail naming `what`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def guarded(fn: Any, errors: list[str]) -> Any:
    """`fn` for a test's own thread: an exception goes into `errors` (for the test to assert on)
    instead of dying with the thread, where it would not fail the test."""
    def run(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            errors.append(repr(exc))
    return run


def make_cpu_artifact(d: Path, config: Any, seed: int = 5) -> Path:
    """A converted int8 artifact of a random model (d/art), for daemons with real CPU engines."""
    import torch

    from engines.model import random_state_dict
    from formats.frequencies import write_row_frequencies
    from prepare.convert import convert

    d.mkdir(parents=True, exist_ok=True)
    torch.save(random_state_dict(config, seed=seed), d / "ckpt.pt")
    rng = np.random.default_rng(seed + 4)
    write_row_frequencies(d / "f.bin", [rng.random(r).astype(np.float32) for r in config.table_rows])
    convert(d / "ckpt.pt", d / "art", d / "f.bin")
    return d / "art"


def expected_null_by_ref(offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """What the null engine must answer, computed without the daemon's code paths: the pairs of each
    sample in request order (a Python loop is fine in a test oracle)."""
    parts = [null_ref_prediction(np.arange(offsets[s], offsets[s + 1])) for s in ids]
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


class DaemonProc:
    """A `python -m daemon.cli` subprocess with its own short runtime dir (unix socket path limit)."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None,
                 default_runtime_dir: bool = False, wrapper: list[str] | None = None) -> None:
        """`default_runtime_dir`: configure no runtime_dir; the daemon takes its default, under
        XDG_RUNTIME_DIR = our temp dir (see `client_env`). `wrapper`: a command line the daemon's
        command is appended to (it must exec or run it, e.g. bench/syscall_audit.py enforce --)."""
        self.rt = tempfile.mkdtemp(prefix="dlrmt-", dir="/tmp")
        cfg = {"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 0.8, "restart_backoff_s": 0.2, **config}
        if not default_runtime_dir:
            cfg = {"runtime_dir": self.rt, **cfg}
        self.config_path = Path(self.rt) / "daemon.toml"
        self.config_path.write_text(_toml(cfg))
        self.endpoint = f"ipc://{self.rt}/dlrm-daemon/dlrm.sock" if default_runtime_dir else f"ipc://{self.rt}/dlrm.sock"
        drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "RUNTIME_DIRECTORY", "DLRM_ENDPOINT", "DLRM_RUNTIME_DIR")
        full_env = {k: v for k, v in os.environ.items() if k not in drop}
        if default_runtime_dir:
            full_env["XDG_RUNTIME_DIR"] = self.rt
        self.client_env = dict(full_env)  # what a client on the same host (same user session) sees
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        full_env.update({"PYTHONPATH": path, **(env or {})})
        self.client_env["PYTHONPATH"] = path
        self.log_path = Path(self.rt) / "daemon.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*(wrapper or []), sys.executable, "-m", "daemon.cli", "--config",
                                      str(self.config_path)],
                                     cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout_s: float = 30.0) -> dict:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(self.endpoint, timeout_s=0.5) as c:
                    st = c.status()
                if st["state"] == "serving":
                    return st
            except DaemonError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not serving after {timeout_s} s:\n{self.log()}")

    def client(self, timeout_s: float = 20.0) -> Client:
        return Client(self.endpoint, timeout_s=timeout_s)

    def status(self) -> dict:
        with self.client(5.0) as c:
            return c.status()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.rt, ignore_errors=True)


def _toml(cfg: dict[str, Any]) -> str:
    lines = []
    tables = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            tables.append(f"[{k}]\n" + "".join(f'{n} = "{p}"\n' for n, p in v.items()))
        elif isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, (list, tuple)):
            lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n" + "\n".join(tables)
