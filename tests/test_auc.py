"""prepare.auc against sklearn.metrics.roc_auc_score (an independent implementation)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from formats.auc import AUCError, roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_with_many_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 20000))
    labels = rng.integers(0, 2, n).astype(np.float32)
    labels[:2] = [0, 1]
    # few distinct values -> heavy ties; mixed with a signal so AUC is not ~0.5
    scores = (np.round(rng.random(n) * int(rng.integers(1, 30))) / 30 + 0.3 * labels).astype(np.float32)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_continuous_and_perfect() -> None:
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 2, 5000)
    scores = rng.random(5000)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


@pytest.mark.parametrize("labels,scores,match", [
    ([0, 1], [0.1], "differ in length"),
    ([0, 2], [0.1, 0.2], "0 or 1"),
    ([1, 1], [0.1, 0.2], "both classes"),
    ([0, 1], [np.nan, 0.2], "NaN"),
])
def test_errors(labels: list, scores: list, match: str) -> None:
    with pytest.raises(AUCError, match=match):
        roc_auc(np.array(labels), np.array(scores))
