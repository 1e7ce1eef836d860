"""Time `dlrm-prepare synthetic --full-size` (artifact + dataset) and report per-phase rates.

    .venv/bin/python bench/bench_synthetic_fullsize.py --out var/bench_synthetic            # REFERENCE size
    .venv/bin/python bench/bench_synthetic_fullsize.py --scale 0.1 --samples 20480          # quicker

Needs ~24 GB + ~9 GB free disk at full size (checked first). The output is deleted afterwards unless
--keep. Results go to BENCHMARKS.md, section "dlrm-prepare synthetic --full-size".
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formats.model_config import DLRMConfig  # noqa: E402
from formats.artifact import Artifact  # noqa: E402
from formats.dataset import Dataset  # noqa: E402
from prepare.synthetic_fullsize import generate_full_size  # noqa: E402

PAIR_BYTES = 4 + 13 * 4 + 26 * 4  # label + dense + sparse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("var/bench_synthetic"))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=204_800)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    config = DLRMConfig.mlperf().scaled(args.scale)
    need = config.total_rows * (config.embedding_dim + 12) + args.samples * 270 * PAIR_BYTES * 1.05
    args.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out).free
    if free < need * 1.1:
        print(f"need ~{need / 1e9:.1f} GB under {args.out}, only {free / 1e9:.1f} GB free", file=sys.stderr)
        return 2
    try:
        m = generate_full_size(args.out, config, seed=args.seed, samples=args.samples)
        Artifact.open(args.out / "artifact")  # the sampled checksums and sizes must validate
        Dataset.open(args.out / "dataset")
        emb_gb = config.total_rows * config.embedding_dim / 1e9
        ds_gb = m["num_pairs"] * PAIR_BYTES / 1e9
        result = {
            "total_rows": config.total_rows,
            "artifact_GB": round(emb_gb, 2),
            "pairs": m["num_pairs"],
            "samples": m["num_samples"],
            "dataset_GB": round(ds_gb, 2),
            "row_order_s": m["row_order_s"],
            "artifact_s": m["artifact_s"],
            "artifact_GB_per_s": round(emb_gb / m["artifact_s"], 3),
            "dataset_s": m["dataset_s"],
            "dataset_Mpairs_per_s": round(m["num_pairs"] / m["dataset_s"] / 1e6, 3),
            "total_s": m["seconds"],
            "positive_rate": round(m["positive_rate"], 4),
        }
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
