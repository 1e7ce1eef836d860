"""Host cost of cold_row_gather "host" per batch: the plan (engines/cold_rows.py) and the row copy.

A cold table of --cold-gb in host memory (random rows: every read a cache and TLB miss, as in an 18 GB
table), a dataset of --pairs pairs with --cold-share of its lookups cold, batches of whole samples (~270
pairs each, reference sizes) adding up to --batch-pairs; the plan and the copy into a staging buffer are
timed per batch with 1 and with --threads threads. The GPU batch these must hide behind takes ~2 ms
(262,144 pairs at 127 M pairs/s, fp8, H100: BENCHMARKS.md).

    python3 bench/bench_cold_rows.py --cold-gb 4 --pairs 5000000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.cold_rows import ColdLookups, gather_rows  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold-gb", type=float, default=4.0)
    ap.add_argument("--pairs", type=int, default=5_000_000)
    ap.add_argument("--cold-share", type=float, default=0.0054, help="0.54%%: gpu_part 0.3, full size (round 4)")
    ap.add_argument("--batch-pairs", type=int, default=262_144)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(3)
    tables, dim = 26, 128
    rows = int(args.cold_gb * 1e9) // dim
    cold = np.empty((rows, dim), dtype=np.int8)
    for a in range(0, rows, 1 << 22):  # touched, so every page is resident before timing
        cold[a : a + (1 << 22)] = rng.integers(-127, 128, (min(1 << 22, rows - a), dim), dtype=np.int8)
    n_cold = int(args.pairs * tables * args.cold_share)
    flat = np.sort(rng.choice(args.pairs * tables, n_cold, replace=False)).astype(np.int64)
    index = ColdLookups.from_chunks([(0, flat, rng.integers(0, rows, n_cold))], tables, args.pairs)
    sizes = rng.integers(100, 441, args.pairs // 100)  # samples of ~270 pairs
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    offsets = offsets[offsets <= args.pairs]
    capacity = args.batch_pairs * tables // 16
    out = np.empty((capacity, dim), dtype=np.int8)
    result: dict = {"cold_gb": args.cold_gb, "pairs": args.pairs, "cold_share": args.cold_share,
                    "batch_pairs": args.batch_pairs, "index_mb": index.nbytes / 1e6}
    for threads in (1, args.threads):
        pool = ThreadPoolExecutor(threads) if threads > 1 else None
        plan_ms, copy_ms, staged = [], [], []
        for _ in range(args.batches):
            # random whole samples, as LoadGen issues them, up to the batch size
            pick = rng.integers(0, offsets.size - 1, args.batch_pairs // 200)
            starts, counts = offsets[pick], offsets[pick + 1] - offsets[pick]
            keep = int(np.searchsorted(np.cumsum(counts), args.batch_pairs, side="right"))
            starts, counts = starts[:keep], counts[:keep]
            t0 = time.perf_counter()
            plan = index.plan(starts, counts, capacity)
            t1 = time.perf_counter()
            gather_rows(cold, plan, out, pool, threads)
            t2 = time.perf_counter()
            plan_ms.append((t1 - t0) * 1e3)
            copy_ms.append((t2 - t1) * 1e3)
            staged.append(plan.staged)
        if pool is not None:
            pool.shutdown()
        row = {"threads": threads, "plan_ms": float(np.median(plan_ms)), "copy_ms": float(np.median(copy_ms)),
               "rows_per_batch": float(np.mean(staged))}
        result[f"threads_{threads}"] = row
        print(f"threads {threads}: {row['rows_per_batch']:.0f} cold rows a batch; plan {row['plan_ms']:.3f} ms, "
              f"copy {row['copy_ms']:.3f} ms (median of {args.batches})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
