"""daemon/admission.py as pure logic (rates, budgets, decisions), and adaptive admission in a daemon."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.admission import HEADROOM, MIN_SAMPLES, Admission
from wire.client import PipelinedClient
from wire.errors import Overloaded, Timeout
from wire.messages import NO_DEADLINE
from test_daemon_support import DaemonProc, make_dataset


def _run_engine(a: Admission, name: str, batch_pairs: int, service_s: float, batches: int, depth: int,
                t0: float = 0.0) -> float:
    """A simulated engine kept `depth` batches deep: batch i completes at t0 + (i+1) * service_s."""
    t = t0
    for _ in range(depth):
        a.dispatched(name, t, was_idle=False)
    for i in range(batches):
        t = t0 + (i + 1) * service_s
        a.completed(name, batch_pairs, t, still_busy=True)
        a.dispatched(name, t, was_idle=False)
    return t


@given(pairs=st.integers(1, 1 << 19), service_ms=st.floats(0.05, 500.0), depth=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_rate_is_the_busy_rate(pairs: int, service_ms: float, depth: int) -> None:
    a = Admission(0.03, 1 << 19)
    _run_engine(a, "e", pairs, service_ms / 1e3, MIN_SAMPLES + 5, depth)
    rate = a.rate("e").pairs_per_s
    assert rate == pytest.approx(pairs / (service_ms / 1e3), rel=1e-6)


def test_idle_time_is_not_counted_and_unmeasured_engines_admit() -> None:
    a = Admission(0.03, 512)
    assert a.capacity(["e"]) is None  # nothing measured: admit everything
    for i in range(MIN_SAMPLES - 1):  # one batch at a time, long idle gaps between them
        a.dispatched("e", 10.0 * i, was_idle=True)
        a.completed("e", 500, 10.0 * i + 0.005, still_busy=False)
    assert a.capacity(["e"]) is None
    a.dispatched("e", 100.0, was_idle=True)
    a.completed("e", 500, 100.005, still_busy=False)
    assert a.capacity(["e"]) == pytest.approx(100_000)  # 500 pairs / 5 ms, the idle seconds left out
    _run_engine(a, "f", 1000, 0.01, MIN_SAMPLES, 2)
    assert a.capacity(["e", "f"]) == pytest.approx(200_000)
    assert a.capacity(["e", "g"]) is None  # a restarted (unmeasured) engine: admit until measured
    a.forget("f")
    assert a.capacity(["f"]) is None
    a.failed("e", 101.0, still_busy=False)  # a failed batch: no sample
    assert a.rate("e").samples == MIN_SAMPLES


def test_budgets_and_decisions() -> None:
    a = Admission(0.03, 1000)
    assert a.budget(None) == 0.03 and a.budget(0.5) == 0.5 and a.budget(NO_DEADLINE) is None
    assert Admission(0.0, 1000).budget(None) is None  # the daemon's target off; deadlines still count
    cap = 100_000.0  # pairs/s: a 1000-pair batch takes 10 ms
    assert a.refuse(0, 50_000, 0.03, cap) is None  # nothing ahead: always admitted
    assert a.refuse(10_000, 100, None, cap) is None  # no budget
    assert a.refuse(10_000, 100, 0.03, None) is None  # no measurement
    # whole batches: 1,500 pairs ahead + 100 = 2 batches = 20 ms, within 0.85 x 30 ms
    assert a.refuse(1_500, 100, 0.03, cap) is None
    wait = a.refuse(2_500, 100, 0.03, cap)  # 3 batches = 30 ms > 25.5 ms
    assert wait == pytest.approx(0.03) and wait > HEADROOM * 0.03
    assert a.refuse(2_500, 100, 1.0, cap) is None  # a longer deadline admits it


def test_a_twice_overloaded_daemon_refuses_what_would_be_late(tmp_path: Path) -> None:
    """The defaults at 2x load: before, every query was admitted and they waited seconds (p99 15 s in
    bench/overload.py); now the ones that would pass the 30 ms target get OVERLOADED at once, a query
    with a deadline gets TIMEOUT, and throughput work (deadline_s=inf) is never refused."""
    sizes = np.full(200, 100)
    ds = make_dataset(tmp_path / "ds", sizes)
    # 200 pairs per 10 ms batch: 20,000 pairs/s
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "max_batch_pairs": 200,
                    "inflight_batches": 1}, env={"DLRM_NULL_DELAY_S": "0.01"})
    try:
        d.wait_serving()
        pc = PipelinedClient(d.endpoint)
        for rid in range(40):  # measure: throughput work, all admitted
            pc.send_by_ref(rid, "ds", np.array([rid % 200, (rid + 1) % 200]), deadline_s=NO_DEADLINE)
        replies = {}
        while len(replies) < 40:
            for r in pc.poll(5000):
                replies[r.request_id] = r
        assert all(r.error is None for r in replies.values())
        sent: dict[int, float] = {}
        for rid in range(100, 400):  # 300 one-sample queries at once: 30,000 pairs = 1.5 s of work
            pc.send_by_ref(rid, "ds", np.array([rid % 200]))
            sent[rid] = time.monotonic()
        pc.send_by_ref(999, "ds", np.array([3]), deadline_s=0.012)  # one batch takes 10 ms
        pc.send_by_ref(1000, "ds", np.arange(20), deadline_s=NO_DEADLINE)
        out: dict[int, tuple[object, float]] = {}
        end = time.monotonic() + 30
        while len(out) < 302 and time.monotonic() < end:
            for r in pc.poll(200):
                out[r.request_id] = (r.error, time.monotonic() - sent.get(r.request_id, 0.0))
        pc.close()
        st_ = d.status()
    finally:
        d.terminate()
    assert len(out) == 302
    ok = [t for rid, (err, t) in out.items() if rid < 999 and err is None]
    over = [t for rid, (err, t) in out.items() if rid < 999 and isinstance(err, Overloaded)]
    assert len(ok) + len(over) == 300 and len(over) > 200, (len(ok), len(over))
    assert max(over) < 1.0  # refused at once, not after waiting (the admitted ones take ~1 s to drain)
    assert isinstance(out[999][0], Timeout) and "deadline_s" in str(out[999][0])
    assert out[1000][0] is None  # throughput work is never refused for latency
    assert any("latency_target_s" in e for e in st_["recent_errors"])  # the refusal says why
