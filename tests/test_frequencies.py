"""formats.frequencies: byte layout, errors, global order."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from formats.frequencies import FrequencyError, frequency_order, read_row_frequencies, write_row_frequencies


def test_layout_and_round_trip(tmp_path: Path) -> None:
    counts = [np.array([1, 2, 3], np.float32), np.zeros(0, np.float32), np.array([7.5], np.float32)]
    write_row_frequencies(tmp_path / "f.bin", counts)
    raw = (tmp_path / "f.bin").read_bytes()
    # independent encoding of the REFERENCE layout
    expect = struct.pack("<i", 3) + struct.pack("<i3f", 3, 1, 2, 3) + struct.pack("<i", 0) \
        + struct.pack("<if", 1, 7.5)
    assert raw == expect
    back = read_row_frequencies(tmp_path / "f.bin")
    assert [b.tolist() for b in back] == [c.tolist() for c in counts]
    assert all(b.dtype == np.float32 for b in back)


@pytest.mark.parametrize("cut,match", [(2, "table count"), (14, "row count of table 1"),
                                       (10, "rows, file too short")])
def test_truncated(tmp_path: Path, cut: int, match: str) -> None:
    write_row_frequencies(tmp_path / "f.bin", [np.ones(1, np.float32), np.ones(2, np.float32)])
    raw = (tmp_path / "f.bin").read_bytes()
    (tmp_path / "f.bin").write_bytes(raw[:cut] if cut != 10 else raw[:-1])
    with pytest.raises(FrequencyError, match=match):
        read_row_frequencies(tmp_path / "f.bin")


def test_trailing_bytes(tmp_path: Path) -> None:
    write_row_frequencies(tmp_path / "f.bin", [np.ones(2, np.float32)])
    with open(tmp_path / "f.bin", "ab") as f:
        f.write(b"x")
    with pytest.raises(FrequencyError, match="trailing"):
        read_row_frequencies(tmp_path / "f.bin")


def test_frequency_order_normalises_per_table_and_breaks_ties_stably() -> None:
    # table 0 (global rows 0..3): shares .1 .4 .4 .1 ; table 1 (rows 4..5): shares .8 .2
    # table 2 (rows 6..7): all zero
    counts = [np.array([10, 40, 40, 10]), np.array([800, 200]), np.zeros(2)]
    order = frequency_order(counts)
    assert order.tolist() == [4, 1, 2, 5, 0, 3, 6, 7]


def test_frequency_order_random_against_python_sort() -> None:
    rng = np.random.default_rng(1)
    counts = [rng.integers(0, 4, n).astype(np.float32) for n in (5, 17, 3, 40)]
    shares = []
    g = 0
    for c in counts:
        for x in c:
            shares.append((-(float(x) / float(c.sum())), g))
            g += 1
    assert frequency_order(counts).tolist() == [g for _, g in sorted(shares)]
