"""daemon/precision_plan.py: the precision a GPU engine runs for an accuracy profile (pure logic)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.precision_plan import PlanError, plan
from formats.artifact import AccuracyRecord
from wire.messages import MlpPrecision as P


def _record(fp16: float, int8: float, fp8: float) -> AccuracyRecord:
    return AccuracyRecord("fp32", 0.8, {"fp16": 0.8 * fp16, "int8": 0.8 * int8, "fp8": 0.8 * fp8}, 10_000)


@given(fp16=st.floats(0.98, 1.0), int8=st.floats(0.98, 1.0), fp8=st.floats(0.98, 1.0),
       target=st.sampled_from([0.99, 0.999]))
def test_auto_is_the_fastest_that_keeps_the_target(fp16: float, int8: float, fp8: float, target: float) -> None:
    rec = _record(fp16, int8, fp8)
    try:
        got, why = plan(P.AUTO, target, rec, True)
    except PlanError:
        assert rec.ratio("fp8") < target and rec.ratio("fp16") < target  # type: ignore[operator]
        return
    kept = rec.ratio(str(got))
    assert kept is not None and kept >= target and got in (P.FP8, P.FP16)
    if got is P.FP16:
        assert rec.ratio("fp8") < target  # type: ignore[operator]  # fp8 would have been faster
    assert "auto" in why


def test_named_precisions() -> None:
    rec = _record(0.9998, 0.9995, 0.9964)
    assert plan(P.FP8, 0.99, rec, True)[0] is P.FP8
    with pytest.raises(PlanError, match=r"fp8 kept 99\.640%.*below accuracy_target 99\.9%"):
        plan(P.FP8, 0.999, rec, True)
    assert plan(P.INT8, 0.999, rec, True)[0] is P.INT8
    with pytest.raises(PlanError, match="calibrated for accuracy"):
        plan(P.INT8, 0.99, None, True)
    assert plan(P.FP16, 0.999, None, False)[0] is P.FP16  # the reference arithmetic needs nothing
    assert plan(P.BF16, 0.999, rec, True)[0] is P.BF16  # not measured, not checked
    with pytest.raises(PlanError, match="fp16 kept only"):
        plan(P.FP16, 0.999, _record(0.998, 0.99, 0.99), True)
    with pytest.raises(PlanError, match="no GPU MLP precision kept 99.9%"):
        plan(P.AUTO, 0.999, _record(0.998, 0.99, 0.99), True)
    assert plan(P.AUTO, None, None, True)[0] is P.FP8 and plan(P.AUTO, None, None, False)[0] is P.FP16
    with pytest.raises(PlanError, match="calibration scales"):
        plan(P.FP8, None, None, False)
