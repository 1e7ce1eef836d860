"""daemon/reload_plan.py: which config changes a reload takes, and when a new model passes its checks."""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, strategies as st

from daemon.config import DaemonConfig
from daemon.reload_plan import (RELOADABLE, CanaryOutcome, ReloadRefused, changed_keys, check_shape,
                                judge_canaries, plan_reload)
from formats.model_config import DLRMConfig

BASE = DaemonConfig(model="/m/a", engines=("cpu",), endpoint="ipc:///tmp/x.sock", runtime_dir="/tmp")
FIELDS = [f.name for f in dataclasses.fields(DaemonConfig)]


def _with(**kw: object) -> DaemonConfig:
    return dataclasses.replace(BASE, **kw)  # type: ignore[arg-type]


def test_same_config_and_model_changes_nothing() -> None:
    plan = plan_reload(BASE, BASE, "a@1", "a@1")
    assert plan.changed == () and not plan.new_engines


def test_a_rewritten_artifact_at_the_same_path_is_a_new_model() -> None:
    assert plan_reload(BASE, BASE, "a@1", "a@2").new_engines


@pytest.mark.parametrize("key,value", [("model", "/m/b"), ("embedding_weights_on_gpu_part", 0.5),
                                       ("gpu_mlp_precision", "fp8")])
def test_model_keys_start_new_engines(key: str, value: object) -> None:
    plan = plan_reload(BASE, _with(**{key: value}), "a@1", "a@1")
    assert plan.changed == (key,) and plan.new_engines


@pytest.mark.parametrize("key,value", [("reload_canary_pairs", 10), ("reload_min_auc_ratio", 0.99),
                                       ("accuracy_target", "99")])
def test_verification_keys_take_effect_without_new_engines(key: str, value: object) -> None:
    plan = plan_reload(BASE, _with(**{key: value}), "a@1", "a@1")
    assert plan.changed == (key,) and not plan.new_engines


@pytest.mark.parametrize("key,value", [("max_batch_pairs", 4096), ("engines", ("cpu", "cpu")),
                                       ("endpoint", "ipc:///tmp/y.sock"), ("metrics_port", 9464)])
def test_other_keys_need_a_restart(key: str, value: object) -> None:
    with pytest.raises(ReloadRefused, match=f"changed keys \\['{key}'\\] need a restart"):
        plan_reload(BASE, _with(model="/m/b", **{key: value}), "a@1", "a@2")


@given(st.sets(st.sampled_from([f for f in FIELDS if f in ("model", "max_batch_pairs", "reload_timeout_s",
                                                                "log_level", "gpu_mlp_precision")])))
def test_refused_exactly_when_a_fixed_key_changed(keys: set[str]) -> None:
    values = {"model": "/m/b", "max_batch_pairs": 1234, "reload_timeout_s": 5.0, "log_level": "DEBUG",
              "gpu_mlp_precision": "fp8"}
    new = _with(**{k: values[k] for k in keys})
    assert set(changed_keys(BASE, new)) == keys
    if keys - RELOADABLE:
        with pytest.raises(ReloadRefused):
            plan_reload(BASE, new, "a@1", "a@1")
    else:
        assert plan_reload(BASE, new, "a@1", "a@1").new_engines == bool(keys & {"model", "gpu_mlp_precision"})


def test_another_shape_is_refused_with_what_differs() -> None:
    old = DLRMConfig.mlperf().scaled(1e-4, cap=1000)
    check_shape(old, old)
    with pytest.raises(ReloadRefused, match="another shape .*table_rows"):
        check_shape(old, DLRMConfig.mlperf().scaled(1e-4, cap=500))
    with pytest.raises(ReloadRefused, match="top_mlp"):
        check_shape(old, dataclasses.replace(old, top_mlp=(512, 256, 1)))


def _ok(engine: str = "cuda0.m2", diff: float = 1e-3, auc: float | None = 0.8) -> CanaryOutcome:
    return CanaryOutcome(engine, 2000, diff, 4e-3, auc)


def test_canaries_within_tolerance_pass() -> None:
    checks = judge_canaries([_ok(), _ok("cuda1.m2", 0.0)], None, 0.0)
    assert len(checks) == 2 and "cuda0.m2: 2000 pairs" in checks[0]


@pytest.mark.parametrize("diff", [5e-3, math.nan, math.inf])
def test_a_canary_beyond_tolerance_or_not_finite_fails(diff: float) -> None:
    with pytest.raises(ReloadRefused, match="cuda1.m2.*more than its arithmetic allows"):
        judge_canaries([_ok(), _ok("cuda1.m2", diff)], None, 0.0)


def test_a_canary_error_fails_with_it() -> None:
    with pytest.raises(ReloadRefused, match="cuda0.m2 failed: engine lost"):
        judge_canaries([CanaryOutcome("cuda0.m2", 0, math.nan, 0.0, None, "engine lost: killed")], None, 0.0)


def test_auc_gate() -> None:
    assert "AUC gate" in judge_canaries([_ok(auc=0.795)], 0.80, 0.99)[-1]
    with pytest.raises(ReloadRefused, match="below reload_min_auc_ratio=0.99"):
        judge_canaries([_ok(auc=0.78)], 0.80, 0.99)
    with pytest.raises(ReloadRefused, match="needs the AUC of both models"):
        judge_canaries([_ok(auc=None)], 0.80, 0.99)
    with pytest.raises(ReloadRefused, match="needs the AUC of both models"):
        judge_canaries([_ok()], None, 0.99)
