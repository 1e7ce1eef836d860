"""Read mlperf_log_accuracy.json the way MLCommons tools/accuracy-dlrm.py does, and score it.

Each entry's `data` is hex of float32 [prediction, label] per pair (the script's default mode, the one
this driver writes). Entries are de-duplicated by `qsl_idx`, first one wins, as the script does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from formats.auc import roc_auc

ACCURACY_TARGETS = (0.99, 0.999)


class AccuracyLogError(ValueError):
    """The accuracy log is missing, empty or malformed."""


@dataclass(frozen=True)
class AccuracyResult:
    auc: float
    accuracy: float  # share of pairs with round(prediction) == label, as the script prints
    pairs: int
    samples: int
    predictions: np.ndarray
    labels: np.ndarray
    qsl_indices: np.ndarray  # samples in log order, de-duplicated


def read_accuracy_log(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predictions, labels, qsl_indices) from mlperf_log_accuracy.json."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AccuracyLogError(f"cannot read {path}: {exc}") from exc
    seen: set[int] = set()
    chunks: list[np.ndarray] = []
    order: list[int] = []
    for entry in entries:
        idx = int(entry["qsl_idx"])
        if idx in seen:
            continue
        seen.add(idx)
        order.append(idx)
        data = np.frombuffer(bytes.fromhex(entry["data"]), dtype=np.float32)
        if data.size % 2:
            raise AccuracyLogError(f"{path}: sample {idx} has an odd number of floats ({data.size})")
        chunks.append(data.reshape(-1, 2))
    if not chunks:
        raise AccuracyLogError(f"{path}: no entries")
    both = np.concatenate(chunks)
    return both[:, 0].copy(), both[:, 1].copy(), np.asarray(order, dtype=np.int64)



def score_accuracy_log(path: Path) -> AccuracyResult:
    preds, labels, order = read_accuracy_log(path)
    if np.unique(labels).size < 2:
        raise AccuracyLogError(f"{path}: AUC needs both labels, got only {np.unique(labels).tolist()}")
    auc = roc_auc(labels, preds)
    acc = float(np.mean(np.round(preds) == labels))
    return AccuracyResult(auc, acc, int(preds.size), int(order.size), preds, labels, order)


def auc_report(result: AccuracyResult, fp32_auc: float | None) -> tuple[list[str], bool]:
    """Summary lines, and whether the 99% target is met (True when there is no reference)."""
    lines = [
        f"AUC={100 * result.auc:.3f}% accuracy={100 * result.accuracy:.3f}% over "
        f"{result.pairs:,} pairs in {result.samples:,} samples"
    ]
    if fp32_auc is None:
        lines.append("no --fp32-auc given: ratio to the fp32 reference not checked")
        return lines, True
    ratio = result.auc / fp32_auc
    checks = ", ".join(
        f"{100 * t:g}%: {'PASS' if ratio >= t else 'FAIL'}" for t in ACCURACY_TARGETS
    )
    lines.append(f"AUC ratio to fp32 ({100 * fp32_auc:.3f}%): {100 * ratio:.3f}% ({checks})")
    return lines, ratio >= ACCURACY_TARGETS[0]
