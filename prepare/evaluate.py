"""`dlrm-prepare eval`: offline predictions and ROC AUC of a model over a dataset.

Precision ``int8`` runs the served artifact (``--model``) through ``engines.reference.Int8Reference``
(int8 rows dequantised with the per-table scale, hot/cold placement included). Precision ``fp32``
needs the original fp32 weights: the artifact keeps only int8 tables, so give ``--checkpoint`` (the
``tb00_40M.pt``-style file, memory-mapped by ``engines.model.load_dlrm_checkpoint``, never read
whole); ``--model`` is then optional and, if given, must describe the same tables. Precision
``int8-mlp`` adds the int8 top MLP (kernels.quant_linear's reference chain, engines.reference.
Int8MlpReference) with the artifact's calibration.json (``dlrm-prepare calibrate``);
``--calibration-method`` picks another recorded statistic (max, p99.99, ...) without re-calibrating. Predictions are
written float32 per pair in dataset order (``--out``, a memory-mapped .npy), the AUC is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from formats.dataset import Dataset
from formats.auc import AUCError, roc_auc

Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


class EvalError(ValueError):
    """Bad options or a model/dataset mismatch."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("--dataset", type=Path, required=True, help="dataset directory (dlrm-prepare criteo/synthetic)")
    parser.add_argument("--precision", choices=("fp32", "int8", "int8-mlp", "fp8-mlp"), default="int8",
                        help="int8: the artifact's tables (needs --model); int8-mlp / fp8-mlp: int8 tables and "
                             "an int8 / fp8 e4m3 top MLP (needs a calibrated --model); fp32: the checkpoint's "
                             "(needs --checkpoint)")
    parser.add_argument("--calibration-method", help="int8-mlp / fp8-mlp: use this recorded amax statistic "
                                                     "instead of calibration.json's method (max, p99.9, p99.99, "
                                                     "p99.999)")
    parser.add_argument("--model", type=Path, metavar="ARTIFACT", help="served model artifact directory")
    parser.add_argument("--checkpoint", type=Path,
                        help="fp32 DLRM checkpoint (bare state dict or {'state_dict': ...}), memory-mapped")
    parser.add_argument("--gpu-part", type=float, default=1.0,
                        help="int8: hot share of rows for the placement (predictions do not depend on it)")
    parser.add_argument("--out", type=Path, help="write float32 predictions per pair (.npy) here")
    parser.add_argument("--batch-pairs", type=int, default=32768, help="pairs per forward call")
    parser.add_argument("--samples", type=int, help="evaluate only the first N LoadGen samples")


def make_predictor(precision: str, model: Path | None, checkpoint: Path | None,
                   gpu_part: float = 1.0, calibration_method: str | None = None) -> tuple[Predict, tuple[int, ...]]:
    """(predict function, model table rows) for the chosen precision."""
    if precision in ("int8-mlp", "fp8-mlp"):
        if model is None:
            raise EvalError(f"--precision {precision} needs --model ARTIFACT (calibrated)")
        from engines.reference import Fp8MlpReference, Int8MlpReference
        from formats.artifact import Artifact
        art = Artifact.open(model)
        cal = art.calibration
        if cal is None:
            raise EvalError(f"{model}: no calibration.json: run dlrm-prepare calibrate --model {model} "
                            "--dataset CALIBRATION_DATASET (a training day, not the test day)")
        if calibration_method is not None:
            from prepare.calibrate import with_method
            cal = with_method(cal, calibration_method)
        mref = (Int8MlpReference if precision == "int8-mlp" else Fp8MlpReference)(art, gpu_part, cal)
        return mref.predict, tuple(mref.config.table_rows)
    if calibration_method is not None:
        raise EvalError("--calibration-method applies to --precision int8-mlp and fp8-mlp only")
    if precision == "int8":
        if model is None:
            raise EvalError("--precision int8 needs --model ARTIFACT")
        from engines.reference import Int8Reference
        from formats.artifact import Artifact
        ref = Int8Reference(Artifact.open(model), gpu_part)
        return ref.predict, tuple(ref.config.table_rows)
    if precision != "fp32":
        raise EvalError(f"unknown precision {precision!r}")
    if checkpoint is None:
        raise EvalError("--precision fp32 needs --checkpoint PATH: the artifact holds int8 tables only")
    from engines.reference import Fp32Reference
    fp32 = Fp32Reference(checkpoint)
    rows = tuple(fp32.config.table_rows)
    if model is not None:
        from formats.artifact import read_meta
        art_rows = tuple(int(r) for r in read_meta(model)["table_rows"])
        if art_rows != rows:
            raise EvalError(f"--checkpoint tables {rows} differ from --model tables {art_rows}")
    return fp32.predict, rows


def evaluate(dataset: Dataset, predict: Predict, model_rows: Sequence[int], out: Path | None = None,
             batch_pairs: int = 32768, samples: int | None = None) -> tuple[np.ndarray, float | None]:
    """Predictions (float32, dataset order) for the first ``samples`` samples and their AUC
    (None when the labels hold one class only)."""
    if batch_pairs <= 0:
        raise EvalError("--batch-pairs must be positive")
    rows = np.asarray(model_rows, dtype=np.int64)
    if len(rows) != dataset.sparse.shape[1]:
        raise EvalError(f"model has {len(rows)} tables, dataset {dataset.sparse.shape[1]}")
    n_samples = dataset.num_samples if samples is None else min(samples, dataset.num_samples)
    if n_samples < 0:
        raise EvalError("--samples must be >= 0")
    n = int(dataset.sample_offsets[n_samples])
    preds: np.ndarray
    if out is not None:
        preds = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n,))
    else:
        preds = np.empty(n, np.float32)
    for start in range(0, n, batch_pairs):
        stop = min(n, start + batch_pairs)
        sparse = np.asarray(dataset.sparse[start:stop])
        too_big = sparse >= rows
        if too_big.any():
            r, t = np.argwhere(too_big)[0]
            raise EvalError(f"{dataset.path}: pair {start + int(r)} has id {int(sparse[r, t])} in table "
                            f"{int(t)}, the model's table has {int(rows[t])} rows")
        preds[start:stop] = predict(np.asarray(dataset.dense[start:stop]), sparse)
    if isinstance(preds, np.memmap):
        preds.flush()
    try:
        auc: float | None = roc_auc(np.asarray(dataset.labels[:n]), preds)
    except AUCError:
        auc = None
    return preds, auc


def run(args: argparse.Namespace) -> int:
    predict, rows = make_predictor(args.precision, args.model, args.checkpoint, args.gpu_part,
                                   args.calibration_method)
    ds = Dataset.open(args.dataset)
    t0 = time.perf_counter()
    preds, auc = evaluate(ds, predict, rows, args.out, args.batch_pairs, args.samples)
    dt = time.perf_counter() - t0
    n_samples = ds.num_samples if args.samples is None else min(args.samples, ds.num_samples)
    print(f"{args.precision}: {len(preds)} pairs in {n_samples} samples, {dt:.1f} s "
          f"({len(preds) / max(dt, 1e-9):.0f} pairs/s)")
    print(f"AUC {auc:.6f}" if auc is not None else "AUC undefined (labels hold one class only)")
    if args.out:
        print(f"wrote predictions to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlrm-prepare eval")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except (ValueError, OSError) as exc:
        print(f"dlrm-prepare eval: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
