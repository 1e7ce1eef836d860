"""prepare.criteo: vectorised TSV parsing against a plain per-line Python parser, and the CLI."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from formats.dataset import Dataset
from formats.frequencies import read_row_frequencies
from formats.trace import reference_sample_sizes, write_trace
from prepare import criteo
from prepare.criteo_parse import CriteoFormatError, parse_block

ROWS = [97, 5, 1000, 3] + [50] * 22


def make_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        f = [str(int(rng.integers(0, 2)))]
        for _ in range(13):
            r = rng.random()
            f.append("" if r < 0.2 else str(int(rng.integers(-3, 0))) if r < 0.3
                     else str(int(rng.integers(0, 10 ** int(rng.integers(1, 9))))))
        for _ in range(26):
            f.append("" if rng.random() < 0.1 else "%08x" % int(rng.integers(0, 2 ** 32)))
        lines.append("\t".join(f))
    return lines


def py_parse(lines: list[str], rows: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent per-line reference (what the reference data_utils does, line by line)."""
    lab, den, sp = [], [], []
    for ln in lines:
        f = ln.split("\t")
        lab.append(float(f[0]))
        den.append([math.log(max(0, int(x or 0)) + 1) for x in f[1:14]])
        sp.append([int(x or "0", 16) % r for x, r in zip(f[14:], rows)])
    return (np.array(lab, np.float32), np.array(den, np.float32), np.array(sp, np.int32))


def test_parse_block_matches_python() -> None:
    lines = make_lines(300)
    blk = parse_block(("\n".join(lines) + "\n").encode(), "x", 1, False)
    lab, den, sp = py_parse(lines, ROWS)
    np.testing.assert_array_equal(blk.labels, lab)
    np.testing.assert_allclose(criteo.dense_transform(blk.ints), den, rtol=1e-6)
    np.testing.assert_array_equal(criteo.ModuloMap(ROWS)(blk.cats), sp)


def test_hex_edge_values() -> None:
    cats = ["ffffffffffffffff", "A0", "", "0"] + ["1"] * 22
    line = "\t".join(["1"] + ["-7"] + [""] * 12 + cats) + "\r\n"
    blk = parse_block(line.encode(), "x", 1, False)
    assert blk.cats[0, :4].tolist() == [2 ** 64 - 1, 160, 0, 0]
    assert blk.ints[0, 0] == -7 and criteo.dense_transform(blk.ints)[0, 0] == 0.0


@pytest.mark.parametrize("bad,reason", [
    (lambda f: f[:-1], "wrong field count: 39 fields"),
    (lambda f: f + ["1"], "wrong field count: 41 fields"),
    (lambda f: f[:20] + ["12g4"] + f[21:], "field 21 .categorical feature 6. is not a hex"),
    (lambda f: f[:3] + ["1.5"] + f[4:], "field 4 .integer feature 2. is not an integer"),
    (lambda f: f[:3] + ["-"] + f[4:], "field 4 .integer feature 2. is not an integer"),
    (lambda f: ["2"] + f[1:], "label is not 0 or 1"),
])
def test_malformed_line_reports_file_line_reason(tmp_path: Path, bad, reason: str) -> None:
    lines = make_lines(5)
    lines[3] = "\t".join(bad(lines[3].split("\t")))
    p = tmp_path / "day_0"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(CriteoFormatError, match=f"day_0:4: {reason}"):
        criteo.preprocess([p], criteo.ModuloMap(ROWS), tmp_path / "out", block_bytes=64, workers=2)
    assert not (tmp_path / "out" / "meta.json").exists()
    res = criteo.preprocess([p], criteo.ModuloMap(ROWS), tmp_path / "out", skip_bad=True)
    assert res.bad_lines == 1 and res.num_pairs == 4 and "day_0:4:" in res.first_bad[0]
    ds = Dataset.open(tmp_path / "out")
    np.testing.assert_array_equal(ds.sparse, py_parse(lines[:3] + lines[4:], ROWS)[2])


def test_cli_gzip_blocks_trace_and_frequencies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines = make_lines(700, seed=3)
    plain = tmp_path / "day_0"
    plain.write_text("\n".join(lines[:400]) + "\n")
    gz = tmp_path / "day_1.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(lines[400:]))   # no trailing newline
    rows = ",".join(map(str, ROWS))
    # tiny blocks exercise the carry-over between reads
    res = criteo.preprocess([plain, gz], criteo.ModuloMap(ROWS), tmp_path / "ds",
                            freq_out=tmp_path / "f.bin", block_bytes=1000, workers=3)
    assert res.num_pairs == 700 and res.lines == 700
    ds = Dataset.open(tmp_path / "ds")
    lab, den, sp = py_parse(lines, ROWS)
    np.testing.assert_array_equal(ds.labels, lab)
    np.testing.assert_allclose(ds.dense, den, rtol=1e-6)
    np.testing.assert_array_equal(ds.sparse, sp)
    np.testing.assert_array_equal(ds.sample_offsets, reference_sample_sizes(700))
    freqs = read_row_frequencies(tmp_path / "f.bin")
    for t in range(26):
        np.testing.assert_array_equal(freqs[t], np.bincount(sp[:, t], minlength=ROWS[t]))
    # CLI: --first-half with a given trace
    write_trace(tmp_path / "t.txt", np.array([0, 100, 350]))
    assert criteo.main([str(plain), str(gz), "--out", str(tmp_path / "h"), "--table-rows", rows,
                        "--first-half", "--trace", str(tmp_path / "t.txt")]) == 0
    h = Dataset.open(tmp_path / "h")
    assert h.num_pairs == 350 and h.sample_offsets.tolist() == [0, 100, 350]
    assert "wrote 350 pairs in 2 samples" in capsys.readouterr().out
    # a trace that does not cover the data is an error
    assert criteo.main([str(plain), "--out", str(tmp_path / "x"), "--table-rows", "7",
                        "--trace", str(tmp_path / "t.txt")]) == 1
    assert "covers 350 pairs, the data has 400" in capsys.readouterr().err


def test_dictionary_days_first_appearance_order(tmp_path: Path) -> None:
    lines = make_lines(200, seed=5)
    a, b = tmp_path / "day_0", tmp_path / "day_1"
    a.write_text("\n".join(lines[:120]) + "\n")
    b.write_text("\n".join(lines[120:]) + "\n")
    dmap = criteo.build_dictionaries([a, b], max_ind_range=1000, skip_bad=False, block_bytes=3000,
                                     workers=4)
    res = criteo.preprocess([b], dmap, tmp_path / "ds")
    # independent reference: python dicts in insertion order over both days
    dicts: list[dict[int, int]] = [{} for _ in range(26)]
    for ln in lines:
        for t, x in enumerate(ln.split("\t")[14:]):
            dicts[t].setdefault(int(x or "0", 16) % 1000, len(dicts[t]))
    expect = [[dicts[t][int(x or "0", 16) % 1000] for t, x in enumerate(ln.split("\t")[14:])]
              for ln in lines[120:]]
    ds = Dataset.open(tmp_path / "ds")
    assert res.num_pairs == 80 and ds.table_rows == tuple(len(d) for d in dicts)
    np.testing.assert_array_equal(ds.sparse, np.array(expect, np.int32))
    with pytest.raises(criteo.CriteoError, match="not in the dictionary"):
        only_a = criteo.build_dictionaries([a], 1000, False)
        criteo.preprocess([b], only_a, tmp_path / "ds2")


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "d"
    p.write_text("\n".join(make_lines(3)) + "\nbroken line\n")
    assert criteo.main([str(p), "--out", str(tmp_path / "o"), "--table-rows", "10"]) == 1
    assert "d:4: wrong field count: 1 fields" in capsys.readouterr().err
    assert criteo.main([str(p), "--out", str(tmp_path / "o"), "--table-rows", "10",
                        "--skip-bad-lines"]) == 0
    assert "skipped 1 malformed lines" in capsys.readouterr().out
    assert criteo.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                        "--table-rows", "10"]) == 1
    assert "no such file" in capsys.readouterr().err
