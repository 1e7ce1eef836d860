"""GPU engine accuracy on the synthetic test day, against the fp32 AUC and the CPU engine (issue 4).

Needs `make demo`'s work directory (or `python3 -m prepare.demo --dir D`): its artifact, its test-day
dataset and fp32_auc.json. For every pair of the test day it computes the predictions of
  * the CPU engine (engines.cpu_backend: int8 tables, fp32 MLPs),
  * the GPU engine in fp16 with gpu_part 1.0 and 0.3 (hot/cold placement must change no prediction),
  * the GPU engine with the int8 top MLP (calibrated on --calibration-dataset, a preprocessed training
    day: never the test day), gpu_part 1.0,
and prints each one's AUC, its share of the fp32 AUC, and its largest and mean distance to the CPU
engine's predictions. Run on the GPU machine:
  python3 -m prepare.demo --dir /tmp/demo
  python3 -m prepare.cli criteo /tmp/demo/synthetic/day_1 --model /tmp/demo/artifact --out /tmp/demo/calib
  python3 bench/bench_accuracy.py --demo /tmp/demo --calibration-dataset /tmp/demo/calib --out acc.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.cpu_backend import CpuBackend  # noqa: E402
from formats.dataset import Dataset  # noqa: E402
from formats.auc import roc_auc  # noqa: E402


def predict_all(backend: object, dataset: Path, pairs: int) -> np.ndarray:
    out = np.full(pairs, np.nan, dtype=np.float32)
    backend.register_dataset("acc", dataset)  # type: ignore[attr-defined]
    backend.infer_by_ref("acc", np.array([0]), np.array([pairs]), out)  # type: ignore[attr-defined]
    if not np.isfinite(out).all():
        raise RuntimeError("some predictions were not written")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="make demo's work directory")
    ap.add_argument("--calibration-dataset", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from prepare.calibrate import calibrate
    from engines.gpu_backend import GpuBackend
    from formats.artifact import Artifact, write_calibration

    art, ds = args.demo / "artifact", args.demo / "dataset"
    fp32_auc = float(json.loads((args.demo / "fp32_auc.json").read_text())["fp32_auc"])
    data = Dataset.open(ds)
    labels = np.asarray(data.labels, dtype=np.float32)
    n = data.num_pairs
    preds = {"cpu engine (int8 tables, fp32 MLP)": predict_all(CpuBackend(art, 1.0), ds, n)}
    for part in (1.0, 0.3):
        eng = GpuBackend("cuda:0", art, part, max_batch_pairs=65536, mlp_precision="fp16")
        preds[f"gpu fp16, gpu_part {part}"] = predict_all(eng, ds, n)
        eng.close()
    work = Path(tempfile.mkdtemp(prefix="acc_"))
    art8 = work / "artifact"
    shutil.copytree(art, art8)
    write_calibration(art8, calibrate(Artifact.open(art8), Dataset.open(args.calibration_dataset)))
    eng = GpuBackend("cuda:0", art8, 1.0, max_batch_pairs=65536, mlp_precision="int8")
    preds["gpu int8 top MLP, gpu_part 1.0"] = predict_all(eng, ds, n)
    eng.close()
    cpu = preds["cpu engine (int8 tables, fp32 MLP)"]
    rows = []
    print(f"test day: {n:,} pairs; fp32 AUC {fp32_auc:.6f}")
    print(f"{'predictions':38s} {'AUC':>9s} {'of fp32':>8s} {'max|d cpu|':>11s} {'mean|d cpu|':>12s}")
    for name, p in preds.items():
        auc = roc_auc(labels, p)
        d = np.abs(p - cpu)
        rows.append({"name": name, "auc": auc, "share_of_fp32": auc / fp32_auc, "max_abs_diff_vs_cpu": float(d.max()),
                     "mean_abs_diff_vs_cpu": float(d.mean())})
        print(f"{name:38s} {auc:9.6f} {100 * auc / fp32_auc:7.3f}% {d.max():11.2e} {d.mean():12.2e}")
    same = bool(np.array_equal(preds["gpu fp16, gpu_part 1.0"], preds["gpu fp16, gpu_part 0.3"]))
    print(f"gpu_part 1.0 and 0.3 predictions identical: {same}")
    if args.out:
        args.out.write_text(json.dumps({"pairs": n, "fp32_auc": fp32_auc, "rows": rows,
                                        "placement_identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
