"""Static activation scales for the int8 and fp8 top MLPs (`dlrm-prepare calibrate`), as TensorRT's int8
MLPs do, and the accuracy each GPU MLP precision keeps on the calibration set.

After the scales, the CPU reference of each precision (fp16: engines.reference.Int8Reference, the int8
tables with an fp32 MLP, which the fp16 engine matches to ~1e-3; int8: Int8MlpReference; fp8:
Fp8MlpReference) predicts the calibration pairs, and their AUC as a share of the baseline's (the fp32
checkpoint's with `--checkpoint`, else the int8 tables' with an fp32 MLP) goes into calibration.json
(formats.artifact.AccuracyRecord). The daemon serves an accuracy_target ("99" / "99.9") only with a
precision this record shows keeping it, and `gpu_mlp_precision = "auto"` picks the fastest such one.

The int8 layers of kernels.quant_linear read their inputs (the ReLU outputs of top layers 1..L-2) as
int8 with one per-tensor scale, amax / 127, fixed ahead of time so the engine never syncs on a range.
Here the int8-table reference forward (engines.reference.Int8Reference, fp32 math) runs over a
calibration dataset, which must not be the test day, and records per activation its maximum and high
percentiles (exact: the largest values are kept, not a sample). The chosen method's amax, with every
statistic observed, goes to the artifact's optional calibration.json (formats.artifact.Calibration).

Measured on the demo data (var/demo, `make demo`; calibrated on all 100,000 pairs of training day_1,
evaluated on all 100,000 pairs of test day_2 with `dlrm-prepare eval`): fp32 AUC 0.786144; int8 tables
0.786044 (99.987%); int8 tables + int8 top MLP: max 0.785336 (99.897%, misses 99.9%), p99.999 0.785776
(99.953%), p99.99 0.785830 (99.960%, the default), p99.9 0.785500 (99.918%). One int8 layer at a time
(simulated, the others fp32; AUC ratio): with max, the input of top_l.6 costs the most (0.99945; top_l.2
0.99969, top_l.4 0.99982); with p99.99, top_l.2 (0.99973; top_l.4 0.99982, top_l.6 0.99989).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from formats.artifact import AccuracyRecord, Artifact, Calibration, read_calibration, write_calibration
from formats.auc import AUCError, roc_auc
from formats.dataset import Dataset

PERCENTILES = (99.9, 99.99, 99.999)
METHODS = ("max",) + tuple(f"p{p:g}" for p in PERCENTILES)
# Measured on the demo data (module docstring): max calibration kept 99.90% of the fp32 AUC, p99.99
# 99.96% (the maxima are rare outliers: clipping them costs less than the resolution they waste).
DEFAULT_METHOD = "p99.99"


class CalibrationError(ValueError):
    """Bad calibration options or a dataset that does not fit the model."""


class TailStats:
    """Running maximum and the k largest values of one activation tensor, for exact upper percentiles."""

    def __init__(self, keep: int) -> None:
        self.keep = max(1, keep)
        self.top = torch.empty(0)
        self.count = 0

    def update(self, values: torch.Tensor) -> None:
        flat = values.reshape(-1)
        self.count += flat.numel()
        if self.top.numel() >= self.keep:
            flat = flat[flat > self.top[-1]]  # only values that can enter the kept tail
        merged = torch.cat([self.top, flat])
        k = min(self.keep, merged.numel())
        self.top = torch.topk(merged, k, sorted=True).values

    def percentile(self, p: float) -> float:
        """The value with (100 - p)% of all observed values above it (nearest rank)."""
        rank = max(0, math.ceil(self.count * (100.0 - p) / 100.0) - 1)
        if rank >= self.top.numel():
            raise CalibrationError(f"percentile {p} needs the {rank + 1} largest values, {self.top.numel()} kept")
        return float(self.top[rank])

    def max(self) -> float:
        return float(self.top[0]) if self.top.numel() else 0.0


def observe(artifact: Artifact, dataset: Dataset, pairs: int, batch_pairs: int = 8192) -> dict[str, dict[str, float]]:
    """{method: {layer name: amax}} over the first `pairs` pairs, for every method in METHODS."""
    from engines.reference import Int8Reference

    cfg = artifact.config
    n = min(pairs, dataset.num_pairs)
    if n <= 0:
        raise CalibrationError(f"{dataset.path}: no pairs to calibrate on")
    rows = np.asarray(cfg.table_rows, dtype=np.int64)
    if dataset.sparse.shape[1] != len(rows):
        raise CalibrationError(f"model has {len(rows)} tables, dataset {dataset.sparse.shape[1]}")
    ref = Int8Reference(artifact)
    weights = ref.weights
    n_top = len(cfg.top_mlp)
    # The inputs of the top layers: top_l.0's (the interaction output, signed: its magnitude; the fp8
    # MLP quantizes it) and the ReLU outputs that feed top_l.2 .. (the int8 and fp8 MLPs quantize them).
    names = ["top_l.0"] + [f"top_l.{2 * (i + 1)}" for i in range(n_top - 2)]
    widths = [cfg.interaction_width] + list(cfg.top_mlp[:n_top - 2])
    # Keep enough of the tail for the lowest percentile: (100 - 99.9)% of every activation.
    keep = [math.ceil(n * w * (100.0 - min(PERCENTILES)) / 100.0) + 1 for w in widths]
    stats = [TailStats(k) for k in keep]
    for start in range(0, n, batch_pairs):
        stop = min(n, start + batch_pairs)
        sparse = np.asarray(dataset.sparse[start:stop])
        if (sparse >= rows).any() or (sparse < 0).any():
            r, t = np.argwhere((sparse >= rows) | (sparse < 0))[0]
            raise CalibrationError(f"{dataset.path}: pair {start + int(r)} has id {int(sparse[r, t])} in "
                                   f"table {int(t)}, the model's table has {int(rows[t])} rows")
        with torch.no_grad():
            x = ref.top_input(np.asarray(dataset.dense[start:stop]), sparse)
            stats[0].update(x.abs())
            for i, st in enumerate(stats[1:]):
                x = torch.relu(torch.nn.functional.linear(x, weights[f"top_l.{2 * i}.weight"],
                                                          weights[f"top_l.{2 * i}.bias"]))
                st.update(x)
    observed: dict[str, dict[str, float]] = {"max": {k: s.max() for k, s in zip(names, stats)}}
    for p in PERCENTILES:
        observed[f"p{p:g}"] = {k: s.percentile(p) for k, s in zip(names, stats)}
    return observed


def calibrate(artifact: Artifact, dataset: Dataset, pairs: int | None = None, method: str = DEFAULT_METHOD,
              batch_pairs: int = 8192) -> Calibration:
    """The Calibration of `artifact` on the first `pairs` pairs of `dataset` (all when None)."""
    if method not in METHODS:
        raise CalibrationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n = dataset.num_pairs if pairs is None else min(pairs, dataset.num_pairs)
    observed = observe(artifact, dataset, n, batch_pairs)
    amax = observed[method]
    dead = [k for k, v in amax.items() if not v > 0]
    if dead:
        raise CalibrationError(f"activations {dead} are all zero on {n} pairs: no scale can be set")
    return Calibration(method=method, amax=amax, dataset=str(Path(dataset.path).resolve()), pairs=n,
                       mlp_sha256=str(artifact.meta["files"]["mlp.npz"]["sha256"]), observed=observed)


def measure_accuracy(artifact: Artifact, dataset: Dataset, calibration: Calibration, pairs: int | None = None,
                     checkpoint: Path | None = None, batch_pairs: int = 32768) -> AccuracyRecord:
    """AUC of the fp16, int8 and fp8 MLP precisions (their CPU references, with `calibration`) and of
    the baseline over the first `pairs` pairs of `dataset` (all when None)."""
    from engines.reference import Fp8MlpReference, Fp32Reference, Int8MlpReference, Int8Reference

    n = dataset.num_pairs if pairs is None else min(pairs, dataset.num_pairs)
    labels = np.asarray(dataset.labels[:n])
    if n == 0 or labels.min() == labels.max():
        raise CalibrationError(f"{dataset.path}: the first {n} pairs hold one label class: no AUC to measure")
    predictors = {"fp16": Int8Reference(artifact).predict,
                  "int8": Int8MlpReference(artifact, 1.0, calibration).predict,
                  "fp8": Fp8MlpReference(artifact, 1.0, calibration).predict}
    if checkpoint is not None:
        predictors["fp32"] = Fp32Reference(checkpoint).predict
    auc: dict[str, float] = {}
    for name, predict in predictors.items():
        preds = np.empty(n, np.float32)
        for start in range(0, n, batch_pairs):
            stop = min(n, start + batch_pairs)
            preds[start:stop] = predict(np.asarray(dataset.dense[start:stop]), np.asarray(dataset.sparse[start:stop]))
        try:
            auc[name] = roc_auc(labels, preds)
        except AUCError as exc:
            raise CalibrationError(f"AUC of {name}: {exc}") from exc
    baseline = "fp32" if checkpoint is not None else "int8-tables"
    base_auc = auc.pop("fp32") if checkpoint is not None else auc["fp16"]
    return AccuracyRecord(baseline=baseline, baseline_auc=base_auc, auc=auc, pairs=n)


def with_method(calibration: Calibration, method: str) -> Calibration:
    """The same calibration with another observed method's amax (no re-run)."""
    if method not in calibration.observed:
        raise CalibrationError(f"method {method!r} not observed; have {sorted(calibration.observed)}")
    # (the accuracy record was measured with the other method's scales: it does not carry over)
    return Calibration(method, dict(calibration.observed[method]), calibration.dataset, calibration.pairs,
                       calibration.mlp_sha256, calibration.observed, None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("--model", type=Path, required=True, metavar="ARTIFACT",
                        help="artifact directory; calibration.json is written into it")
    parser.add_argument("--dataset", type=Path, required=True,
                        help="calibration dataset (a training day, never the test day)")
    parser.add_argument("--pairs", type=int, help="use the first N pairs (default: all)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help="amax statistic the engine uses (all are recorded)")
    parser.add_argument("--batch-pairs", type=int, default=8192, help="pairs per forward call")
    parser.add_argument("--checkpoint", type=Path,
                        help="the fp32 checkpoint: accuracy as a share of its AUC (default: of the int8 tables "
                             "with an fp32 MLP)")
    parser.add_argument("--eval-pairs", type=int,
                        help="measure each precision's AUC on the first N pairs (default: the --pairs used)")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="scales only; the daemon then serves no int8/fp8 profile from this artifact")


def run(args: argparse.Namespace) -> int:
    if args.pairs is not None and args.pairs <= 0:
        raise CalibrationError("--pairs must be positive")
    art = Artifact.open(args.model)
    ds = Dataset.open(args.dataset)
    t0 = time.perf_counter()
    cal = calibrate(art, ds, args.pairs, args.method, args.batch_pairs)
    if not args.no_accuracy:
        eval_pairs = args.eval_pairs if args.eval_pairs is not None else cal.pairs
        acc = measure_accuracy(art, ds, cal, eval_pairs, args.checkpoint)
        cal = dataclasses.replace(cal, accuracy=acc)
        print(f"AUC on {acc.pairs} pairs of the calibration set, as a share of {acc.baseline} "
              f"({acc.baseline_auc:.6f}): " + ", ".join(
                  f"{p} {100 * (acc.ratio(p) or 0):.3f}%" for p in acc.auc))
    write_calibration(args.model, cal)
    read_calibration(args.model)  # what the engine will read back
    print(f"calibrated on {cal.pairs} pairs of {cal.dataset} in {time.perf_counter() - t0:.1f} s")
    for method, amax in cal.observed.items():
        mark = "*" if method == cal.method else " "
        print(f" {mark} {method:<8} " + "  ".join(f"{k} {v:.4g}" for k, v in amax.items()))
    print(f"wrote {Path(args.model) / 'calibration.json'} (method {cal.method})")
    return 0
