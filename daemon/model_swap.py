"""A reload: the new model's engines load beside the old ones, are verified, take the traffic, and the old
ones drain and stop. The old model serves throughout; a reload that fails leaves it serving.

Order (daemon/reload_plan.py holds the decisions):
  1. the config is re-read (the file the daemon started with, or the one named) and compared: only the
     model and what belongs to it may change; the new artifact's checksums (sampled) and shape are
     checked, and its accuracy profile is resolved (daemon/precision_plan.py: an artifact not calibrated
     for the configured accuracy_target is refused);
  2. one new engine per configured device starts with the new model (named `cuda0.m2` for the second
     model, ...), beside the old one; a new engine that cannot load fails the reload at once;
  3. each new engine predicts canary pairs of a registered dataset against the reference of its
     arithmetic (engines/canary.py), and optionally the AUC gate compares both models on them;
  4. the switch, between batches (daemon/scheduling.py: no query is computed by two models): queries
     batched before it finish on the old engines, everything after goes to the new ones; every reply
     names the model that computed it;
  5. the old engines finish what they hold, stop, and their memory is freed; then the reload answers.
systemd hears RELOADING=1 at the start and READY=1 at the end (with STATUS= saying how it went).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable, Protocol

from daemon.config import ConfigError, DaemonConfig, ReloadStrategy
from daemon.metrics import DaemonMetrics, daemon_version, model_id
from daemon.reload_plan import CanaryOutcome, ReloadRefused, check_shape, judge_canaries, plan_reload
from daemon.scheduling import Scheduler
from daemon.supervisor import Engine, EngineModel, EngineRole, Supervisor
from formats.artifact import Artifact, ArtifactError, read_model_config
from wire import messages as M

log = logging.getLogger("dlrm.reload")
_POLL_S = 0.02
# how an engine says its device had no room for the model (torch, the CUDA runtime and driver)
_OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY", re.I)


class NoRoom(ReloadRefused):
    """A new engine could not load the model for want of device memory (both models do not fit)."""


class SwapHost(Protocol):
    """What a reload needs of the serving dispatcher."""

    cfg: DaemonConfig
    sup: Supervisor
    scheduler: Scheduler
    metrics: DaemonMetrics | None

    def set_config(self, cfg: DaemonConfig) -> None: ...
    def dataset_names(self) -> list[str]: ...
    def serving(self) -> bool: ...


class ModelSwap:
    """One reload at a time (`run`); `canary_done` takes the engines' CanaryDone messages."""

    def __init__(self, host: SwapHost, load_config: Callable[[str | None], DaemonConfig],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self._load_config = load_config
        self.loop = loop
        self.running_since: float | None = None
        self.last_outcome = ""  # one line for `status` and STATUS=
        self._generation = 1  # engines started so far by reloads, +1 (names cuda0.m2, cuda0.m3, ...)
        self._canaries: dict[Engine, asyncio.Future[M.CanaryDone]] = {}

    async def run(self, config_path: str | None) -> M.Reloaded:
        """Reload from `config_path` (None: the daemon's own config file); ReloadRefused says why not."""
        if self.running_since is not None:
            raise ReloadRefused(f"a reload is already running (for {time.monotonic() - self.running_since:.0f} s)")
        if not self.host.serving():
            raise ReloadRefused("the daemon is not serving (starting or shutting down)")
        self.running_since = t0 = time.monotonic()
        try:
            done = await self._run(config_path, t0)
            self.last_outcome = f"reload ok: {done.previous_model} -> {done.model} in {done.seconds:.1f} s"
            log.info("%s", self.last_outcome)
            if self.host.metrics is not None:
                self.host.metrics.reload_done(True)
            return done
        except ReloadRefused as exc:
            self.last_outcome = f"reload failed: {exc}"
            log.error("%s", self.last_outcome)
            if self.host.metrics is not None:
                self.host.metrics.reload_done(False)
            raise
        finally:
            self.running_since = None

    async def _run(self, config_path: str | None, t0: float) -> M.Reloaded:
        host = self.host
        old = host.cfg
        try:
            new = await self.loop.run_in_executor(None, self._load_config, config_path)
        except ConfigError as exc:
            raise ReloadRefused(f"configuration: {exc}") from None
        active = [e for e in host.sup.engines if e.role is EngineRole.ACTIVE]
        old_id = active[0].model.model_id if active else model_id(old.model)
        new_id = model_id(new.model)
        plan = plan_reload(old, new, old_id, new_id)
        if not plan.new_engines:
            host.set_config(new)
            what = ", ".join(plan.changed) if plan.changed else "nothing changed"
            return M.Reloaded(request_id=0, model=old_id, previous_model=old_id, seconds=time.monotonic() - t0,
                              checks=[f"the engines keep model {old_id} ({what})"])
        checks = await self.loop.run_in_executor(None, self._check_artifact, old, new)
        # Spare engines hold the old model and a second copy's memory: they go first (the new model then
        # fits beside the old where it would beside one copy) and come back with the served model after.
        spares = [e for e in host.sup.engines if e.role is EngineRole.STANDBY]
        for e in spares:
            host.sup.retire(e)
        await self._released(spares)
        try:
            return await self._swap(new, old_id, new_id, checks, t0)
        finally:
            for e in host.sup.add_standbys():
                if host.metrics is not None:
                    host.metrics.register_engine(e.name, e.device, e.model.model_id)
            host.sup.start_standbys()

    async def _swap(self, new: DaemonConfig, old_id: str, new_id: str, checks: list[str], t0: float) -> M.Reloaded:
        host = self.host
        active = [e for e in host.sup.engines if e.role is EngineRole.ACTIVE]
        model = EngineModel(new.model, new_id, new.embedding_weights_on_gpu_part, new.gpu_mlp_precision)
        deadline = t0 + new.reload_timeout_s
        self._generation += 1
        number = self._generation
        try:
            if new.reload_strategy is ReloadStrategy.ROLLING:
                checks += await self._rolling(new, model, active, deadline, number)
            else:
                try:
                    checks += await self._parallel(new, model, active, deadline, number)
                except NoRoom as exc:
                    if new.reload_strategy is not ReloadStrategy.AUTO:
                        raise
                    log.warning("reload: %s; swapping engine by engine", exc)
                    checks.append(f"the two models do not fit side by side ({exc}): engine by engine")
                    checks += await self._rolling(new, model, active, deadline, number)
        except asyncio.TimeoutError:
            raise ReloadRefused(f"the new engines were not loaded and verified within reload_timeout_s="
                                f"{new.reload_timeout_s:g} s") from None
        finally:
            host.scheduler.hold(0)
        host.set_config(new)
        if host.metrics is not None:
            host.metrics.set_build_info(daemon_version(), new_id)
        return M.Reloaded(request_id=0, model=new_id, previous_model=old_id, seconds=time.monotonic() - t0,
                          checks=checks)

    async def _parallel(self, cfg: DaemonConfig, model: EngineModel, active: list[Engine],
                        deadline: float, number: int) -> list[str]:
        """Every new engine beside the old ones, verified, then all the traffic at once."""
        host = self.host
        fresh = [self._start_engine(e, model, number) for e in active]
        try:
            await self._wait_loaded(fresh, deadline)
            checks = [f"{len(fresh)} new engine(s) loaded beside the old: {', '.join(e.name for e in fresh)}"]
            served = next((e for e in active if e.takes_batches), None) if cfg.reload_min_auc_ratio > 0 else None
            checks += await self._canary(cfg, fresh, served, None, deadline)
            await asyncio.wait_for(host.scheduler.switch_model(fresh, active), max(1.0, deadline - time.monotonic()))
        except BaseException:
            host.scheduler.cancel_switch()
            for e in fresh:
                if e in host.sup.engines:
                    host.sup.retire(e)
            await self._released(fresh)  # the reply then finds only the old model's engines
            raise
        log.info("reload: traffic moved to model %s (%s); the old engines drain", model.model_id,
                 ", ".join(e.name for e in fresh))
        await self._retire(active, cfg.drain_timeout_s)
        return checks + [f"old engines drained and stopped: {', '.join(e.name for e in active)}"]

    async def _rolling(self, cfg: DaemonConfig, model: EngineModel, active: list[Engine],
                       deadline: float, number: int) -> list[str]:
        """Engine by engine: each old engine drains and stops, a new one loads on its device and is
        verified, then serves, while the others serve on (with one engine, queries queue meanwhile). A
        failure puts the old model back on every device."""
        checks: list[str] = []
        served_auc = await self._served_auc(cfg, active, deadline) if cfg.reload_min_auc_ratio > 0 else None
        swapped: list[Engine] = []
        taken: list[Engine] = []
        try:
            for old in active:
                await self._take_out(old, cfg, deadline)
                taken.append(old)
                fresh = self._start_engine(old, model, number)
                try:
                    await self._wait_loaded([fresh], deadline)
                    checks += await self._canary(cfg, [fresh], None, served_auc, deadline)
                except BaseException:
                    self.host.sup.retire(fresh)
                    await self._released([fresh])
                    raise
                fresh.role = EngineRole.ACTIVE
                self.host.scheduler.hold(0)
                self.host.scheduler.engine_back()
                swapped.append(fresh)
                checks.append(f"{old.name} replaced by {fresh.name} on {old.device}")
        except BaseException as exc:
            log.error("rolling reload failed (%s): the old model goes back on %d device(s)",
                      exc if isinstance(exc, ReloadRefused) else type(exc).__name__, len(taken))
            await self._roll_back(swapped, taken, cfg)
            raise
        return checks

    async def _take_out(self, e: Engine, cfg: DaemonConfig, deadline: float) -> None:
        """No new batches for `e`; once it holds none it stops and is released. When no other engine
        takes batches, queries queue for the one that replaces it."""
        sched = self.host.scheduler
        others = [x for x in self.host.sup.engines if x.takes_batches and x is not e]
        if not others:
            sched.hold(max(1.0, deadline - time.monotonic()))
        if any(x.model.model_id == e.model.model_id for x in others):
            e.role = EngineRole.RETIRING  # the rest of its model's queries go to its model's other engines
        else:  # the last engine of its model: at a batch boundary where no query is partly computed by it
            await asyncio.wait_for(sched.switch_model([], [e]), max(1.0, deadline - time.monotonic()))
        await self._retire([e], cfg.drain_timeout_s)

    async def _roll_back(self, swapped: list[Engine], taken: list[Engine], cfg: DaemonConfig) -> None:
        """The old model back on every device a rolling reload changed (best effort: the engines start;
        the supervisor restarts one that fails, as any)."""
        for e in swapped:
            await self._take_out(e, cfg, time.monotonic() + cfg.reload_timeout_s)
        self._generation += 1
        back = [self._start_engine(e, e.model, self._generation, EngineRole.ACTIVE) for e in taken]
        try:
            await self._wait_loaded(back, time.monotonic() + cfg.reload_timeout_s)
        except (ReloadRefused, asyncio.TimeoutError) as exc:
            log.error("rolling back: %s", exc)
        finally:
            self.host.scheduler.hold(0)
            self.host.scheduler.engine_back()

    @staticmethod
    def _check_artifact(old: DaemonConfig, new: DaemonConfig) -> list[str]:
        """Sampled checksums of every data file, and the served model's shape (a thread: it reads files)."""
        try:
            art = Artifact.open(new.model)
            if old.model:
                check_shape(read_model_config(old.model), art.config)
        except ArtifactError as exc:
            raise ReloadRefused(f"new model {new.model}: {exc}") from None
        checks = [f"artifact {new.model}: sizes and sampled checksums of its files, shape as served"]
        if any(M.EngineKind.of_device(d) is M.EngineKind.CUDA for d in new.engines):
            checks.append(f"accuracy_target {new.accuracy_target}: GPU MLP precision {new.gpu_mlp_precision} "
                          "(the artifact's calibration record allows it)")
        return checks

    def _start_engine(self, old: Engine, model: EngineModel, number: int,
                      role: EngineRole = EngineRole.CANDIDATE) -> Engine:
        """An engine for `model` on `old`'s device, named after it with the reload's number (cuda0.m2, ...)."""
        base = old.name.split(".m", 1)[0]
        e = self.host.sup.add_engine(f"{base}.m{number}", old.device, model, role)
        if self.host.metrics is not None:
            self.host.metrics.register_engine(e.name, e.device, model.model_id)
        self.host.sup.start(e)
        return e

    async def _wait_loaded(self, fresh: list[Engine], deadline: float) -> None:
        while not all(e.serving for e in fresh):
            for e in fresh:
                gone = e not in self.host.sup.engines or (e.sock is None and not e.serving)
                if e.load_error or gone:
                    why = e.load_error or e.last_error or "its process exited"
                    cls = NoRoom if _OUT_OF_MEMORY.search(why) else ReloadRefused
                    raise cls(f"new engine {e.name} ({e.device}) could not load the model: {why}")
            if not self.host.serving():
                raise ReloadRefused("the daemon is shutting down")
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError
            await asyncio.sleep(_POLL_S)

    async def _canary(self, cfg: DaemonConfig, fresh: list[Engine], served: Engine | None,
                      served_auc: float | None, deadline: float) -> list[str]:
        """Each new engine's canary, judged (daemon/reload_plan.py); `served`: a serving engine of the old
        model whose AUC on the same pairs is measured alongside, else `served_auc` (for the AUC gate)."""
        dataset = self._canary_dataset(cfg)
        if not dataset:
            return ["no canary: no dataset is registered (reload_canary_dataset)"]
        asks = [(e, True) for e in fresh] + ([(served, False)] if served is not None else [])
        done = await self._ask_canaries(asks, dataset, cfg.reload_canary_pairs, deadline)
        outcomes = [CanaryOutcome(e.name, d.pairs, d.max_abs_diff, d.tolerance, d.auc, d.error)
                    for (e, _), d in zip(asks, done)]
        if served is not None:
            last = outcomes.pop()
            if last.error:
                raise ReloadRefused(f"canary on the serving engine {served.name} failed: {last.error}")
            served_auc = last.auc
        return [f"canary dataset {dataset}"] + judge_canaries(outcomes, served_auc, cfg.reload_min_auc_ratio)

    async def _served_auc(self, cfg: DaemonConfig, active: list[Engine], deadline: float) -> float | None:
        """The serving model's AUC on the canary pairs (for the AUC gate of a rolling reload)."""
        dataset = self._canary_dataset(cfg)
        served = next((e for e in active if e.takes_batches), None)
        if not dataset or served is None:
            return None
        (done,) = await self._ask_canaries([(served, False)], dataset, cfg.reload_canary_pairs, deadline)
        if done.error:
            raise ReloadRefused(f"canary on the serving engine {served.name} failed: {done.error}")
        return done.auc

    def _canary_dataset(self, cfg: DaemonConfig) -> str:
        names = self.host.dataset_names()
        dataset = cfg.reload_canary_dataset or (names[0] if names else "")
        if dataset and dataset not in names:
            raise ReloadRefused(f"reload_canary_dataset {dataset!r} is not registered")
        return dataset

    async def _ask_canaries(self, asks: list[tuple[Engine, bool]], dataset: str, pairs: int,
                            deadline: float) -> list[M.CanaryDone]:
        for e, ref in asks:
            self._canaries[e] = self.loop.create_future()
            self.host.sup.send(e, M.RunCanary(dataset=dataset, pairs=pairs, reference=ref))
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(self._canaries[e] for e, _ in asks)),
                                               max(0.1, deadline - time.monotonic())))
        finally:
            for e, _ in asks:
                self._canaries.pop(e, None)

    def canary_done(self, e: Engine, msg: M.CanaryDone) -> None:
        fut = self._canaries.get(e)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def engine_lost(self, e: Engine, reason: str) -> None:
        """A new engine lost while its canary runs: the canary fails with the reason."""
        fut = self._canaries.get(e)
        if fut is not None and not fut.done():
            fut.set_result(M.CanaryDone(dataset="", pairs=0, max_abs_diff=float("nan"), tolerance=0.0, auc=None,
                                        error=f"engine lost: {reason}"))

    async def _retire(self, old: list[Engine], drain_s: float) -> None:
        """Each old engine stops once it holds no batch (its last replies are out), then its process,
        socket and memory go; an engine still busy after `drain_s` more is stopped anyway (what it
        held is retried on the new engines: daemon/scheduling.py)."""
        sup = self.host.sup
        waiting = list(old)
        deadline = time.monotonic() + drain_s
        while waiting:
            for e in list(waiting):
                if not e.inflight or time.monotonic() > deadline:
                    waiting.remove(e)
                    sup.retire(e)
            await asyncio.sleep(_POLL_S)
        await self._released(old)

    async def _released(self, engines: list[Engine], within_s: float = 30.0) -> None:
        """Until these retired engines left (retire() kills one 10 s after its Shutdown)."""
        by = time.monotonic() + within_s
        while any(e in self.host.sup.engines for e in engines) and time.monotonic() < by:
            await asyncio.sleep(_POLL_S)


def reloaded_reply(request_id: int, done: M.Reloaded) -> Any:
    return M.Reloaded(request_id=request_id, model=done.model, previous_model=done.previous_model,
                      seconds=done.seconds, checks=done.checks)
