"""Batcher logic without sockets: packing, splitting, reassembly, closing rules, deadlines, overload."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.batcher import BY_VALUE_KEY, Batcher, Query, fill_slot
from wire.errors import Overloaded
from wire.shm import Region, list_regions, run_prefix
from formats.pairs import pair_index


def ref_query(rid: int, starts: list[int], counts: list[int], t: float = 0.0, deadline: float | None = None) -> Query:
    s, c = np.array(starts, np.int64), np.array(counts, np.int64)
    return Query(b"c", rid, "ds", len(s), int(c.sum()), t, deadline, starts=s, counts=c)


@pytest.fixture()
def region(tmp_path):  # type: ignore[no-untyped-def]
    r = Region(tmp_path / f"{run_prefix()}0", 2, 64, owner=True)
    yield r
    r.close()
    assert not (tmp_path / r.path.name).exists()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=6), min_size=1, max_size=8),
       st.integers(1, 64))
def test_split_and_reassemble_by_ref(tmp_path_factory, sizes: list[list[int]], max_batch: int) -> None:  # type: ignore[no-untyped-def]
    region = Region(tmp_path_factory.mktemp("r") / f"{run_prefix()}0", 1, max_batch, owner=True)
    try:
        b = Batcher(max_batch, 10**6, 0.01)
        queries, base = [], 1000
        for rid, counts in enumerate(sizes):
            starts = list(base + np.cumsum([0] + counts[:-1]) * 3)  # gaps between samples
            base += 10_000
            queries.append(ref_query(rid, starts, counts))
            b.submit(queries[-1])
        answers: dict[int, np.ndarray] = {}
        while (batch := b.take(0.0)) is not None:
            assert 0 < batch.num_pairs <= max_batch
            slot = region.slots[0]
            r = fill_slot(batch, slot)
            pairs = pair_index(slot.starts[:r], slot.counts[:r])
            assert len(pairs) == batch.num_pairs
            slot.out[:batch.num_pairs] = pairs  # an "engine" answering the pair index
            for q, preds, _ in Batcher.complete(batch, slot.out[:batch.num_pairs]):
                answers[q.request_id] = preds.copy()
        assert b.queued_pairs == 0 and b.queued_queries == 0
        for q in queries:
            np.testing.assert_array_equal(answers[q.request_id], pair_index(q.starts, q.counts).astype(np.float32))
    finally:
        region.close()


def test_by_value_split(region: Region) -> None:
    b = Batcher(64, 1000, 0.01)
    dense = np.arange(100 * 13, dtype=np.float32).reshape(100, 13)
    sparse = np.zeros((100, 26), np.int32)
    b.submit(Query(b"c", 1, BY_VALUE_KEY, 0, 100, 0.0, dense=dense, sparse=sparse))
    out = []
    while (batch := b.take(0.0)) is not None:
        fill_slot(batch, region.slots[0])
        v = region.slots[0]
        v.out[:batch.num_pairs] = v.dense[:batch.num_pairs, 0]
        out += Batcher.complete(batch, v.out[:batch.num_pairs])
    assert len(out) == 1
    np.testing.assert_array_equal(out[0][1], dense[:, 0])


def test_closing_rules_and_keys() -> None:
    b = Batcher(100, 1000, 0.005)
    assert not b.should_close(0.0, engine_idle=True)  # nothing queued
    b.submit(ref_query(1, [0], [10], t=0.0))
    assert b.should_close(0.0, engine_idle=True)  # idle engine: close early
    assert not b.should_close(0.001, engine_idle=False)  # busy engine: wait for more
    assert b.next_wakeup() == pytest.approx(0.005)
    assert b.should_close(0.005, engine_idle=False)  # oldest waited max_queue_delay_s
    b.submit(ref_query(2, [50], [95], t=0.001))
    assert b.should_close(0.001, engine_idle=False)  # a full batch is ready
    b.submit(Query(b"c", 3, BY_VALUE_KEY, 0, 5, 0.002, dense=np.zeros((5, 13), np.float32),
                   sparse=np.zeros((5, 26), np.int32)))
    first = b.take(0.002)
    assert first is not None and first.num_pairs == 100 and first.oldest_arrival == 0.0
    second = b.take(0.002)
    assert second is not None and second.key == "ds" and second.num_pairs == 5  # rest of query 2 only
    third = b.take(0.002)
    assert third is not None and third.key == BY_VALUE_KEY


def test_overload_deadlines_and_retry() -> None:
    b = Batcher(100, 150, 0.005)
    b.submit(ref_query(1, [0], [100], deadline=1.0))
    b.submit(ref_query(2, [0], [50], deadline=0.5))
    with pytest.raises(Overloaded, match="max_queue_pairs"):
        b.submit(ref_query(3, [0], [1]))
    assert [q.request_id for q in b.expire(0.6)] == [2]
    assert b.queued_pairs == 100 and b.queued_queries == 1
    batch = b.take(0.6)
    assert batch is not None and [q.request_id for q, _, _ in batch.pieces] == [1]
    b.submit(ref_query(4, [0], [10]))
    b.retry(batch)  # its engine died: it goes first, once more
    again = b.take(0.7)
    assert again is batch and again.attempts == 2
    assert [q.request_id for q in b.fail(again)] == [1]
    assert b.expire(2.0) == []  # answered queries do not time out again
    rest = b.take(0.7)
    assert rest is not None and rest.pieces[0][0].request_id == 4


def test_stale_region_cleanup(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from wire.shm import remove_stale

    dead = tmp_path / f"dlrmd-{os.getuid()}-999999999-{'cd' * 8}-1"
    live = tmp_path / f"dlrmd-{os.getuid()}-{os.getpid()}-{'ef' * 8}-1"
    other = tmp_path / "unrelated"
    for p in (dead, live, other):
        p.write_bytes(b"")
    assert remove_stale(tmp_path) == [dead]
    assert live.exists() and other.exists()
    assert list_regions(os.getpid(), tmp_path) == [live]
    assert oct(os.stat(Region(tmp_path / f"{run_prefix()}2", 1, 8, owner=True).path).st_mode & 0o777) == "0o600"
