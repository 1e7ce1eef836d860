"""daemon/memory.py: the idle heap trim runs only when idle and at most once per interval."""
from __future__ import annotations

import pytest

from daemon.memory import IdleTrimmer


def test_idle_trimmer_interval_and_idleness() -> None:
    t = IdleTrimmer(min_interval_s=10.0)
    if t._trim is None:
        pytest.skip("not glibc")
    start = t._last
    t.tick(start + 5, idle=True)
    assert t.trims == 0  # interval not reached
    t.tick(start + 11, idle=False)
    assert t.trims == 0  # busy
    t.tick(start + 11, idle=True)
    assert t.trims == 1 and t.last_trim_s >= 0  # the real malloc_trim ran
    t.tick(start + 15, idle=True)
    assert t.trims == 1
    off = IdleTrimmer(min_interval_s=0.0)
    off.tick(start + 1e6, idle=True)
    assert off.trims == 0


_NOT_READING = """
import json, sys, time, numpy as np, zmq
from wire import messages as M
from wire.client import PipelinedClient
pc = PipelinedClient(sys.argv[1])
s = pc.socket
s.setsockopt(zmq.RCVHWM, 1)  # (takes effect for new pipes: reconnect with it set)
s.disconnect(sys.argv[1]); s.connect(sys.argv[1])
time.sleep(0.3)
for rid in range(int(sys.argv[2])):
    # throughput work (as LoadGen's driver sends): what is tested is the reply bound, not admission, which
    # refused part of 60 M queued pairs as OVERLOADED once the null engine's rate had been measured
    pc.send_by_ref(rid, "ds", np.arange(4), deadline_s=M.NO_DEADLINE)
print("sent", flush=True)
sys.stdin.readline()  # the test measures the dispatcher meanwhile: this client reads nothing
replies = {}
end = time.monotonic() + 60
while len(replies) < int(sys.argv[2]) and time.monotonic() < end:
    for r in pc.poll(200):
        replies[r.request_id] = "ok" if r.error is None else r.error.code
print(json.dumps([replies.get(i, "missing") for i in range(int(sys.argv[2]))]), flush=True)
"""


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_client_that_stops_reading_cannot_grow_the_dispatcher(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Before: a client that stopped reading grew the dispatcher from 49 MB to 430 MB over 1,000
    replies, freed only at its disconnect. Now its unread replies are bounded (here 8 MiB beyond
    ZeroMQ's 16 replies), the rest of its results become CLIENT_NOT_READING errors, nothing is lost,
    and other clients are served meanwhile."""
    import json
    import os
    import subprocess
    import sys
    import time

    import numpy as np

    from test_daemon_support import REPO, DaemonProc, expected_null_by_ref, make_dataset

    sizes = np.full(4, 50_000)  # a request for samples 0..3: 200,000 pairs, an 800 kB reply
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ds = make_dataset(tmp_path / "ds", sizes)
    n = 300  # 240 MB of replies
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "max_client_backlog_bytes": 8 << 20,
                    "max_queue_pairs": 64_000_000,
                    "malloc_trim_interval_s": 0.5})
    try:
        d.wait_serving()
        with d.client() as c:  # warm: the dataset's pages and the reply path
            c.infer_by_ref("ds", np.arange(4))
        before = _rss_bytes(d.proc.pid)
        slow = subprocess.Popen([sys.executable, "-c", _NOT_READING, d.endpoint, str(n)], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert slow.stdout is not None and slow.stdin is not None
        assert slow.stdout.readline().strip() == "sent"
        end = time.monotonic() + 60
        while time.monotonic() < end and d.status()["totals"].get("CLIENT_NOT_READING", 0) < n - 40:
            time.sleep(0.2)
        time.sleep(1.0)  # (a trim of freed heap may run)
        grown = _rss_bytes(d.proc.pid) - before
        with d.client() as other:  # served while the slow client holds its backlog
            np.testing.assert_array_equal(other.infer_by_ref("ds", np.array([1])),
                                          expected_null_by_ref(offsets, np.array([1])))
        st = d.status()
        slow.stdin.write("read\n")
        slow.stdin.flush()
        outcomes = json.loads(slow.stdout.readline())
        slow.wait(30)
    finally:
        d.close()
    assert grown < 64 << 20, f"dispatcher grew {grown / 1e6:.0f} MB"
    assert "missing" not in outcomes  # every request answered
    first_error = outcomes.index("CLIENT_NOT_READING")
    assert 5 <= first_error and set(outcomes[:first_error]) == {"ok"}  # results in order, then the bound
    assert set(outcomes[first_error:]) == {"CLIENT_NOT_READING"}, outcomes
    assert st["totals"]["CLIENT_NOT_READING"] == n - first_error
    print(f"dispatcher grew {grown / 1e6:.1f} MB with {n} unread 800 kB replies; {first_error} results "
          f"delivered, {n - first_error} CLIENT_NOT_READING")
