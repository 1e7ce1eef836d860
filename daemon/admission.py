"""Adaptive admission, as pure logic (no sockets, no clock of its own; the dispatcher passes `now`).

A query is admitted when the work ahead of it, at the rate the engines are measured to complete
pairs, lets it finish within its budget: its own `deadline_s`, else the daemon's `latency_target_s`
(30 ms by default, the MLPerf Server bound). Otherwise it is answered at once: TIMEOUT when it had a
deadline, OVERLOADED when the daemon's target was applied. Without admission a 2x overload fills
the queue to `max_queue_pairs` and every admitted query waits seconds; with it the queue holds about
a target's worth of work, admitted queries meet the target and the engines stay busy.

The rate: per engine, pairs completed per second of time the engine had work in flight (from each
BatchDone to the next, or from the dispatch that ended an idle spell), smoothed as a ratio of
exponential averages of pairs and of seconds (small batches do not dominate). Until an engine has
completed `MIN_SAMPLES` batches nothing is refused: a daemon that has not measured itself admits.
The wait estimate: the pairs queued and in flight plus the query's own, rounded up to whole batches
of `max_batch_pairs` (under overload, when admission matters, batches are full and a query is done
only when its whole batch is), at the summed rate. It is a mean where the bound is a 99th percentile,
so a query is admitted only while the estimate is within HEADROOM of its budget. A query with nothing
ahead of it is always admitted: refusing it would not make it faster.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_SAMPLES = 8
HEADROOM = 0.85  # admit while the estimated (mean) wait is within this share of the budget
_ALPHA = 0.1  # weight of the newest batch in the averages (about the last 10-20 batches)


@dataclass
class EngineRate:
    """One engine's measured completion rate."""

    busy_mark: float | None = None  # start of the current measured interval (None: idle)
    avg_pairs: float = 0.0
    avg_seconds: float = 0.0
    samples: int = 0

    @property
    def pairs_per_s(self) -> float | None:
        if self.samples < MIN_SAMPLES or self.avg_seconds <= 0.0:
            return None
        return self.avg_pairs / self.avg_seconds


class Admission:
    """Rates per engine, and the admission decision for one query."""

    def __init__(self, latency_target_s: float, max_batch_pairs: int) -> None:
        """`latency_target_s` 0: no default target (only deadlines and max_queue_pairs limit)."""
        self.latency_target_s = latency_target_s
        self.max_batch_pairs = max_batch_pairs
        self._rates: dict[str, EngineRate] = {}

    def rate(self, engine: str) -> EngineRate:
        return self._rates.setdefault(engine, EngineRate())

    # ---- measurements ----
    def dispatched(self, engine: str, now: float, was_idle: bool) -> None:
        """A batch went to `engine`; `was_idle`: nothing else was in flight there."""
        r = self.rate(engine)
        if was_idle or r.busy_mark is None:
            r.busy_mark = now

    def completed(self, engine: str, pairs: int, now: float, still_busy: bool) -> None:
        """`engine` returned a batch of `pairs`; `still_busy`: other batches remain in flight there."""
        r = self.rate(engine)
        if r.busy_mark is not None and now > r.busy_mark:
            dt = now - r.busy_mark
            if r.samples == 0:
                r.avg_pairs, r.avg_seconds = float(pairs), dt
            else:
                r.avg_pairs += _ALPHA * (pairs - r.avg_pairs)
                r.avg_seconds += _ALPHA * (dt - r.avg_seconds)
            r.samples += 1
        r.busy_mark = now if still_busy else None

    def failed(self, engine: str, now: float, still_busy: bool) -> None:
        """`engine` returned a batch without results: no measurement, the interval restarts."""
        self.rate(engine).busy_mark = now if still_busy else None

    def forget(self, engine: str) -> None:
        """A lost engine: its restarted process is measured afresh."""
        self._rates.pop(engine, None)

    # ---- decisions ----
    def capacity(self, serving: list[str]) -> float | None:
        """Summed pairs/s of the serving engines; None while any of them is unmeasured."""
        total = 0.0
        for name in serving:
            rate = self.rate(name).pairs_per_s
            if rate is None:
                return None
            total += rate
        return total if serving else None

    def budget(self, deadline_s: float | None) -> float | None:
        """The latency a query must meet: its deadline, else the daemon's target (None: no bound)."""
        if deadline_s is not None:
            return deadline_s if deadline_s != float("inf") else None
        return self.latency_target_s if self.latency_target_s > 0 else None

    def estimated_wait_s(self, ahead_pairs: int, pairs: int, capacity: float | None) -> float | None:
        if capacity is None or capacity <= 0.0:
            return None
        batches = -(-(ahead_pairs + pairs) // self.max_batch_pairs)
        return batches * self.max_batch_pairs / capacity

    def refuse(self, ahead_pairs: int, pairs: int, budget_s: float | None, capacity: float | None) -> float | None:
        """The estimated wait when it exceeds `budget_s` (refuse the query), else None (admit). With
        nothing ahead a query is always admitted: refusing it would not make it faster."""
        if budget_s is None or ahead_pairs <= 0:
            return None
        wait = self.estimated_wait_s(ahead_pairs, pairs, capacity)
        return wait if wait is not None and wait > HEADROOM * budget_s else None
