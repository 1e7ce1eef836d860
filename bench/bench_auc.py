"""Memory and time of the exact AUC (prepare/auc.py) on 100 M pairs with many tied scores.

    .venv/bin/python bench/bench_auc.py [--pairs 100000000]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from formats.auc import roc_auc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=100_000_000)
    n = parser.parse_args().pairs
    rng = np.random.default_rng(0)
    labels = (rng.random(n, dtype=np.float32) < 0.25).astype(np.float32)
    scores = np.round(labels * np.float32(0.3) + rng.random(n, dtype=np.float32), 3)  # many ties
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    auc = roc_auc(labels, scores)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"AUC {auc:.6f} over {n:,} pairs in {seconds:.1f} s; peak RSS {peak / 2**20:.2f} GiB "
          f"(inputs {(labels.nbytes + scores.nbytes) / 2**30:.2f} GiB; RSS before the call {before / 2**20:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
