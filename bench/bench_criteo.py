"""Throughput of `dlrm-prepare criteo` TSV parsing (MB/s of TSV), on a generated day file.

    .venv/bin/python -m bench.bench_criteo --mb 200 [--block-mb 8] [--gzip] [--workers N]

Writes a Criteo-like TSV (label, 13 ints with ~20% empty, 26 8-char hex with ~10% empty) to a
temporary directory, then times ``prepare.criteo.preprocess`` into a dataset directory with the
MLPerf table sizes as moduli (parse + transform + write; the page cache holds the input).
"""
from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np

from prepare.criteo import ModuloMap, preprocess

MLPERF_ROWS = [39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346,
               10, 2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36]


def distinct_lines(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        f = [str(int(rng.integers(0, 2)))]
        f += ["" if rng.random() < 0.2 else str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
              for _ in range(13)]
        f += ["" if rng.random() < 0.1 else "%08x" % int(rng.integers(0, 2 ** 32)) for _ in range(26)]
        out.append("\t".join(f))
    return ("\n".join(out) + "\n").encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--block-mb", type=int, default=8)
    ap.add_argument("--gzip", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    unit = distinct_lines(20_000)
    reps = max(1, int(args.mb * 1e6 / len(unit)))
    with tempfile.TemporaryDirectory() as tmp:
        day = Path(tmp) / ("day_0.gz" if args.gzip else "day_0")
        with (gzip.open(day, "wb", compresslevel=1) if args.gzip else open(day, "wb")) as f:
            for _ in range(reps):
                f.write(unit)
        day.read_bytes()  # warm the page cache
        t0, c0 = time.perf_counter(), time.process_time()
        res = preprocess([day], ModuloMap(MLPERF_ROWS), Path(tmp) / "ds",
                         block_bytes=args.block_mb << 20, workers=args.workers)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    mb = res.input_bytes / 1e6
    print(f"{res.lines} lines, {mb:.1f} MB TSV{' (gzip input)' if args.gzip else ''}, "
          f"block {args.block_mb} MiB, {args.workers} threads: {dt:.2f} s wall, {mb / dt:.1f} MB/s, {res.lines / dt / 1e6:.2f} M lines/s; "
          f"CPU time {cpu:.2f} s ({mb / cpu:.1f} MB/s per busy core)")


if __name__ == "__main__":
    main()
