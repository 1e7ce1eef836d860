"""The daemon end to end with null engines: real processes, sockets and shared memory.

Null engines answer by reference with a per-sample value derived from the sample's first pair and
by value with dense[:, 0], so every answer can be checked against an oracle that shares no code with
the dispatcher's batching, splitting and reassembly.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from wire import messages as P
from wire.client import PipelinedClient
from wire.errors import BadRequest, EngineFailed, Overloaded, Timeout
from wire.shm import list_regions
from test_daemon_support import DaemonProc, expected_null_by_ref, guarded, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Path]:
    d = tmp_path_factory.mktemp("dsnull")
    sizes = np.random.default_rng(1).integers(1, 700, size=300)
    ds = make_dataset(d / "ds", sizes)
    art = d / "art"  # a stand-in artifact: the dispatcher reads table_rows, the null engine nothing
    write_model_description(art, DLRMConfig((50,) * 26))
    return ds, np.concatenate([[0], np.cumsum(sizes)]), art


@pytest.fixture(scope="module")
def daemon(data: tuple[Path, np.ndarray, Path]) -> DaemonProc:
    ds, _, art = data
    d = DaemonProc({"engines": ["null", "null"], "model": str(art), "datasets": {"ds": str(ds)},
                    "max_batch_pairs": 1000, "inflight_batches": 2, "max_message_bytes": 1 << 20})
    try:
        d.wait_serving()
        yield d
    finally:
        code = d.terminate()
        assert code == 0, d.log()


def test_by_ref_and_by_value_many_clients(daemon: DaemonProc, data: tuple[Path, np.ndarray, Path]) -> None:
    _, offsets, _ = data
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with daemon.client() as c:
            for _ in range(15):
                ids = rng.integers(0, 300, size=int(rng.integers(1, 12)))
                got = c.infer_by_ref("ds", ids)
                if not np.array_equal(got, expected_null_by_ref(offsets, ids)):
                    failures.append(f"by_ref {ids}")
                n = int(rng.integers(1, 2500))  # > max_batch_pairs: split and reassembled
                dense = rng.random((n, 13), dtype=np.float32)
                sparse = rng.integers(0, 50, size=(n, 26)).astype(np.int32)
                if not np.array_equal(c.infer_by_value(dense, sparse), dense[:, 0]):
                    failures.append(f"by_value n={n}")

    threads = [threading.Thread(target=guarded(worker, failures), args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]


def test_pipelined_many_in_flight(daemon: DaemonProc, data: tuple[Path, np.ndarray, Path]) -> None:
    _, offsets, _ = data
    rng = np.random.default_rng(7)
    queries = {rid: rng.integers(0, 300, size=int(rng.integers(1, 40))) for rid in range(400)}
    before = daemon.status()["totals"]
    pc = PipelinedClient(daemon.endpoint)
    for rid, ids in queries.items():  # a burst of throughput work: held to no latency target
        pc.send_by_ref(rid, "ds", ids, deadline_s=P.NO_DEADLINE)
    got: dict[int, np.ndarray] = {}
    end = time.monotonic() + 60
    while len(got) < len(queries) and time.monotonic() < end:
        for r in pc.poll(100):
            assert r.error is None, r.error
            got[r.request_id] = r.predictions
    pc.close()
    assert len(got) == len(queries)
    for rid, ids in queries.items():
        np.testing.assert_array_equal(got[rid], expected_null_by_ref(offsets, ids))
    after = daemon.status()["totals"]
    # With the queue full, batches are packed to (nearly) max_batch_pairs=1000.
    assert (after["pairs"] - before["pairs"]) / (after["batches"] - before["batches"]) > 800


def _raw(daemon: DaemonProc, frames: list[bytes]) -> P.Error:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.endpoint)
    s.send_multipart(frames)
    assert s.poll(10_000), "no reply"
    reply = P.reply_decoder.decode(s.recv_multipart()[0])
    s.close()
    assert isinstance(reply, P.Error), reply
    return reply


def test_bad_requests_get_typed_errors(daemon: DaemonProc) -> None:
    enc = P.encode
    ids = np.arange(3, dtype=np.int64)
    cases = {
        "garbage": [b"\xff\x00garbage"],
        "truncated": [enc(P.InferByRef(request_id=5, dataset="ds", num_samples=3))],
        "wrong dtype": [enc(P.InferByRef(request_id=6, dataset="ds", num_samples=3, ids_dtype="<i4")),
                        ids.astype(np.int32).tobytes()],
        "wrong shape": [enc(P.InferByRef(request_id=7, dataset="ds", num_samples=4)), ids.tobytes()],
        "id out of range": [enc(P.InferByRef(request_id=8, dataset="ds", num_samples=1)),
                            np.array([300], np.int64).tobytes()],
        "negative id": [enc(P.InferByRef(request_id=9, dataset="ds", num_samples=1)),
                        np.array([-1], np.int64).tobytes()],
        "unknown dataset": [enc(P.InferByRef(request_id=10, dataset="nope", num_samples=3)), ids.tobytes()],
        "oversized": [enc(P.InferByRef(request_id=11, dataset="ds", num_samples=200_000)),
                      np.zeros(200_000, np.int64).tobytes()],
        "sparse out of range": [enc(P.InferByValue(request_id=12, num_pairs=1)),
                                np.zeros((1, 13), np.float32).tobytes(), np.full((1, 26), 50, np.int32).tobytes()],
        "dense shape": [enc(P.InferByValue(request_id=13, num_pairs=2)),
                        np.zeros((1, 13), np.float32).tobytes(), np.zeros((2, 26), np.int32).tobytes()],
        "dense NaN": [enc(P.InferByValue(request_id=14, num_pairs=1)),
                      np.full((1, 13), np.nan, np.float32).tobytes(), np.zeros((1, 26), np.int32).tobytes()],
        "wrong message type": [msgspec.msgpack.encode(["Status", 15])],
    }
    for what, frames in cases.items():
        err = _raw(daemon, frames)
        assert err.code == "BAD_REQUEST", (what, err)
        assert err.message, what
    assert _raw(daemon, cases["wrong dtype"]).request_id == 6  # replies echo the request id
    with daemon.client() as c:
        with pytest.raises(BadRequest, match="dtype"):
            c.infer_by_value(np.zeros((2, 13)), np.zeros((2, 26), np.int32))
        with pytest.raises(BadRequest, match="not a dataset|missing"):
            c.register_dataset("x", "/nonexistent")
        # still serving
        assert len(c.infer_by_ref("ds", np.array([0, 1]))) > 0
    assert daemon.proc.poll() is None


def test_load_unload_and_runtime_register(daemon: DaemonProc, data: tuple[Path, np.ndarray, Path],
                                          tmp_path: Path) -> None:
    ds2 = make_dataset(tmp_path / "ds2", np.array([3, 4, 5]), seed=3)
    with daemon.client() as c:
        c.register_dataset("ds2", str(ds2))
        np.testing.assert_array_equal(c.infer_by_ref("ds2", np.array([2, 0])),
                                      expected_null_by_ref(np.array([0, 3, 7, 12]), np.array([2, 0])))
        c.unload_samples("ds2", np.array([1]))
        with pytest.raises(BadRequest, match="not loaded"):
            c.infer_by_ref("ds2", np.array([1]))
        c.load_samples("ds2", np.array([1]))
        assert len(c.infer_by_ref("ds2", np.array([1]))) == 4
        st = c.status()
    assert st["datasets"]["ds2"] == 3 and {e["state"] for e in st["engines"]} == {"ready"}


def test_one_clients_unload_never_breaks_another(daemon: DaemonProc, tmp_path: Path) -> None:
    """Before: after one LoadGen run unloaded its samples, another client got `sample id 0 of dataset
    'demo' is not loaded (LoadSamples)`. Load state is per client (connection) now."""
    offsets = np.array([0, 3, 7, 12])
    ds3 = make_dataset(tmp_path / "ds3", np.diff(offsets), seed=5)
    with daemon.client() as a, daemon.client() as b:
        a.register_dataset("ds3", str(ds3))
        a.load_samples("ds3", np.arange(3))
        b.load_samples("ds3", np.arange(3))
        a.unload_samples("ds3", np.arange(3))  # run A ends
        with pytest.raises(BadRequest, match="not loaded by this client"):
            a.infer_by_ref("ds3", np.array([0]))
        np.testing.assert_array_equal(b.infer_by_ref("ds3", np.array([0, 2])),  # run B goes on
                                      expected_null_by_ref(offsets, np.array([0, 2])))
        b.unload_samples("ds3", np.array([2]))
        with pytest.raises(BadRequest, match="not loaded"):
            b.infer_by_ref("ds3", np.array([2]))
        a.load_samples("ds3", np.array([2]))  # A's load is A's: B's unload stands
        assert len(a.infer_by_ref("ds3", np.array([2]))) == 5
        with pytest.raises(BadRequest, match="not loaded"):
            b.infer_by_ref("ds3", np.array([2]))
    with daemon.client() as c:  # a new connection starts with every sample servable
        assert len(c.infer_by_ref("ds3", np.array([0, 1, 2]))) == 12


def test_engine_sigkill_under_load_and_hang(daemon: DaemonProc) -> None:
    st = daemon.status()
    victim = st["engines"][0]
    results = {"ok": 0, "failed": 0}
    problems: list[str] = []  # (an assertion inside the thread would not fail the test)
    stop = threading.Event()

    def load() -> None:
        pc = PipelinedClient(daemon.endpoint)
        rid, outstanding = 0, 0
        while not stop.is_set() or outstanding:
            while not stop.is_set() and outstanding < 20:  # closed-loop throughput work
                pc.send_by_ref(rid, "ds", np.arange(rid % 50, rid % 50 + 8), deadline_s=P.NO_DEADLINE)
                rid += 1
                outstanding += 1
            replies = pc.poll(5000)
            if not replies:
                problems.append("a query hung")
                break
            for r in replies:
                outstanding -= 1
                if r.error is None:
                    results["ok"] += 1
                elif isinstance(r.error, EngineFailed):
                    results["failed"] += 1
                else:
                    problems.append(repr(r.error))
        pc.close()

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.5)
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    t.join(30)
    assert not t.is_alive() and results["ok"] > 0 and not problems, problems[:3]
    end = time.monotonic() + 10
    while time.monotonic() < end:
        e0 = daemon.status()["engines"][0]
        if e0["state"] == "ready" and e0["pid"] != victim["pid"]:
            break
        time.sleep(0.1)
    assert e0["state"] == "ready" and e0["restarts"] == victim["restarts"] + 1, e0
    # A hung engine (stopped: no heartbeats) is noticed within about a second and replaced.
    os.kill(e0["pid"], signal.SIGSTOP)
    t0 = time.monotonic()
    while daemon.status()["engines"][0]["pid"] == e0["pid"] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert daemon.status()["engines"][0]["last_error"].startswith("no heartbeat")
    with daemon.client() as c:
        assert len(c.infer_by_ref("ds", np.arange(10))) > 0


def test_sigterm_drains_and_cleans_up(data: tuple[Path, np.ndarray, Path]) -> None:
    ds, offsets, _ = data
    stale = Path("/dev/shm") / f"dlrmd-{os.getuid()}-999999999-{'ab' * 8}-0"
    stale.write_bytes(b"x")  # a region of a crashed run: removed at start
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "max_batch_pairs": 2000,
                    "inflight_batches": 1}, env={"DLRM_NULL_DELAY_S": "0.05"})
    try:
        st = d.wait_serving()
        assert not stale.exists()
        assert list_regions(st["pid"]), "the daemon should own a shared-memory region"
        pc = PipelinedClient(d.endpoint)
        for rid in range(30):
            pc.send_by_ref(rid, "ds", np.array([rid, rid + 1]))
        time.sleep(0.05)
        d.proc.send_signal(signal.SIGTERM)
        got = {}
        end = time.monotonic() + 20
        while len(got) < 30 and time.monotonic() < end:
            for r in pc.poll(200):
                assert r.error is None, r.error
                got[r.request_id] = r.predictions
        assert len(got) == 30
        np.testing.assert_array_equal(got[7], expected_null_by_ref(offsets, np.array([7, 8])))
        pc.send_by_ref(99, "ds", np.array([1]))
        late = pc.poll(2000)
        assert not late or late[0].error.code == "SHUTTING_DOWN"
        pc.close()
        assert d.proc.wait(20) == 0, d.log()
        assert list_regions(st["pid"]) == []
        assert not os.path.exists(d.endpoint[6:])
    finally:
        d.close()


def test_deadline_overload_and_batching(data: tuple[Path, np.ndarray, Path]) -> None:
    ds, offsets, _ = data
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "max_batch_pairs": 5000,
                    "inflight_batches": 1, "max_queue_pairs": 20000, "max_pairs_per_query": 5000},
                   env={"DLRM_NULL_DELAY_S": "0.3"})
    try:
        d.wait_serving()
        pc = PipelinedClient(d.endpoint)
        pc.send_by_ref(0, "ds", np.array([0]))  # occupies the only slot for 0.3 s
        time.sleep(0.05)
        pc.send_by_ref(1, "ds", np.array([1]), deadline_s=0.1)  # cannot be met: TIMEOUT
        for rid in range(2, 8):  # coalesce into one batch behind the busy engine
            pc.send_by_ref(rid, "ds", np.array([rid]))
        big = np.where(np.diff(offsets) > 400)[0][:6]  # < 4200 pairs each; 40 of them overflow the queue
        for rid in range(100, 140):
            pc.send_by_ref(rid, "ds", big)
        replies = {}
        end = time.monotonic() + 30
        while len(replies) < 48 and time.monotonic() < end:
            for r in pc.poll(500):
                replies[r.request_id] = r
        pc.close()
        assert len(replies) == 48
        assert replies[0].error is None
        assert isinstance(replies[1].error, Timeout)
        for rid in range(2, 8):
            np.testing.assert_array_equal(replies[rid].predictions, expected_null_by_ref(offsets, np.array([rid])))
        codes = [type(replies[r].error) for r in range(100, 140)]
        assert Overloaded in codes and type(None) in codes
        st = d.status()
        # 1 + (6 small queries closed together) + the big ones: far fewer batches than queries
        assert st["totals"]["batches"] < st["totals"]["queries"]
    finally:
        assert d.terminate() == 0


def test_engine_load_failure_exits_70(tmp_path: Path) -> None:
    d = DaemonProc({"engines": ["null"], "model": "/nonexistent/artifact"})
    try:
        assert d.proc.wait(30) == 70
        assert "does not exist" in d.log() and "no engine could start" in d.log()
    finally:
        d.close()


def test_async_client_concurrent(daemon: DaemonProc, data: tuple[Path, np.ndarray, Path]) -> None:
    import asyncio

    from wire.client import AsyncClient

    _, offsets, _ = data

    async def go() -> None:
        c = AsyncClient(daemon.endpoint, timeout_s=20)
        idss = [np.array([i, i + 1, 299 - i]) for i in range(50)]
        outs = await asyncio.gather(*(c.infer_by_ref("ds", ids) for ids in idss))
        for ids, out in zip(idss, outs):
            np.testing.assert_array_equal(out, expected_null_by_ref(offsets, ids))
        with pytest.raises(BadRequest):
            await c.infer_by_ref("nope", np.array([1]))
        assert (await c.status())["state"] == "serving"
        c.close()

    asyncio.run(go())
