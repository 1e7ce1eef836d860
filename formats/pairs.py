"""Pair ranges of a dataset: what a by-reference batch names (a sample is pairs [start, start+count)).

Numpy only: the dispatcher, the engines and the LoadGen driver all expand or check ranges.
"""
from __future__ import annotations

import numpy as np


def check_ranges(dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                 num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 (starts, counts) of by-reference ranges; ValueError unless they lie in the dataset's pairs."""
    starts = np.asarray(pair_starts, dtype=np.int64)
    counts = np.asarray(pair_counts, dtype=np.int64)
    if starts.shape != counts.shape or starts.ndim != 1:
        raise ValueError(f"pair starts and counts must be 1-D of one length, got {starts.shape}, {counts.shape}")
    if starts.size and (starts.min() < 0 or counts.min() < 0 or (starts + counts).max() > num_pairs):
        raise ValueError(f"pair ranges outside dataset {dataset!r} ({num_pairs} pairs)")
    return starts, counts


def pair_index(pair_starts: np.ndarray, pair_counts: np.ndarray) -> np.ndarray:
    """Concatenated pair indices of the ranges [start, start+count), without a Python loop."""
    counts = np.asarray(pair_counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    # Each range contributes start, start+1, ...: a running arange shifted per range.
    shifts = np.repeat(np.asarray(pair_starts, dtype=np.int64) - (np.cumsum(counts) - counts), counts)
    return np.arange(total, dtype=np.int64) + shifts
