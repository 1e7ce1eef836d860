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
import time
from typing import Any, Callable, Protocol

from daemon.config import ConfigError, DaemonConfig
from daemon.metrics import DaemonMetrics, daemon_version, model_id
from daemon.reload_plan import CanaryOutcome, ReloadRefused, check_shape, judge_canaries, plan_reload
from daemon.scheduling import Scheduler
from daemon.supervisor import Engine, EngineModel, EngineRole, Supervisor
from formats.artifact import Artifact, ArtifactError, read_model_config
from wire import messages as M

log = logging.getLogger("dlrm.reload")
_POLL_S = 0.02


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
        self._generation = 1  # the model generation served (1: the one the daemon started with)
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
        model = EngineModel(new.model, new_id, new.embedding_weights_on_gpu_part, new.gpu_mlp_precision)
        self._generation += 1
        fresh = [self._start_engine(e, model) for e in active]
        try:
            deadline = t0 + new.reload_timeout_s
            await self._wait_loaded(fresh, deadline)
            checks.append(f"{len(fresh)} new engine(s) loaded: {', '.join(e.name for e in fresh)}")
            checks += await self._canary(new, fresh, active, deadline)
            await asyncio.wait_for(host.scheduler.switch_model(fresh, active), max(1.0, deadline - time.monotonic()))
        except BaseException as exc:
            host.scheduler.cancel_switch()
            for e in fresh:
                if e in host.sup.engines:
                    host.sup.retire(e)
            if isinstance(exc, asyncio.TimeoutError):
                raise ReloadRefused(f"the new engines were not loaded and verified within reload_timeout_s="
                                    f"{new.reload_timeout_s:g} s") from None
            raise
        host.set_config(new)
        if host.metrics is not None:
            host.metrics.set_build_info(daemon_version(), new_id)
        log.info("reload: traffic moved to model %s (%s); the old engines drain", new_id,
                 ", ".join(e.name for e in fresh))
        await self._retire(active, new.drain_timeout_s)
        checks.append(f"old engines drained and stopped: {', '.join(e.name for e in active)}")
        return M.Reloaded(request_id=0, model=new_id, previous_model=old_id, seconds=time.monotonic() - t0,
                          checks=checks)

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

    def _start_engine(self, old: Engine, model: EngineModel) -> Engine:
        base = old.name.split(".m", 1)[0]
        e = self.host.sup.add_engine(f"{base}.m{self._generation}", old.device, model, EngineRole.CANDIDATE)
        if self.host.metrics is not None:
            self.host.metrics.register_engine(e.name, e.device, model.model_id)
        self.host.sup.start(e)
        return e

    async def _wait_loaded(self, fresh: list[Engine], deadline: float) -> None:
        while not all(e.serving for e in fresh):
            for e in fresh:
                gone = e not in self.host.sup.engines or (e.sock is None and not e.serving)
                if e.load_error or gone:
                    raise ReloadRefused(f"new engine {e.name} ({e.device}) could not load the model: "
                                        f"{e.load_error or e.last_error or 'its process exited'}")
            if not self.host.serving():
                raise ReloadRefused("the daemon is shutting down")
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError
            await asyncio.sleep(_POLL_S)

    async def _canary(self, cfg: DaemonConfig, fresh: list[Engine], active: list[Engine],
                      deadline: float) -> list[str]:
        names = self.host.dataset_names()
        dataset = cfg.reload_canary_dataset or (names[0] if names else "")
        if not dataset:
            return ["no canary: no dataset is registered (reload_canary_dataset)"]
        if dataset not in names:
            raise ReloadRefused(f"reload_canary_dataset {dataset!r} is not registered")
        asks = [(e, True) for e in fresh]
        served = next((e for e in active if e.takes_batches), None) if cfg.reload_min_auc_ratio > 0 else None
        if served is not None:
            asks.append((served, False))
        for e, ref in asks:
            self._canaries[e] = self.loop.create_future()
            self.host.sup.send(e, M.RunCanary(dataset=dataset, pairs=cfg.reload_canary_pairs, reference=ref))
        try:
            done = await asyncio.wait_for(asyncio.gather(*(self._canaries[e] for e, _ in asks)),
                                          max(0.1, deadline - time.monotonic()))
        finally:
            for e, _ in asks:
                self._canaries.pop(e, None)
        outcomes = [CanaryOutcome(e.name, d.pairs, d.max_abs_diff, d.tolerance, d.auc, d.error)
                    for (e, _), d in zip(asks, done)]
        new = [o for o, (e, _) in zip(outcomes, asks) if e in fresh]
        served_auc = outcomes[-1].auc if served is not None else None
        if served is not None and outcomes[-1].error:
            raise ReloadRefused(f"canary on the serving engine {served.name} failed: {outcomes[-1].error}")
        return [f"canary dataset {dataset}"] + judge_canaries(new, served_auc, cfg.reload_min_auc_ratio)

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
        release_by = time.monotonic() + 30.0  # retire() kills an engine 10 s after its Shutdown
        while any(e in sup.engines for e in old) and time.monotonic() < release_by:
            await asyncio.sleep(_POLL_S)


def reloaded_reply(request_id: int, done: M.Reloaded) -> Any:
    return M.Reloaded(request_id=request_id, model=done.model, previous_model=done.previous_model,
                      seconds=done.seconds, checks=done.checks)
