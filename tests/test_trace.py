"""formats.trace: the reference size rule (checked against a literal port of its loop) and I/O."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from formats.trace import REFERENCE_QUANTILES, TraceError, read_trace, reference_sample_sizes, write_trace


def _reference_loop(n: int, seed: int) -> list[int]:
    """The MLCommons loop (criteo.py, class Criteo), scalar draws on the global RandomState."""
    np.random.seed(seed)
    quantile = REFERENCE_QUANTILES
    offsets, qo, done = [], 0, False
    while not done:
        offsets.append(int(qo))
        qs = quantile[np.random.randint(low=0, high=len(quantile))]
        qo = min(qo + qs, n)
        done = qo >= n
    offsets.append(int(qo))
    return offsets


@pytest.mark.parametrize("n", [1, 99, 100, 270, 12345, 100_003])
def test_matches_reference_loop(n: int) -> None:
    assert reference_sample_sizes(n).tolist() == _reference_loop(n, 123)


def test_quantiles_and_mlperf_count() -> None:
    assert len(REFERENCE_QUANTILES) == 20 and REFERENCE_QUANTILES.mean() == 270
    # REFERENCE: the first half of day_23, 89,137,319 pairs, gives 330,067 LoadGen samples.
    off = reference_sample_sizes(89_137_319)
    assert len(off) - 1 == 330_067 and off[-1] == 89_137_319
    sizes = np.diff(off)
    assert set(np.unique(sizes[:-1])) <= set(REFERENCE_QUANTILES.tolist()) and sizes[-1] > 0


def test_zero_pairs() -> None:
    assert reference_sample_sizes(0).tolist() == [0]


def test_round_trip_and_format(tmp_path: Path) -> None:
    off = reference_sample_sizes(5000, seed=7)
    write_trace(tmp_path / "t.txt", off)
    first = (tmp_path / "t.txt").read_text().splitlines()[0]
    assert first == f"0, {off[1]}, {off[1]}"
    np.testing.assert_array_equal(read_trace(tmp_path / "t.txt"), off)
    write_trace(tmp_path / "e.txt", np.zeros(1, np.int64))
    assert read_trace(tmp_path / "e.txt").tolist() == [0]


@pytest.mark.parametrize("text,match", [
    ("0, 5, 5\n5, 9\n", ":2: expected"),
    ("0, 5, 5\n6, 9, 3\n", ":2: .*contiguous"),
    ("0, 5, 4\n", ":1: .*contiguous"),
    ("0, x, 5\n", ":1: non-integer"),
])
def test_bad_trace(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(TraceError, match=match):
        read_trace(tmp_path / "t.txt")
