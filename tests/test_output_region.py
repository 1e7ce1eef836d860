"""Output regions (wire/output_region.py): engines write predictions into a client's shared memory.

The ring allocator and the batcher's segments as pure logic (property tests), the dispatcher's checks of a
registered file, and a real daemon with null engines writing into a real /dev/shm region.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.batcher import WRITTEN, Batcher, Query, fill_slot, output_segments
from engines.null_backend import null_ref_prediction
from formats.artifact import write_model_description
from formats.dataset import Dataset
from formats.model_config import DLRMConfig
from formats.pairs import pair_index
from test_daemon_support import DaemonProc, make_dataset
from wire.client import Client, PipelinedClient
from wire.errors import BadRequest
from wire.output_region import MappedOutputs, OutputFileError, OutputRegion, OutputRing, check_output_file
from wire.shm import Region, run_prefix


# ---- the ring ----
@settings(max_examples=80, deadline=None)
@given(st.integers(8, 200), st.lists(st.tuples(st.integers(1, 60), st.integers(0, 5)), min_size=1, max_size=60))
def test_ring_never_hands_out_live_room(size: int, steps: list[tuple[int, int]]) -> None:
    ring = OutputRing(size)
    live: dict[int, int] = {}  # offset -> end, as handed out
    for n, free_pick in steps:
        at = ring.allocate(n)
        if at is not None:
            assert 0 <= at and at + n <= size
            for a, e in live.items():
                assert at + n <= a or at >= e, f"[{at}, {at + n}) overlaps live [{a}, {e})"
            live[at] = at + n
        if live and free_pick:  # free one, not always the oldest
            victim = list(live)[free_pick % len(live)]
            ring.free(victim)
            del live[victim]
    for a in list(live):
        ring.free(a)
    assert ring.in_use == 0
    assert ring.allocate(size) == 0  # everything free again: the whole ring


def test_ring_reuses_room_only_behind_the_oldest_live_allocation() -> None:
    ring = OutputRing(100)
    a, b, c = ring.allocate(40), ring.allocate(40), ring.allocate(30)
    assert (a, b, c) == (0, 40, None)  # 30 more do not fit after 80, and nothing is free before
    ring.free(b)  # out of order: a is still live, so b's room is not reusable yet
    assert ring.allocate(30) is None
    ring.free(a)
    assert ring.in_use == 0 and ring.allocate(30) == 0


# ---- what the dispatcher accepts ----
def test_check_output_file(tmp_path: Path) -> None:
    region = OutputRegion(100, shm_dir=tmp_path)
    try:
        check_output_file(str(region.path), 100, shm_dir=tmp_path)
        with pytest.raises(OutputFileError, match="fewer than"):
            check_output_file(str(region.path), 101, shm_dir=tmp_path)
        with pytest.raises(OutputFileError, match="directly under"):
            check_output_file(region.path.name, 10, shm_dir=tmp_path)  # relative
        with pytest.raises(OutputFileError, match="directly under"):
            check_output_file(str(tmp_path / ".." / region.path.name), 10, shm_dir=tmp_path)
        slot_file = tmp_path / (region.path.name[: -len("out")] + "0")  # an engine's slot file's name
        slot_file.write_bytes(b"\0" * 4096)
        with pytest.raises(OutputFileError, match="not named as"):
            check_output_file(str(slot_file), 10, shm_dir=tmp_path)
        link = tmp_path / f"{run_prefix()}out"  # well named, but a link
        link.symlink_to(region.path)
        with pytest.raises(OutputFileError, match="not a regular file"):
            check_output_file(str(link), 10, shm_dir=tmp_path)
        with pytest.raises(OutputFileError, match="No such file"):
            check_output_file(str(tmp_path / f"{run_prefix()}out"), 10, shm_dir=tmp_path)
        with pytest.raises(OutputFileError, match="must be > 0"):
            check_output_file(str(region.path), 0, shm_dir=tmp_path)
    finally:
        region.close()
    assert not region.path.exists()  # the client's close removes its file


# ---- the batcher's segments, with an "engine" writing through MappedOutputs ----
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 30), min_size=1, max_size=5), st.booleans()), min_size=1,
                max_size=8), st.integers(1, 64))
def test_segments_put_each_prediction_where_its_query_asked(queries_spec: list[tuple[list[int], bool]],
                                                            max_batch: int) -> None:
    slots = Region(Path("/dev/shm") / f"{run_prefix()}0", 1, max_batch, owner=True)
    out = OutputRegion(2000)
    maps = MappedOutputs()
    try:
        b = Batcher(max_batch, 10**6, 0.01)
        queries, base, at = [], 1000, 0
        for rid, (counts, to_region) in enumerate(queries_spec):
            s = np.array(base + np.cumsum([0] + counts[:-1]) * 3, np.int64)
            c = np.array(counts, np.int64)
            base += 10_000
            q = Query(b"c", rid, "ds", len(s), int(c.sum()), 0.0, starts=s, counts=c)
            if to_region:
                q.output, q.output_offset = str(out.path), at
                at += q.num_pairs + 7  # gaps: not every region run is adjacent
            queries.append(q)
            b.submit(q)
        answers: dict[int, np.ndarray | None] = {}
        while (batch := b.take(0.0)) is not None:
            slot = slots.slots[0]
            r = fill_slot(batch, slot)
            pairs = pair_index(slot.starts[:r], slot.counts[:r]).astype(np.float32)
            segs = output_segments(batch)
            assert sum(k for _, _, k in segs) in (0, batch.num_pairs)
            pos = 0
            for path, start, k in segs or [("", 0, batch.num_pairs)]:
                (maps.view(path, start, k) if path else slot.out[start:start + k])[:] = pairs[pos:pos + k]
                pos += k
            for q, preds, where in Batcher.complete(batch, slot.out[:batch.num_pairs]):
                answers[q.request_id] = None if where == WRITTEN else preds.copy()
        for q in queries:
            want = pair_index(q.starts, q.counts).astype(np.float32)
            if q.output:
                assert answers[q.request_id] is None
                np.testing.assert_array_equal(out.view(q.output_offset, q.num_pairs), want)
            else:
                np.testing.assert_array_equal(answers[q.request_id], want)
    finally:
        maps.close()
        out.close()
        slots.close()


def test_segments_merge_adjacent_runs_and_skip_answered_queries() -> None:
    def q(rid: int, n: int, output: str = "", offset: int = 0) -> Query:
        return Query(b"c", rid, "ds", 1, n, 0.0, starts=np.array([0], np.int64), counts=np.array([n], np.int64),
                     output=output, output_offset=offset)

    b = Batcher(100, 10**6, 0.01)
    qs = [q(1, 10, "/dev/shm/a", 0), q(2, 5, "/dev/shm/a", 10), q(3, 4), q(4, 6, "/dev/shm/a", 50)]
    for x in qs:
        b.submit(x)
    batch = b.take(0.0)
    assert batch is not None
    assert output_segments(batch) == [("/dev/shm/a", 0, 15), ("", 15, 4), ("/dev/shm/a", 50, 6)]
    qs[3].finished = True  # its client went away: its region may be released, so the slot takes it
    assert output_segments(batch) == [("/dev/shm/a", 0, 15), ("", 15, 10)]
    plain = Batcher(100, 10**6, 0.01)
    plain.submit(q(5, 3))
    only_slot = plain.take(0.0)
    assert only_slot is not None and output_segments(only_slot) == []


# ---- a real daemon ----
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("outreg")
    ds = make_dataset(d / "ds", np.random.default_rng(5).integers(1, 40, size=300))
    art = d / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    proc = DaemonProc({"engines": ["null", "null"], "model": str(art), "max_batch_pairs": 256,
                       "datasets": {"ds": str(ds)}}, env={"DLRM_NULL_FILL": "1"})
    try:
        proc.wait_serving()
        yield proc, Dataset.open(ds)
    finally:
        proc.terminate()


def _maps_of(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_engines_write_predictions_into_the_clients_region(daemon) -> None:  # type: ignore[no-untyped-def]
    proc, ds = daemon
    offsets = np.asarray(ds.sample_offsets, np.int64)
    rng = np.random.default_rng(1)
    region = OutputRegion(100_000)
    control = Client(proc.endpoint, timeout_s=10)
    client = PipelinedClient(proc.endpoint)
    try:
        control.register_output(str(region.path), region.num_predictions)
        requests: dict[int, tuple[np.ndarray, int]] = {}  # rid -> (sample ids, region offset or -1)
        at = 0
        for rid in range(1, 61):
            ids = rng.integers(0, ds.num_samples, size=int(rng.integers(1, 40)))
            pairs = int((offsets[ids + 1] - offsets[ids]).sum())
            if rid % 3:  # two thirds into the region (most over several 256-pair batches), a third in replies
                client.send_by_ref(rid, "ds", ids, None, str(region.path), at)
                requests[rid] = (ids, at)
                at += pairs
            else:
                client.send_by_ref(rid, "ds", ids)
                requests[rid] = (ids, -1)
        got = {}
        end = time.monotonic() + 20
        while len(got) < len(requests) and time.monotonic() < end:
            for r in client.poll(100):
                assert r.error is None, r.error
                got[r.request_id] = r
        assert len(got) == len(requests)
        for rid, (ids, where) in requests.items():
            want = null_ref_prediction(pair_index(offsets[ids], offsets[ids + 1] - offsets[ids]))
            if where >= 0:
                assert got[rid].written and got[rid].predictions is None
                np.testing.assert_array_equal(region.view(where, len(want)), want)
            else:
                assert not got[rid].written
                np.testing.assert_array_equal(got[rid].predictions, want)
        st = control.status()
        assert st["totals"]["queries_written_to_regions"] >= 40
        # both engines wrote into the region: each mapped it
        pids = [e["pid"] for e in st["engines"]]
        assert all(str(region.path) in _maps_of(p) for p in pids), "an engine never mapped the region"

        # what the dispatcher refuses, each with BAD_REQUEST and the reason
        client.send_by_ref(900, "ds", np.array([0, 1]), None, "/dev/shm/nobody-registered-this", 0)
        client.send_by_ref(901, "ds", np.array([0, 1]), None, str(region.path), region.num_predictions - 1)
        errors = {}
        end = time.monotonic() + 10
        while len(errors) < 2 and time.monotonic() < end:
            for r in client.poll(100):
                errors[r.request_id] = r.error
        assert isinstance(errors[900], BadRequest) and "not registered" in str(errors[900])
        assert isinstance(errors[901], BadRequest) and "outside region" in str(errors[901])
        with pytest.raises(BadRequest, match="directly under"):
            control.register_output("relative/path", 10)
        with Client(proc.endpoint, timeout_s=10) as intruder:  # one client cannot take over another's region
            with pytest.raises(BadRequest, match="another client"):
                intruder.register_output(str(region.path), region.num_predictions)
    finally:
        client.close()
        control.close()  # the registering client is gone: the daemon releases the region everywhere
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and any(str(region.path) in _maps_of(p) for p in pids):
            with Client(proc.endpoint, timeout_s=5) as other:  # the dispatcher reads disconnects in its I/O passes
                other.status()
            time.sleep(0.1)
        left = [p for p in pids if str(region.path) in _maps_of(p)]
        assert not left, f"engines {left} still map the region after its client disconnected"
    finally:
        region.close()


def test_unregister_releases_and_refuses_later_use(daemon) -> None:  # type: ignore[no-untyped-def]
    proc, _ = daemon
    region = OutputRegion(1000)
    try:
        with Client(proc.endpoint, timeout_s=10) as c:
            c.register_output(str(region.path), region.num_predictions)
            preds = c.infer_by_ref("ds", np.array([3, 4]))  # an ordinary request is unaffected
            assert len(preds) > 0
            c.unregister_output(str(region.path))
            with pytest.raises(BadRequest, match="not registered"):
                c.unregister_output(str(region.path))
    finally:
        region.close()
    assert not os.path.exists(region.path)


def test_a_region_gone_before_its_first_batch_fails_that_request_clearly(daemon) -> None:  # type: ignore[no-untyped-def]
    """The client removed its file after registering it: the engine cannot map it, and the request gets
    a typed error naming the region (nothing hangs, nothing is lost); the daemon serves on."""
    proc, _ = daemon
    region = OutputRegion(1000)
    control = Client(proc.endpoint, timeout_s=10)
    client = PipelinedClient(proc.endpoint)
    try:
        control.register_output(str(region.path), region.num_predictions)
        region.close()  # unlinked: no engine has mapped it yet
        client.send_by_ref(7, "ds", np.array([0, 1]), None, str(region.path), 0)
        got = []
        end = time.monotonic() + 10
        while not got and time.monotonic() < end:
            got = client.poll(100)
        assert got and got[0].request_id == 7 and got[0].error is not None
        assert "ENGINE_FAILED" in str(got[0].error) and str(region.path) in str(got[0].error)
        assert len(control.infer_by_ref("ds", np.array([2, 3]))) > 0  # still serving
    finally:
        client.close()
        control.close()
