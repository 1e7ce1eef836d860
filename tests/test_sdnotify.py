"""Notifier against a real AF_UNIX datagram socket bound by the test (path and abstract namespace)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wire.exitcodes import ExitCode
from daemon.sdnotify import Notifier, NotifyError


def _recv(sock: socket.socket) -> dict[str, str]:
    sock.settimeout(5)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    yield sock, path
    sock.close()


def test_messages_over_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready(status="serving\n2 engines")
    msg = _recv(sock)
    assert msg == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "serving 2 engines"}
    n.status("draining")
    assert _recv(sock) == {"STATUS": "draining"}
    n.watchdog()
    assert _recv(sock) == {"WATCHDOG": "1"}
    n.extend_timeout(2.5)
    assert _recv(sock) == {"EXTEND_TIMEOUT_USEC": "2500000"}
    n.stopping()
    assert _recv(sock) == {"STOPPING": "1"}
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"dlrm-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        n.watchdog()
        assert _recv(sock) == {"WATCHDOG": "1"}
    finally:
        sock.close()


def test_unset_socket_is_noop() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    n.ready()
    n.status("x")
    n.watchdog()
    n.stopping()
    assert n.watchdog_interval_s() is None


def test_watchdog_interval_and_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval_s() == 30.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 30.0
    # Meant for another process (e.g. our parent): not ours to ping.
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s() is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_interval_s() is None
    with pytest.raises(ValueError, match="WATCHDOG_USEC"):
        Notifier.from_env({**env, "WATCHDOG_USEC": "soon"})


def test_send_failure_is_typed(tmp_path: Path) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with pytest.raises(NotifyError, match="nobody-listens"):
        n.ready()


def test_relative_address_rejected() -> None:
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        Notifier.from_env({"NOTIFY_SOCKET": "relative/path"})


def test_live_daemon_speaks_the_protocol(tmp_path: Path) -> None:
    """dlrm-daemon (null engines) as systemd would run it: STATUS, READY, WATCHDOG, then STOPPING
    and exit 0 on SIGTERM, all read from the notify socket the test binds."""
    root = Path(__file__).resolve().parent.parent
    run = Path(tempfile.mkdtemp(prefix="dlrm-sd-"))  # short: ipc paths are limited to 107 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(run / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(run / "notify"), "WATCHDOG_USEC": "1000000",
           "RUNTIME_DIRECTORY": str(run / "rt")}
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--engines", "null",
                             "--drain-timeout-s", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=root)
    seen: list[dict[str, str]] = []
    try:
        sock.settimeout(60)
        deadline = time.monotonic() + 60
        # Ready first, then at least two watchdog pings (interval 1 s: pinged every 0.5 s).
        while sum("WATCHDOG" in m for m in seen) < 2 and time.monotonic() < deadline:
            seen.append(_recv(sock))
        ready = [i for i, m in enumerate(seen) if m.get("READY") == "1"]
        assert ready, (seen, (tmp_path / "daemon.log").read_text()[-2000:])
        assert seen[ready[0]]["MAINPID"] == str(proc.pid)
        assert any("STATUS" in m for m in seen)
        assert all(i > ready[0] for i, m in enumerate(seen) if "WATCHDOG" in m)
        proc.send_signal(signal.SIGTERM)
        while "STOPPING" not in seen[-1]:
            seen.append(_recv(sock))
        assert proc.wait(timeout=30) == ExitCode.OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        sock.close()
        shutil.rmtree(run, ignore_errors=True)
