"""Exact ROC AUC (Mann-Whitney U with tied scores sharing their average rank): the accuracy metric of
the MLPerf DLRM benchmark, shared by every tool that scores predictions (numpy only).

Memory-light for the MLPerf test set (89 M pairs): one argsort of float32 scores (int64 order,
8 B/pair), the sorted scores and labels (5 B/pair) and a few boolean/int64 temporaries over the
*distinct* scores; about 2.5 GB peak at 100 M pairs, no float64 copy of every score.
"""
from __future__ import annotations

import numpy as np


class AUCError(ValueError):
    """The inputs do not define an AUC (length mismatch, non-binary labels, one class only)."""


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact, rank-based ROC AUC; equals ``sklearn.metrics.roc_auc_score`` including ties."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise AUCError(f"labels ({labels.size}) and scores ({scores.size}) differ in length")
    pos_mask = labels != 0
    if not np.all((labels == 0) | (labels == 1)):
        raise AUCError("labels must be 0 or 1")
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise AUCError("scores contain NaN")
    n = labels.size
    n_pos = int(np.count_nonzero(pos_mask))
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise AUCError(f"AUC needs both classes (positives {n_pos}, negatives {n_neg})")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos_sorted = pos_mask[order]
    del order
    # Group boundaries of equal scores; a group's pairs all get the group's average rank.
    last_of_group = np.flatnonzero(np.diff(s)) if n > 1 else np.zeros(0, np.int64)
    del s
    ends = np.append(last_of_group + 1, n)          # exclusive end (1-based rank of last member)
    starts = np.concatenate([[0], ends[:-1]])
    pos_cum = np.concatenate([[0], np.cumsum(pos_sorted, dtype=np.int64)])
    del pos_sorted
    pos_in_group = pos_cum[ends] - pos_cum[starts]
    # average 1-based rank of group = (start + 1 + end) / 2; sum over positives of their rank
    rank_sum = float(np.dot(pos_in_group.astype(np.float64), (starts + ends + 1) / 2.0))
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
