"""Which MLP arithmetic a GPU engine runs for an accuracy profile, as pure logic.

MLPerf's DLRM has two accuracy profiles, 99% and 99.9% of the fp32 model's AUC. A lower precision is
faster, and is used only where a measurement shows it keeps the profile's target: the artifact's
calibration.json holds that measurement (`dlrm-prepare calibrate`: each precision's AUC on the
calibration set, formats.artifact.AccuracyRecord). `plan` answers a configured precision ("auto", or
one named) with the precision to run, or a PlanError saying what was measured and what to do.
"""
from __future__ import annotations

from formats.artifact import AccuracyRecord
from wire.messages import MlpPrecision

# What "auto" tries, fastest first (the H200 measurements in BENCHMARKS.md: fp8 1.2x fp16 end to end;
# int8 through Triton was slower than fp16, so never chosen automatically).
AUTO_ORDER = (MlpPrecision.FP8, MlpPrecision.FP16)
# Precisions that need the calibration's scales: never served without its accuracy record.
CALIBRATED = (MlpPrecision.INT8, MlpPrecision.FP8)


class PlanError(ValueError):
    """No precision can serve the profile as configured; the message says why and what to run."""


def _kept(record: AccuracyRecord, precision: MlpPrecision) -> float | None:
    return record.ratio(str(precision))


def plan(requested: MlpPrecision, target_share: float | None, record: AccuracyRecord | None,
         calibrated: bool) -> tuple[MlpPrecision, str]:
    """(precision to run, why) for `requested` under a target of `target_share` of the baseline AUC
    (0.99 or 0.999; None: no accuracy profile, for speed runs of synthetic models), with the artifact's
    accuracy record (None: not measured) and whether it has calibration scales at all."""
    if target_share is None:
        if requested is MlpPrecision.AUTO:
            best = MlpPrecision.FP8 if calibrated else MlpPrecision.FP16
            return best, f"auto without an accuracy profile: {best}, the fastest the artifact's scales allow"
        if requested in CALIBRATED and not calibrated:
            raise PlanError(f"{requested} needs the artifact's calibration scales: run dlrm-prepare calibrate")
        return requested, f"{requested}, no accuracy profile"
    percent = f"{100 * target_share:g}%"
    if requested is MlpPrecision.AUTO:
        if record is None:
            return MlpPrecision.FP16, "auto: fp16, the artifact has no accuracy record (dlrm-prepare calibrate)"
        for candidate in AUTO_ORDER:
            kept = _kept(record, candidate)
            if kept is not None and kept >= target_share:
                return candidate, (f"auto: {candidate}, the fastest that kept >= {percent} of the {record.baseline} "
                                   f"AUC on the calibration set ({100 * kept:.3f}%)")
        raise PlanError(f"no GPU MLP precision kept {percent} of the {record.baseline} AUC on the calibration set "
                        f"({_measured(record)}): lower accuracy_target or check the model")
    if requested in CALIBRATED:
        if record is None:
            raise PlanError(f"{requested} needs the artifact calibrated for accuracy: run dlrm-prepare calibrate "
                            f"--model ARTIFACT --dataset CALIBRATION_DATASET (it measures each precision's AUC)")
        kept = _kept(record, requested)
        if kept is None:
            raise PlanError(f"the artifact's accuracy record has no {requested} measurement: re-run dlrm-prepare "
                            "calibrate")
        if kept < target_share:
            raise PlanError(f"{requested} kept {100 * kept:.3f}% of the {record.baseline} AUC on the calibration set, "
                            f"below accuracy_target {percent}: set accuracy_target = \"99\" (if it keeps 99%), "
                            f"or gpu_mlp_precision = \"auto\"")
        return requested, f"{requested}: kept {100 * kept:.3f}% on the calibration set"
    if requested is MlpPrecision.FP16 and record is not None:
        kept = _kept(record, requested)
        if kept is not None and kept < target_share:
            raise PlanError(f"fp16 kept only {100 * kept:.3f}% of the {record.baseline} AUC on the calibration set, "
                            f"below accuracy_target {percent}: check the model")
    return requested, f"{requested}: the reference arithmetic" if requested is MlpPrecision.FP16 else str(requested)


def _measured(record: AccuracyRecord) -> str:
    return ", ".join(f"{p} {100 * (record.ratio(p) or 0):.3f}%" for p in record.auc)
