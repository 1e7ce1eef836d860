"""A daemon with an engine down: it keeps serving with the others, systemd's watchdog stays fed (it says
the dispatcher lives), STATUS= says which engine is down and why, and a start-up failure names its cause."""
from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from formats.artifact import write_model_description
from formats.model_config import DLRMConfig
from test_daemon_support import DaemonProc, expected_null_by_ref, make_cpu_artifact, make_dataset


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; collects what the daemon sends."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dlrmn-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                pass

    def statuses(self) -> list[str]:
        return [line[7:] for _, m in self.messages for line in m.splitlines() if line.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


def test_watchdog_stays_fed_and_status_names_the_engine_that_cannot_load(tmp_path: Path,
                                                                          notify: NotifySocket) -> None:
    """engines = [null, cpu], the cpu engine cannot load its model (a description without weights):
    before, READY=1 came and then no WATCHDOG=1 at all (systemd killed the service every WatchdogSec)."""
    model = write_model_description(tmp_path / "model", DLRMConfig(tuple([50] * 26)))
    offsets = np.concatenate([[0], np.cumsum([3, 4])])
    ds = make_dataset(tmp_path / "ds", np.diff(offsets))
    d = DaemonProc({"engines": ["null", "cpu"], "model": str(model), "datasets": {"ds": str(ds)}},
                   env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    try:
        st = d.wait_serving()
        notify.collect(2.0)
        ready_at = next(t for t, m in notify.messages if "READY=1" in m)
        pings = [t for t, m in notify.messages if "WATCHDOG=1" in m and t >= ready_at]
        # every 0.2 s (half of WATCHDOG_USEC) while the cpu engine keeps failing to load
        assert len(pings) >= 5, notify.messages
        assert max(np.diff([ready_at, *pings])) < 0.4 + 0.3
        ready = next(m for _, m in notify.messages if "READY=1" in m)
        assert "STATUS=serving with 1/2 engines: cpu0" in ready, ready
        assert "cannot load" in ready and "no 'files' table" in ready  # the engine's own words
        engines = {e["name"]: e for e in st["engines"]}
        assert engines["null0"]["state"] == "ready" and engines["cpu0"]["state"] != "ready"
        with d.client() as c:  # served by the engine that is up
            np.testing.assert_array_equal(c.infer_by_ref("ds", np.array([1, 0])),
                                          expected_null_by_ref(offsets, np.array([1, 0])))
        assert d.terminate() == 0
    finally:
        d.close()


def test_status_changes_when_an_engine_is_lost_and_comes_back(tmp_path: Path, notify: NotifySocket) -> None:
    import signal

    d = DaemonProc({"engines": ["null", "null"]},
                   env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    try:
        st = d.wait_serving()
        notify.collect(0.3)
        assert notify.statuses()[-1] == "serving with 2/2 engines"
        os.kill(st["engines"][1]["pid"], signal.SIGKILL)
        end = time.monotonic() + 20

        def back() -> bool:
            st = notify.statuses()
            down = [i for i, s in enumerate(st) if s.startswith("serving with 1/2")]
            return bool(down) and st[-1] == "serving with 2/2 engines" and len(st) - 1 > down[0]
        while time.monotonic() < end and not back():
            notify.collect(0.1)
        assert back(), notify.statuses()
        lost = next(s for s in notify.statuses() if s.startswith("serving with 1/2"))
        assert lost.startswith("serving with 1/2 engines: null1 ") and "killed by signal 9" in lost, lost
        # the watchdog went on through the loss and the restart
        t_lost = min(t for t, m in notify.messages if "STATUS=serving with 1/2" in m)
        assert any("WATCHDOG=1" in m and t > t_lost for t, m in notify.messages)
        assert d.terminate() == 0
    finally:
        d.close()


def test_start_up_failure_names_the_engines_own_error(tmp_path: Path) -> None:
    """Before: `no engine could start: cpu0 (cpu): engine process N exited with code 70`, after a
    `restarts in 1.0 s` for a restart that never came."""
    model = write_model_description(tmp_path / "model", DLRMConfig(tuple([50] * 26)))
    d = DaemonProc({"engines": ["cpu"], "model": str(model)})
    try:
        assert d.proc.wait(60) == 70
        log = d.log()
        summary = next(line for line in log.splitlines() if "no engine could start" in line)
        assert "cpu0 (cpu): cannot load: ArtifactError:" in summary and "no 'files' table" in summary, summary
        assert "exited with code 70" in summary  # still there, after the cause
        assert "restarts in" not in log, log
    finally:
        d.close()


def test_start_up_asks_systemd_for_time_while_engines_load(tmp_path: Path, notify: NotifySocket) -> None:
    """EXTEND_TIMEOUT_USEC while a real CPU engine loads (docs/OPERATIONS.md promised it; nothing sent it),
    STATUS= while loading, and none of it once serving."""
    from test_daemon_cpu import CONFIG

    art = make_cpu_artifact(tmp_path, CONFIG)
    # two CPU engines load at once (import torch, map the model: about 2 s on 2 cores); the first
    # EXTEND_TIMEOUT_USEC goes out at the dispatcher's first tick, once the engines have run at all
    d = DaemonProc({"engines": ["cpu", "cpu"], "model": str(art)}, env={"NOTIFY_SOCKET": notify.path})
    try:
        while d.proc.poll() is None and not any("READY=1" in m for _, m in notify.messages):
            notify.collect(0.1)
        notify.collect(1.5)
        ready = next(i for i, (_, m) in enumerate(notify.messages) if "READY=1" in m)
        before = [m for _, m in notify.messages[:ready]]
        extends = [m for m in before if m.startswith("EXTEND_TIMEOUT_USEC=")]
        assert extends and all(m == "EXTEND_TIMEOUT_USEC=30000000" for m in extends), before
        assert any(m.startswith("STATUS=loading") for m in before)
        assert not any("EXTEND_TIMEOUT_USEC" in m for _, m in notify.messages[ready:])
        assert "STATUS=serving with 2/2 engines" in notify.messages[ready][1]
        assert d.terminate() == 0
    finally:
        d.close()
