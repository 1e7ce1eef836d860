"""Latency of one 270-pair query on the CPU engine, for OpenMP wait settings on a loaded host.

    OMP_NUM_THREADS=2 GOMP_SPINCOUNT=30000 .venv/bin/python bench/cpu_tail_latency.py LABEL

Runs CpuBackend on `make demo`'s artifact (var/demo/artifact): one by-value query of 270 pairs every
20 ms for 15 s, and prints p50/p90/p99/max. Start busy processes beside it to load the host
(BENCHMARKS.md "CPU engine on a loaded host"). The environment must be set before torch is imported.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engines.cpu_backend import CpuBackend  # noqa: E402
from formats.dataset import Dataset  # noqa: E402


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "run"
    backend = CpuBackend("var/demo/artifact")
    ds = Dataset.open("var/demo/dataset")
    dense, sparse = np.asarray(ds.dense[:270]), np.asarray(ds.sparse[:270])
    out = np.empty(270, np.float32)
    for _ in range(5):
        backend.infer_by_value(dense, sparse, out)
    lat = []
    end = time.monotonic() + 15
    while time.monotonic() < end:
        t0 = time.perf_counter()
        backend.infer_by_value(dense, sparse, out)
        lat.append(time.perf_counter() - t0)
        time.sleep(0.02)
    ms = np.array(lat) * 1e3
    print(f"{label} threads={torch.get_num_threads()} n={len(ms)} p50={np.percentile(ms, 50):.1f} "
          f"p90={np.percentile(ms, 90):.1f} p99={np.percentile(ms, 99):.1f} max={ms.max():.1f} ms")


if __name__ == "__main__":
    main()
