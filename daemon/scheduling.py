"""Batches to engines and results back: the dispatcher's part between the batcher and the supervisor.

`pump` hands batches to free engine slots (the engine with the fewest batches in flight first) and arms
the one timer the batcher asks for (a partial batch's delay or the first deadline); a batch's result is
split per query and answered at once (copied straight out of the shared-memory slot into the reply);
the batches of a lost engine are retried once on another serving engine. When the last serving engine
is lost, its batches and the queue wait for the restarted engine (and new queries are queued) for up
to `engine_restart_wait_s`, each query within its own deadline; an engine that cannot load its model,
or no engine back in time, fails them with ENGINE_FAILED.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import numpy as np

from daemon.admission import HEADROOM, Admission
from daemon.batcher import WRITTEN, Batch, Batcher, Query, fill_slot, output_segments
from daemon.metrics import DaemonMetrics
from daemon.replies import ReplySender
from daemon.routing import Candidate, pick
from daemon.supervisor import Engine, EngineRole, InFlightBatch, Supervisor
from wire import messages as M
from wire.errors import EngineFailed, ErrorCode, Overloaded, Timeout


class Scheduler:
    def __init__(self, batcher: Batcher, supervisor: Supervisor, replies: ReplySender,
                 metrics: DaemonMetrics | None, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        self.batcher = batcher
        self.sup = supervisor
        self.replies = replies
        self.metrics = metrics
        self.loop = loop
        self._wake = wake  # schedules an I/O pass of the dispatcher
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._no_engine_since: float | None = None  # the last serving engine was lost then (None: one serves)
        # a reload's model switch waiting for a batch boundary: (new engines, old engines, done)
        self._switch: tuple[list[Engine], list[Engine], asyncio.Future[None]] | None = None
        self._hold_until = 0.0  # a rolling reload took the only engine out: work waits until then
        self.admission = Admission(supervisor.config.latency_target_s, supervisor.config.max_batch_pairs)

    # ---- intake ----
    def submit(self, q: Query, starting: bool) -> None:
        """Queue a query; EngineFailed at once when no engine serves (unless the daemon is still
        starting: its engines are loading), Overloaded past the queue bound."""
        if q.num_pairs == 0:
            q.finished = True
            self.replies.result(q, np.empty(0, np.float32), time.monotonic())
            return
        if not starting and not self.sup.any_serving() and not self.waiting_for_restart(time.monotonic()):
            raise EngineFailed("no engine is running (restarting); "
                               + "; ".join(f"{e.name}: {e.last_error}" for e in self.sup.engines))
        if q.latency_budget_s is not None:
            self._admit(q)
        self.batcher.submit(q)

    def _admit(self, q: Query) -> None:
        """Overloaded (no deadline: the daemon's target) or Timeout (its deadline) when the work ahead,
        at the engines' measured rate, would not let `q` finish within its budget."""
        engines = self.sup.engines
        capacity = self.admission.capacity([e.name for e in engines if e.takes_batches])
        if capacity is None:
            return
        ahead = self.batcher.queued_pairs + sum(entry.batch.num_pairs for e in engines for entry in e.inflight.values())
        assert q.latency_budget_s is not None
        wait = self.admission.refuse(ahead, q.num_pairs, q.latency_budget_s, capacity)
        if wait is None:
            return
        why = (f"estimated wait {1e3 * wait:.1f} ms ({ahead:,} pairs ahead at {capacity:,.0f} pairs/s) exceeds "
               f"{100 * HEADROOM:.0f}% of {1e3 * q.latency_budget_s:g} ms")
        if q.deadline is not None:
            raise Timeout(f"{why}, its deadline_s: refused at once")
        raise Overloaded(f"{why}, the daemon's latency_target_s (send deadline_s=inf for throughput work)")

    def waiting_for_restart(self, now: float) -> bool:
        """No engine serves, one is restarting (or a rolling reload replaces it), and work may still wait."""
        if now < self._hold_until and not self.sup.stopping:
            return True
        since = self._no_engine_since
        return (since is not None and not self.sup.stopping
                and now - since <= self.sup.config.engine_restart_wait_s)

    def hold(self, seconds: float) -> None:
        """Queue work (new queries too) for up to `seconds` while no engine takes batches on purpose (a
        rolling reload of the only engine); 0 ends the hold."""
        self._hold_until = time.monotonic() + seconds if seconds > 0 else 0.0
        self._wake()

    def engine_back(self) -> None:
        """An engine is ready (again): what waited for it is dispatched by the next pump."""
        self._no_engine_since = None

    def busy(self) -> bool:
        return self.batcher.pending() or any(e.inflight for e in self.sup.engines)

    # ---- a reload's switch ----
    def switch_model(self, new: list[Engine], old: list[Engine]) -> asyncio.Future[None]:
        """Make `new` the engines that take batches and `old` retiring, at the first batch boundary
        where no queued query is partly dispatched (so each query is computed by one model); the
        future is done once switched."""
        done: asyncio.Future[None] = self.loop.create_future()
        self._switch = (new, old, done)
        self._wake()
        return done

    def cancel_switch(self) -> None:
        if self._switch is not None and not self._switch[2].done():
            self._switch[2].cancel()
        self._switch = None

    def _maybe_switch(self) -> None:
        if self._switch is None or self.batcher.head_partial():
            return
        new, old, done = self._switch
        self._switch = None
        for e in old:
            e.role = EngineRole.RETIRING
        for e in new:
            e.role = EngineRole.ACTIVE
        if not done.done():
            done.set_result(None)

    # ---- batches out ----
    def pump(self) -> None:
        now = time.monotonic()
        for q in self.batcher.expire(now):
            self.replies.error(q.client, q.request_id, ErrorCode.TIMEOUT, "deadline passed while queued", q=q)
        if self._no_engine_since is not None and not self.waiting_for_restart(now) and not self.sup.any_serving():
            self._no_engine_since = None
            self.fail_queued(ErrorCode.ENGINE_FAILED, "no engine came back within engine_restart_wait_s="
                             f"{self.sup.config.engine_restart_wait_s:g} s: "
                             + "; ".join(f"{e.name}: {e.last_error}" for e in self.sup.engines))
        self._maybe_switch()
        while self.batcher.pending():
            self._maybe_switch()
            best = self.best_engine(self.batcher.next_model())
            if best is None or not self.batcher.should_close(now, engine_idle=not best.inflight):
                break
            b = self.batcher.take(now)
            if b is None:
                break
            self._dispatch(best, b, now)
        self._arm_timer(now)

    def best_engine(self, model: str = "") -> Engine | None:
        """The active serving engine with a free slot whose work in flight drains first (daemon/routing.py);
        of `model` when given and one of its engines serves (the rest of a query stays on its model)."""
        free = [e for e in self.sup.engines if e.takes_batches and e.free_slots]
        if model and any(e.takes_batches and e.model.model_id == model for e in self.sup.engines):
            free = [e for e in free if e.model.model_id == model]
        if len(free) <= 1:
            return free[0] if free else None
        i = pick([Candidate(e.name, sum(x.batch.num_pairs for x in e.inflight.values()), len(e.inflight),
                            self.admission.rate(e.name).pairs_per_s) for e in free])
        return None if i is None else free[i]

    def _dispatch(self, e: Engine, b: Batch, now: float) -> None:
        for q, _, _ in b.pieces:
            if not q.model:
                q.model = e.model.model_id
        self.admission.dispatched(e.name, now, was_idle=not e.inflight)
        slot = self.sup.take_slot(e)
        t0 = time.perf_counter()
        ranges = fill_slot(b, e.region.slots[slot])
        entry = InFlightBatch(b, slot, now, time.perf_counter() - t0)
        self.sup.send_batch(e, entry, M.BatchReady(
            batch_id=b.batch_id, slot=slot, kind=M.BatchKind.REF if b.key else M.BatchKind.VALUE,
            dataset=b.key, num_ranges=ranges, num_pairs=b.num_pairs, outputs=output_segments(b)))
        if self.metrics is not None:
            self.metrics.set_inflight(e.name, len(e.inflight))

    def _arm_timer(self, now: float) -> None:
        # With every slot busy (or no engine up) only deadlines need a timer: a freed slot or a ready
        # engine wakes the dispatcher, which pumps; a batch-close timer would fire every millisecond.
        t = self.batcher.next_wakeup(engine_free=any(e.takes_batches and e.free_slots for e in self.sup.engines))
        if t is None:
            return
        if self._timer is not None and self._timer_at <= t + 1e-4:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = t
        # uvloop timers have millisecond resolution and may fire early: aim 1 ms late, never spin.
        self._timer = self.loop.call_later(max(0.0, t - now) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    # ---- results back ----
    def on_batch_done(self, e: Engine, entry: InFlightBatch, msg: M.BatchDone) -> None:
        b = entry.batch
        now = time.monotonic()
        self.admission.completed(e.name, b.num_pairs, now, still_busy=bool(e.inflight))
        self.replies.totals.counts["batches"] += 1
        preds = e.region.slots[entry.slot].out[:b.num_pairs]
        by_client: dict[bytes, list[tuple[Query, np.ndarray, int]]] = {}
        written: dict[bytes, list[Query]] = {}
        for item in Batcher.complete(b, preds):
            q = item[0]
            if q.deadline is not None and now > q.deadline:
                self.replies.error(q.client, q.request_id, ErrorCode.TIMEOUT,
                                   "deadline passed before the result was ready", q=q)
            elif item[2] == WRITTEN:
                written.setdefault(q.client, []).append(q)
            else:
                by_client.setdefault(q.client, []).append(item)
        t0 = time.perf_counter()
        model = e.model.model_id
        for client, qs in written.items():
            self.replies.written(client, qs, now, model)
        for client, items in by_client.items():
            if len(items) == 1:
                self.replies.result(items[0][0], items[0][1], now, model)
            else:
                self.replies.results(client, items, preds, now, model)
        if self.metrics is not None:
            self.metrics.observe_reply(e.name, time.perf_counter() - t0)
            self.metrics.observe_batch(e.name, b.num_pairs, entry.sent_at - b.oldest_arrival, entry.assembly_s,
                                       msg.compute_s, msg.hot_lookups, msg.cold_lookups)
            self.metrics.set_inflight(e.name, len(e.inflight))

    def on_batch_failed(self, e: Engine, entry: InFlightBatch, msg: M.BatchFailed) -> None:
        self.admission.failed(e.name, time.monotonic(), still_busy=bool(e.inflight))
        self.fail_batch(entry.batch, ErrorCode.ENGINE_FAILED, f"engine {e.name} failed the batch: {msg.message}")
        if self.metrics is not None:
            self.metrics.set_inflight(e.name, len(e.inflight))

    def on_engine_lost(self, e: Engine, reason: str, batches: list[InFlightBatch], serving: bool) -> None:
        """Retry the lost engine's batches once, on another serving engine or, when it was the last
        one, on the restarted engine; fail them and the queue when the engine cannot load its model
        or `engine_restart_wait_s` is 0 (`serving`: the daemon was serving, not starting)."""
        now = time.monotonic()
        self.admission.forget(e.name)
        others = self.sup.any_serving(exclude=e)
        if others or not serving or self.sup.stopping or e.load_error:
            self._no_engine_since = None
        elif self._no_engine_since is None:
            self._no_engine_since = now
        can_wait = others or self.waiting_for_restart(now)
        for entry in batches:
            b = entry.batch
            if b.attempts < 2 and can_wait and not self.sup.stopping:
                self.batcher.retry(b)
                if self.metrics is not None:
                    self.metrics.batch_retried(e.name)
            else:
                self.fail_batch(b, ErrorCode.ENGINE_FAILED, f"engine {e.name} was lost while computing: {reason}")
        if not can_wait and serving:
            self.fail_queued(ErrorCode.ENGINE_FAILED, f"every engine is down (last: {e.name}: {reason})")

    def fail_batch(self, b: Batch, code: ErrorCode, message: str) -> None:
        for q in self.batcher.fail(b):
            self.replies.error(q.client, q.request_id, code, message, q=q)

    def fail_queued(self, code: ErrorCode, message: str) -> None:
        for q in self.batcher.drain_all():
            self.replies.error(q.client, q.request_id, code, message, q=q)

    def fail_inflight(self, code: ErrorCode, message: str) -> None:
        """At the end of a drain: what engines still hold gets an error (nothing is left unanswered)."""
        for e in self.sup.engines:
            for entry in list(e.inflight.values()):
                self.fail_batch(entry.batch, code, message)
            e.inflight.clear()
