"""A reload's canary: a new engine's predictions on a registered dataset against the plain reference.

Before a reload moves traffic to new engines (daemon/model_swap.py), each one predicts the first pairs of
a registered (calibration) dataset with its backend and with the PyTorch reference of its arithmetic
(engines/reference.py: fp32 MLP for the CPU engine and the GPU's fp16/bf16, the calibrated int8 or fp8
top MLP for those precisions). The largest difference must stay within what that arithmetic allows: the
bounds the GPU tests hold the engines to (tests/test_gpu_backend.py, tests/test_fp8_top_mlp.py). The
serving engine runs the same pairs without the reference, for the optional AUC gate of the reload.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.backend import EngineBackend
from formats.artifact import Artifact
from formats.auc import roc_auc
from formats.dataset import Dataset
from wire import messages as P

# Largest |backend - reference| a healthy engine shows, by engine kind and GPU MLP precision: the GPU
# tests' bounds; fp8 as the CPU simulation's test (tests/test_fp8_top_mlp.py, 0.15): on a sharp random
# model one e4m3 rounding step moves a prediction by up to 0.07-0.08 (bench_engine, H100, 2026-12-07).
TOLERANCE: dict[tuple[P.EngineKind, P.MlpPrecision | None], float] = {
    (P.EngineKind.CPU, None): 1e-4,  # fp32 against fp32, other summation order
    (P.EngineKind.CUDA, P.MlpPrecision.FP16): 4e-3,
    (P.EngineKind.CUDA, P.MlpPrecision.BF16): 3.2e-2,
    (P.EngineKind.CUDA, P.MlpPrecision.INT8): 8e-2,
    (P.EngineKind.CUDA, P.MlpPrecision.FP8): 0.15,
}


def _reference_predict(spec: P.EngineSpec, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    from engines.reference import Fp8MlpReference, Int8MlpReference, Int8Reference

    art = Artifact.open(Path(spec.artifact))
    precision = spec.gpu_mlp_precision if spec.kind is P.EngineKind.CUDA else None
    if precision is P.MlpPrecision.FP8:
        return Fp8MlpReference(art, spec.gpu_part).predict(dense, sparse)
    if precision is P.MlpPrecision.INT8:
        return Int8MlpReference(art, spec.gpu_part).predict(dense, sparse)
    return Int8Reference(art, spec.gpu_part).predict(dense, sparse)


def run_canary(backend: EngineBackend, spec: P.EngineSpec, datasets: dict[str, str], msg: P.RunCanary,
               with_reference: bool) -> P.CanaryDone:
    """The canary of `msg` on this engine; failures come back in CanaryDone.error, never raised."""
    path = datasets.get(msg.dataset)
    if path is None:
        return P.CanaryDone(dataset=msg.dataset, pairs=0, max_abs_diff=float("nan"), tolerance=0.0, auc=None,
                            error=f"dataset {msg.dataset!r} is not registered on engine {spec.name}")
    try:
        ds = Dataset.open(Path(path))
        n = min(int(msg.pairs), ds.num_pairs)
        out = np.empty(n, np.float32)
        backend.infer_by_ref(msg.dataset, np.zeros(1, np.int64), np.full(1, n, np.int64), out)
        if not np.isfinite(out).all():  # a diverged model: NaN or inf weights
            return P.CanaryDone(dataset=msg.dataset, pairs=n, max_abs_diff=float("nan"), tolerance=0.0, auc=None,
                                error=f"non-finite predictions on {int((~np.isfinite(out)).sum())} of {n} canary pairs")
        labels = np.asarray(ds.labels[:n])
        auc = roc_auc(labels, out) if 0 < labels.sum() < n else None
        diff, tolerance = 0.0, float("inf")
        if with_reference and spec.kind is not P.EngineKind.NULL:
            want = _reference_predict(spec, np.asarray(ds.dense[:n]), np.asarray(ds.sparse[:n]))
            diff = float(np.abs(out - want).max()) if n else 0.0
            precision = spec.gpu_mlp_precision if spec.kind is P.EngineKind.CUDA else None
            tolerance = TOLERANCE[(spec.kind, precision)]
        return P.CanaryDone(dataset=msg.dataset, pairs=n, max_abs_diff=diff, tolerance=tolerance, auc=auc)
    except Exception as exc:
        return P.CanaryDone(dataset=msg.dataset, pairs=0, max_abs_diff=float("nan"), tolerance=0.0, auc=None,
                            error=f"{type(exc).__name__}: {exc}")
