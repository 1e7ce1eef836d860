"""One engine and it dies: its work waits for the restarted engine instead of failing (issue 14, item 2).
A LoadGen Offline run with the only engine SIGKILLed, or SIGSTOPped (hung, killed by the supervisor),
loses no sample; an engine that cannot load its model again, or none back within
engine_restart_wait_s, fails the waiting work with ENGINE_FAILED (never silently, never forever)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from formats.artifact import write_model_description
from formats.model_config import DLRMConfig
from wire.client import PipelinedClient
from wire.errors import EngineFailed
from test_daemon_support import REPO, DaemonProc, expected_null_by_ref, make_dataset, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _null_art(d: Path) -> Path:
    return write_model_description(d / "art", DLRMConfig((50,) * 26))


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_offline_run_loses_nothing_when_the_only_engine_dies(tmp_path: Path, fault: str) -> None:
    """Before: 592 of 880 samples got ENGINE_FAILED after a SIGKILL, 672 after a SIGSTOP."""
    ds = make_dataset(tmp_path / "ds", np.full(300, 10))
    # 20 batches of 200 pairs at 0.1 s each: the run takes ~2 s of engine time; the fault lands early
    port = _free_port()
    d = DaemonProc({"engines": ["null"], "model": str(_null_art(tmp_path)), "max_batch_pairs": 200,
                    "inflight_batches": 2, "metrics_port": port}, env={"DLRM_NULL_DELAY_S": "0.1"})
    out_dir = tmp_path / "o"
    try:
        pid = d.wait_serving()["engines"][0]["pid"]
        driver = subprocess.Popen(
            [sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Offline", "--dataset", str(ds),
             "--endpoint", d.endpoint, "--target-qps", "100", "--min-duration-s", "0", "--min-query-count",
             "400", "--samples-per-request", "20", "--timeout-s", "2", "--quiet", "--output-dir", str(out_dir)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_for(lambda: d.status()["totals"].get("batches", 0) >= 3, 60, "the run under way")
        os.kill(pid, getattr(signal, fault))  # a stopped engine is hung: the supervisor kills it
        out, err = driver.communicate(timeout=120)
        st = d.status()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        d.close()
    assert driver.returncode == 0, out + err
    samples = int(re.search(r"driver: ([\d,]+) samples", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert samples >= 400 and "errors: 0 samples" in out, out
    engine = st["engines"][0]
    assert engine["pid"] != pid and engine["restarts"] >= 1, engine
    retried = float(re.search(r'^dlrm_batch_retries_total\{engine="null0",gpu="",model="[^"]*"\} (\S+)$', body, re.M).group(1))  # type: ignore[union-attr]
    assert retried >= 1, body  # the batches in flight when it died were queued again
    print(f"{fault}: {samples} samples, 0 errors; engine {engine['state']}, last error {engine['last_error']!r}")


def _send(pc: PipelinedClient, ids: range) -> None:
    for rid in ids:
        pc.send_by_ref(rid, "ds", np.array([rid % 50]))


def _collect(pc: PipelinedClient, n: int, timeout_s: float) -> dict[int, object]:
    replies: dict[int, object] = {}
    end = time.monotonic() + timeout_s
    while len(replies) < n and time.monotonic() < end:
        for r in pc.poll(100):
            replies[r.request_id] = r
    return replies


def test_queries_sent_while_the_only_engine_restarts_are_served(tmp_path: Path) -> None:
    sizes = np.full(50, 4)
    ds = make_dataset(tmp_path / "ds", sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "restart_backoff_s": 1.0})
    try:
        pid = d.wait_serving()["engines"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: d.status()["engines"][0]["state"] != "ready", 10, "the engine to be lost")
        pc = PipelinedClient(d.endpoint)
        _send(pc, range(30))  # no engine serves now: before, each got ENGINE_FAILED at once
        replies = _collect(pc, 30, 30)
        pc.close()
    finally:
        d.close()
    assert len(replies) == 30
    for rid, r in replies.items():
        assert r.error is None, r.error  # type: ignore[attr-defined]
        np.testing.assert_array_equal(r.predictions, expected_null_by_ref(offsets, np.array([rid % 50])))  # type: ignore[attr-defined]


def test_an_engine_that_cannot_load_again_fails_the_waiting_work_at_once(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", np.full(50, 4))
    art = _null_art(tmp_path)
    d = DaemonProc({"engines": ["null"], "model": str(art), "datasets": {"ds": str(ds)}, "restart_backoff_s": 0.5})
    try:
        pid = d.wait_serving()["engines"][0]["pid"]
        shutil.rmtree(art)  # the restarted engine will not find its model
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: d.status()["engines"][0]["state"] != "ready", 10, "the engine to be lost")
        pc = PipelinedClient(d.endpoint)
        t0 = time.monotonic()
        _send(pc, range(10))
        replies = _collect(pc, 10, 30)
        took = time.monotonic() - t0
        pc.close()
    finally:
        d.close()
    assert len(replies) == 10
    errors = [r.error for r in replies.values()]  # type: ignore[attr-defined]
    assert all(isinstance(e, EngineFailed) for e in errors), errors
    assert any("does not exist" in str(e) for e in errors), errors  # the cause, not an exit code
    assert took < 20, took  # at the failed load, not after engine_restart_wait_s (60 s)


def test_no_engine_back_within_the_wait_fails_the_work(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", np.full(50, 4))
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "restart_backoff_s": 30.0,
                    "engine_restart_wait_s": 1.0})
    try:
        pid = d.wait_serving()["engines"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: d.status()["engines"][0]["state"] != "ready", 10, "the engine to be lost")
        pc = PipelinedClient(d.endpoint)
        _send(pc, range(5))
        replies = _collect(pc, 5, 20)
        time.sleep(1.2)
        pc.send_by_ref(99, "ds", np.array([1]))  # after the wait: refused at once
        late = _collect(pc, 1, 10)
        pc.close()
    finally:
        d.close()
    assert len(replies) == 5 and all(isinstance(r.error, EngineFailed) for r in replies.values())  # type: ignore[attr-defined]
    assert all("engine_restart_wait_s=1" in str(r.error) for r in replies.values())  # type: ignore[attr-defined]
    assert isinstance(late[99].error, EngineFailed)  # type: ignore[attr-defined]
