"""What a reload may change and when its new model may take the traffic, as pure logic.

A reload (`dlrm-daemon reload`, `systemctl reload`, SIGHUP) re-reads the daemon's config and swaps in
its model while the old one serves (daemon/model_swap.py does it). Only the model and what belongs to it
may change live; any other key needs a restart and makes the reload refuse, naming the keys. The new
engines take traffic only after every check passed: each one's canary predictions within its
arithmetic's tolerance of the reference, and (optionally) its AUC on the canary pairs at least
`reload_min_auc_ratio` of the served model's. Every refusal is a ReloadRefused with the reason.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from formats.model_config import DLRMConfig

# The model and the keys that describe how it is served and verified: everything else needs a restart.
RELOADABLE = frozenset({
    "model", "embedding_weights_on_gpu_part", "gpu_mlp_precision", "accuracy_target",
    "reload_canary_dataset", "reload_canary_pairs", "reload_min_auc_ratio", "reload_timeout_s", "reload_strategy",
})
# What makes engines load something else (a change of the reload_* keys alone just takes effect).
ENGINE_KEYS = ("model", "embedding_weights_on_gpu_part", "gpu_mlp_precision")


class ReloadRefused(ValueError):
    """The reload cannot happen or its new model failed a check; the message says which and why."""


def changed_keys(old: Any, new: Any) -> list[str]:
    """Config keys (dataclass fields) whose values differ, in field order."""
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


@dataclass(frozen=True)
class ReloadPlan:
    changed: tuple[str, ...]  # every key that differs
    new_engines: bool  # the engines must load something else (a new model, placement or precision)


def plan_reload(old: Any, new: Any, old_model_id: str, new_model_id: str) -> ReloadPlan:
    """The plan for going from config `old` to `new` (DaemonConfig), serving `old_model_id` now and
    `new_model_id` by the new config (the artifact's id: a rewritten artifact at the same path is a new
    model). ReloadRefused if a key outside RELOADABLE changed."""
    changed = changed_keys(old, new)
    fixed = [k for k in changed if k not in RELOADABLE]
    if fixed:
        raise ReloadRefused(f"changed keys {fixed} need a restart (a reload changes only {sorted(RELOADABLE)})")
    engines = any(k in changed for k in ENGINE_KEYS) or new_model_id != old_model_id
    return ReloadPlan(tuple(changed), engines)


def check_shape(old: DLRMConfig, new: DLRMConfig) -> None:
    """The new model must have the served model's shape: the registered datasets, the queries in
    flight and the clients' by-value rows are made for its tables and widths."""
    if old != new:
        diffs = [f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}" for f in dataclasses.fields(old)
                 if getattr(old, f.name) != getattr(new, f.name)]
        shown = "; ".join(d if len(d) < 200 else d[:200] + "..." for d in diffs)
        raise ReloadRefused(f"the new model has another shape ({shown}): a model of another shape needs a restart")


@dataclass(frozen=True)
class CanaryOutcome:
    engine: str
    pairs: int
    max_abs_diff: float
    tolerance: float
    auc: float | None
    error: str = ""


def judge_canaries(new: Sequence[CanaryOutcome], served_auc: float | None, min_auc_ratio: float) -> list[str]:
    """One line per check passed; ReloadRefused at the first failure. `served_auc`: the served model's
    AUC on the same pairs (None: not measured or a single class), `min_auc_ratio` 0: no AUC gate."""
    checks: list[str] = []
    for c in new:
        if c.error:
            raise ReloadRefused(f"canary on engine {c.engine} failed: {c.error}")
        if not c.max_abs_diff <= c.tolerance:  # NaN fails too
            raise ReloadRefused(f"canary on engine {c.engine}: predictions differ from the reference by "
                                f"{c.max_abs_diff:.3g} over {c.pairs} pairs, more than its arithmetic allows "
                                f"({c.tolerance:g})")
        shown = "" if math.isinf(c.tolerance) else f" (tolerance {c.tolerance:g})"
        checks.append(f"canary {c.engine}: {c.pairs} pairs, max |prediction - reference| {c.max_abs_diff:.3g}{shown}"
                      + ("" if c.auc is None else f", AUC {c.auc:.6f}"))
    if min_auc_ratio > 0:
        if served_auc is None or any(c.auc is None for c in new):
            raise ReloadRefused(f"reload_min_auc_ratio={min_auc_ratio:g} needs the AUC of both models on the canary "
                                "pairs (labels of both classes among them): raise reload_canary_pairs or set it to 0")
        worst = min(c.auc for c in new if c.auc is not None)
        if worst < min_auc_ratio * served_auc:
            raise ReloadRefused(f"the new model's AUC on the canary pairs {worst:.6f} is below reload_min_auc_ratio="
                                f"{min_auc_ratio:g} of the served model's {served_auc:.6f}")
        checks.append(f"AUC gate: {worst:.6f} >= {min_auc_ratio:g} x {served_auc:.6f} (the served model's)")
    return checks
