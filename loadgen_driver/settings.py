"""LoadGen TestSettings for DLRM v1 (REFERENCE): MLPerf defaults set explicitly, then user.conf, then flags.

LoadGen 6.x's built-in mlperf.conf carries DLRMv2 values (60 ms), so the v1 values are written into a
generated user.conf that LoadGen reads after its mlperf.conf (keys of model `dlrm`); the user's own
--user-conf lines follow ours in that file, so they win. Command-line flags are applied last.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlperf_loadgen as lg

MODEL = "dlrm"
SERVER_LATENCY_MS = 30
SERVER_MIN_QUERY_COUNT = 270336
OFFLINE_MIN_QUERY_COUNT = 24576
MIN_DURATION_MS = 600_000
PERFORMANCE_SAMPLE_COUNT = 204800
SHORT_DURATION_MS = 5_000
SHORT_MIN_QUERY_COUNT = 1024


class SettingsError(ValueError):
    """Bad settings (unknown scenario, unreadable user.conf, ...)."""


@dataclass(frozen=True)
class RunSettings:
    scenario: str  # "Offline" | "Server"
    mode: str  # "PerformanceOnly" | "AccuracyOnly"
    num_samples: int  # samples of the dataset (the QSL's total count)
    target_qps: float | None = None
    user_conf: Path | None = None
    short: bool = False
    min_duration_ms: int | None = None
    min_query_count: int | None = None
    latency_ms: float | None = None


def v1_conf_lines(scenario: str, num_samples: int, target_qps: float | None) -> list[str]:
    """The MLPerf DLRM v1 settings of REFERENCE, in user.conf syntax."""
    lines = [
        f"{MODEL}.*.performance_sample_count_override = {min(PERFORMANCE_SAMPLE_COUNT, num_samples)}",
        f"{MODEL}.*.min_duration = {MIN_DURATION_MS}",
        f"{MODEL}.Server.target_latency = {SERVER_LATENCY_MS}",
        f"{MODEL}.Server.target_latency_percentile = 99",
        f"{MODEL}.Server.min_query_count = {SERVER_MIN_QUERY_COUNT}",
        f"{MODEL}.Offline.min_query_count = {OFFLINE_MIN_QUERY_COUNT}",
    ]
    if target_qps is not None:
        lines.append(f"{MODEL}.{scenario}.target_qps = {target_qps:g}")
    return lines


def build_test_settings(rs: RunSettings) -> tuple[lg.TestSettings, list[str]]:
    """TestSettings for the run, and notes for the summary (e.g. why it is not of MLPerf length)."""
    if rs.scenario not in ("Offline", "Server"):
        raise SettingsError(f"scenario must be Offline or Server, not {rs.scenario!r}")
    if rs.mode not in ("PerformanceOnly", "AccuracyOnly"):
        raise SettingsError(f"mode must be PerformanceOnly or AccuracyOnly, not {rs.mode!r}")
    lines = v1_conf_lines(rs.scenario, rs.num_samples, rs.target_qps)
    if rs.user_conf is not None:
        try:
            lines += ["# --user-conf " + str(rs.user_conf), rs.user_conf.read_text()]
        except OSError as exc:
            raise SettingsError(f"cannot read --user-conf {rs.user_conf}: {exc}") from exc
    ts = lg.TestSettings()
    ts.scenario = getattr(lg.TestScenario, rs.scenario)
    ts.mode = getattr(lg.TestMode, rs.mode)
    with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="dlrm-v1-") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        if ts.FromConfig(f.name, MODEL, rs.scenario, 1) != 0:
            raise SettingsError(f"LoadGen rejected the settings (user.conf {rs.user_conf})")
    # A user.conf may ask for more performance samples than the dataset has: cap.
    ts.performance_sample_count_override = min(
        ts.performance_sample_count_override or rs.num_samples, rs.num_samples
    )
    if rs.target_qps is not None:
        ts.server_target_qps = rs.target_qps
        ts.offline_expected_qps = rs.target_qps
    if rs.latency_ms is not None:
        ts.server_target_latency_ns = int(rs.latency_ms * 1e6)
    if rs.short:
        ts.min_duration_ms = SHORT_DURATION_MS
        ts.min_query_count = SHORT_MIN_QUERY_COUNT
    if rs.min_duration_ms is not None:
        ts.min_duration_ms = rs.min_duration_ms
    if rs.min_query_count is not None:
        ts.min_query_count = rs.min_query_count
    ts.server_coalesce_queries = True
    notes = []
    required = SERVER_MIN_QUERY_COUNT if rs.scenario == "Server" else OFFLINE_MIN_QUERY_COUNT
    if rs.mode == "PerformanceOnly" and (
        ts.min_duration_ms < MIN_DURATION_MS or ts.min_query_count < required
    ):
        notes.append(
            f"NOT an MLPerf-length run: min_duration {ts.min_duration_ms / 1000:g} s "
            f"(MLPerf: {MIN_DURATION_MS / 1000:g} s), min_query_count {ts.min_query_count} "
            f"(MLPerf: {required})"
        )
    if ts.server_target_latency_ns != SERVER_LATENCY_MS * 1_000_000 and rs.scenario == "Server":
        notes.append(f"Server latency bound {ts.server_target_latency_ns / 1e6:g} ms, not the MLPerf 30 ms")
    if ts.performance_sample_count_override < PERFORMANCE_SAMPLE_COUNT:
        notes.append(
            f"performance_sample_count {ts.performance_sample_count_override} "
            f"(MLPerf: {PERFORMANCE_SAMPLE_COUNT}; capped at the dataset size)"
        )
    return ts, notes
