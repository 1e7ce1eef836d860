"""Operations: systemd notify sequence, Prometheus metrics from a serving daemon, `dlrm-daemon status`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from wire.shm import list_regions, remove_stale
from test_daemon_support import REPO, DaemonProc, make_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_notify_metrics_and_status_command(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", np.array([5, 7, 9]))
    sock_dir = tempfile.mkdtemp(prefix="dlrmn-", dir="/tmp")
    notify_path = os.path.join(sock_dir, "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(0.2)
    port = _free_port()
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "metrics_port": port},
                   env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"})
    messages: list[str] = []

    def collect(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                messages.append(ns.recv(4096).decode())
            except socket.timeout:
                pass

    try:
        d.wait_serving()
        with d.client() as c:
            for _ in range(3):
                c.infer_by_ref("ds", np.array([0, 2]))
        collect(0.6)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'dlrm_queries_total{kind="by_ref",outcome="ok"} 3.0' in body
        # the null engine has no GPU and no model: empty gpu and model "none"
        assert 'dlrm_engine_up{engine="null0",gpu="",model="none"} 1.0' in body
        assert 'dlrm_engine_info{device="null",engine="null0",gpu="",gpu_name="",model="none"} 1.0' in body
        # One reply-stage observation per batch (3 queries sent one by one: 3 batches).
        assert 'dlrm_stage_latency_seconds_count{engine="null0",gpu="",model="none",stage="reply"} 3.0' in body, body
        from daemon.metrics import daemon_version

        assert f'dlrm_build_info{{model="none",version="{daemon_version()}"}} 1.0' in body \
            or f'dlrm_build_info{{version="{daemon_version()}",model="none"}} 1.0' in body
        assert "process_resident_memory_bytes " in body and "process_open_fds " in body
        out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--endpoint", d.endpoint],
                             capture_output=True, text=True, cwd=REPO, timeout=30,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr
        assert "null0" in out.stdout and "ready" in out.stdout and "ds (3 samples)" in out.stdout
        # Samples 0 and 2 are 5 + 9 pairs, asked 3 times; the null engine reports 26 hot lookups a pair.
        assert f"lookups: {3 * 14 * 26:,} hot (device memory), 0 cold" in out.stdout, out.stdout
        assert "hot-row hit ratio 100.00%" in out.stdout
        assert d.terminate() == 0
        collect(0.3)
    finally:
        d.close()
        ns.close()
        os.unlink(notify_path)
        os.rmdir(sock_dir)
    text = "\n".join(messages)
    assert "STATUS=loading" in text
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert any("WATCHDOG=1" in m for m in messages[ready:])
    assert "STOPPING=1" in messages[-1] or any("STOPPING=1" in m for m in messages[ready:])
    assert not any("WATCHDOG=1" in m for m in messages[:ready])


def test_engines_exit_when_the_dispatcher_is_killed(tmp_path: Path) -> None:
    import signal

    d = DaemonProc({"engines": ["null", "null"]})
    try:
        pids = [e["pid"] for e in d.wait_serving()["engines"]]
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        end = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < end:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.05)
        assert not alive, f"orphaned engines still running: {alive}"
        # The killed dispatcher could not remove its regions; the next start does (as here).
        left = list_regions(d.proc.pid)
        assert len(left) == 2
        assert set(left) <= set(remove_stale())
    finally:
        d.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
