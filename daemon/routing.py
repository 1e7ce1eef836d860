"""Which engine takes the next batch, as pure logic: the one that will be done soonest.

Each candidate (a serving engine with a free slot) has pairs in flight and, once measured
(daemon/admission.py), a completion rate. The next batch goes to the engine whose work in flight
drains first at its own rate, so a slower GPU (or one that shares its device) gets less, not the
same share. While any candidate is unmeasured, the pairs in flight alone decide (then the batch
count), which is least outstanding work for engines of one kind.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    inflight_pairs: int
    inflight_batches: int
    pairs_per_s: float | None  # measured completion rate; None until measured


def pick(candidates: Sequence[Candidate]) -> int | None:
    """Index of the candidate to send the next batch to; None when there is none."""
    if not candidates:
        return None
    if all(c.pairs_per_s for c in candidates):
        return min(range(len(candidates)),
                   key=lambda i: (candidates[i].inflight_pairs / candidates[i].pairs_per_s,  # type: ignore[operator]
                                  candidates[i].inflight_batches, i))
    return min(range(len(candidates)),
               key=lambda i: (candidates[i].inflight_pairs, candidates[i].inflight_batches, i))
