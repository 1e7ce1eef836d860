"""daemon/routing.py: the next batch goes to the engine whose work in flight drains first."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.routing import Candidate, pick


def test_a_slower_engine_gets_less() -> None:
    fast = Candidate("cuda0", inflight_pairs=262_144, inflight_batches=1, pairs_per_s=100e6)  # 2.6 ms left
    slow = Candidate("cuda1", inflight_pairs=131_072, inflight_batches=1, pairs_per_s=20e6)  # 6.6 ms left
    assert pick([fast, slow]) == 0  # fewer pairs, but later done: not the slow one
    assert pick([slow, fast]) == 1
    # unmeasured (just started or restarted): least outstanding pairs, then fewest batches
    assert pick([Candidate("a", 500, 1, None), Candidate("b", 400, 2, 1e6)]) == 1
    assert pick([Candidate("a", 400, 2, None), Candidate("b", 400, 1, None)]) == 1
    assert pick([]) is None


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 4), st.floats(1e3, 1e9)), min_size=1, max_size=8))
def test_picks_the_earliest_drain(rows: list[tuple[int, int, float]]) -> None:
    cands = [Candidate(f"e{i}", p, b, r) for i, (p, b, r) in enumerate(rows)]
    i = pick(cands)
    assert i is not None
    done = [c.inflight_pairs / c.pairs_per_s for c in cands]  # type: ignore[operator]
    assert done[i] == min(done)
