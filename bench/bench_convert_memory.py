"""Peak RSS of `dlrm-prepare model` on a generated checkpoint of >= 2 GB (streaming conversion).

    .venv/bin/python bench/bench_convert_memory.py --scale 0.025 --dir var/bench_convert

Generates a DLRM_Net state dict with the MLPerf dims and table sizes scaled by --scale (torch.save,
in a child process), random row frequencies, then runs `python -m prepare.cli model` in a child and
reports that child's peak RSS (os.wait4's rusage of that one child).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

GEN = """
import sys, numpy as np, torch
from formats.model_config import DLRMConfig
from engines.model import random_state_dict
from formats.frequencies import write_row_frequencies
c = DLRMConfig.mlperf().scaled(float(sys.argv[1]))
torch.save({"state_dict": random_state_dict(c, seed=0)}, sys.argv[2])
rng = np.random.default_rng(0)
write_row_frequencies(sys.argv[3], [rng.zipf(1.3, size=r).astype(np.float32) for r in c.table_rows])
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.025)
    ap.add_argument("--dir", type=Path, default=Path("var/bench_convert"))
    ap.add_argument("--reuse", action="store_true", help="keep an existing checkpoint of the same scale")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt, freq, out = args.dir / "ckpt.pt", args.dir / "row_frequencies.bin", args.dir / "artifact"
    if not (args.reuse and ckpt.is_file() and freq.is_file()):
        subprocess.run([sys.executable, "-c", GEN, str(args.scale), str(ckpt), str(freq)], check=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from formats.model_config import DLRMConfig

    config = DLRMConfig.mlperf().scaled(args.scale)
    total, largest = config.total_rows, max(config.table_rows)
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "prepare.cli", "model", "--checkpoint", str(ckpt),
                              "--row-frequencies", str(freq), "--out", str(out)])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if child.returncode != 0:
        print(f"conversion failed with exit code {child.returncode}", file=sys.stderr)
        return 1
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    largest_bytes = largest * 128 * 4
    print(f"checkpoint {ckpt.stat().st_size / 2**30:.2f} GiB, {total} rows, largest table {largest} rows "
          f"({largest_bytes / 2**20:.0f} MiB fp32)")
    print(f"conversion: {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB = {peak / largest_bytes:.2f} x largest table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
