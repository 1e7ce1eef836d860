"""engines/cold_rows.py: a batch's cold lookups planned on the host, against a brute-force walk of its pairs.

The GPU engine that uses the plan (cold_gather "host") is tested against the int8 reference in
tests/test_gpu_backend.py (gpu marker); here the plan itself, for any positions, ranges (repeated and
overlapping, as LoadGen may issue a sample twice), capacity and chunking.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engines.cold_rows import ColdLookups, ColdPlan, gather_rows


def _brute_plan(positions: np.ndarray, first_cold: int, starts: list[int], counts: list[int],
                capacity: int) -> tuple[list[int], list[int], int]:
    tables = positions.shape[1]
    rows, flat = [], []
    batch_row = 0
    for s, c in zip(starts, counts):
        for p in range(s, s + c):
            for t in range(tables):
                if positions[p, t] >= first_cold:
                    rows.append(int(positions[p, t]) - first_cold)
                    flat.append(batch_row * tables + t)
            batch_row += 1
    return rows[:capacity], flat[:capacity], len(rows)


@st.composite
def _cases(draw: st.DrawFn) -> tuple:
    pairs = draw(st.integers(1, 60))
    tables = draw(st.integers(1, 6))
    total_rows = draw(st.integers(2, 50))
    first_cold = draw(st.integers(0, total_rows))
    seed = draw(st.integers(0, 2**31))
    positions = np.random.default_rng(seed).integers(0, total_rows, (pairs, tables)).astype(np.int32)
    ranges = draw(st.lists(st.tuples(st.integers(0, pairs - 1), st.integers(0, 8)), min_size=0, max_size=12))
    starts = [s for s, _ in ranges]
    counts = [min(c, pairs - s) for s, c in ranges]
    capacity = draw(st.integers(0, 3 * pairs * tables))
    chunk = draw(st.integers(1, pairs))
    return positions, first_cold, starts, counts, capacity, chunk


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_plan_matches_walking_every_pair(case: tuple) -> None:
    positions, first_cold, starts, counts, capacity, chunk = case
    tables = positions.shape[1]
    whole = ColdLookups.from_positions(positions, first_cold)
    # the same index built chunk by chunk, as the engine builds it from its device copy
    chunks = []
    for a in range(0, positions.shape[0], chunk):
        part = positions[a : a + chunk].reshape(-1)
        flat = np.flatnonzero(part >= first_cold)
        chunks.append((a, flat, part[flat].astype(np.int64) - first_cold))
    chunked = ColdLookups.from_chunks(chunks, tables, positions.shape[0])
    want_rows, want_flat, want_total = _brute_plan(positions, first_cold, starts, counts, capacity)
    for index in (whole, chunked):
        plan = index.plan(np.array(starts, dtype=np.int64), np.array(counts, dtype=np.int64), capacity)
        assert plan.total == want_total
        assert plan.rows.tolist() == want_rows
        assert plan.flat.tolist() == want_flat
        assert plan.staged == len(want_rows)


def test_gather_rows_copies_the_planned_rows_in_order() -> None:
    rng = np.random.default_rng(5)
    cold = rng.integers(-127, 128, (1000, 128)).astype(np.int8)
    plan = ColdPlan(np.array([7, 999, 0, 7], dtype=np.int64), np.arange(4, dtype=np.int64), 4)
    out = np.zeros((8, 128), dtype=np.int8)
    view = gather_rows(cold, plan, out)
    assert view.shape == (4, 128)
    np.testing.assert_array_equal(out[:4], cold[[7, 999, 0, 7]])
    assert not out[4:].any()
    with pytest.raises(ValueError, match="does not fit"):
        gather_rows(cold, plan, out[:3])


def test_index_refuses_pairs_out_of_order_and_bad_table_counts() -> None:
    with pytest.raises(ValueError, match="pair order"):
        ColdLookups.from_chunks([(10, np.array([0]), np.array([1])), (0, np.array([0]), np.array([1]))], 4, 20)
    with pytest.raises(ValueError, match="within"):
        ColdLookups.from_chunks([(19, np.array([4]), np.array([1]))], 4, 20)
    with pytest.raises(ValueError, match="tables"):
        ColdLookups.from_chunks([], 0, 1)


def test_no_cold_rows_plans_nothing() -> None:
    positions = np.arange(12, dtype=np.int32).reshape(4, 3)
    index = ColdLookups.from_positions(positions, 100)
    plan = index.plan(np.array([0, 2]), np.array([2, 2]), 1 << 20)
    assert (plan.total, plan.staged, index.count) == (0, 0, 0)


def test_config_key_reaches_the_engine_spec_type(tmp_path: Path) -> None:
    from daemon.config import ConfigError, load_config
    from wire.messages import ColdRowGather, EngineSpec

    assert load_config(None, {"engines": ["null"]}, {}).cold_row_gather is ColdRowGather.KERNEL
    cfg = tmp_path / "d.toml"
    cfg.write_text('cold_row_gather = "host"\nengines = ["null"]\n')
    assert load_config(cfg, {}, {}).cold_row_gather is ColdRowGather.HOST
    assert load_config(None, {}, {"DLRM_COLD_ROW_GATHER": "host", "DLRM_ENGINES": "null"}).cold_row_gather \
        is ColdRowGather.HOST
    with pytest.raises(ConfigError):
        load_config(None, {}, {"DLRM_COLD_ROW_GATHER": "device", "DLRM_ENGINES": "null"})
    assert "cold_row_gather" in EngineSpec.__struct_fields__


def test_gather_rows_split_over_threads_gives_the_same_rows() -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(9)
    cold = rng.integers(-127, 128, (50_000, 128)).astype(np.int8)
    rows = rng.integers(0, cold.shape[0], 20_001).astype(np.int64)
    plan = ColdPlan(rows, np.arange(rows.size, dtype=np.int64), rows.size)
    alone = gather_rows(cold, plan, np.zeros((rows.size, 128), np.int8)).copy()
    with ThreadPoolExecutor(3) as pool:
        split = gather_rows(cold, plan, np.zeros((rows.size + 5, 128), np.int8), pool, 3,
                            min_rows_per_task=1000)
    np.testing.assert_array_equal(alone, cold[rows])
    np.testing.assert_array_equal(split, alone)
