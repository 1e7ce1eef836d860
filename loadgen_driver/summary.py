"""Read LoadGen's mlperf_log_summary.txt / mlperf_log_detail.txt and print the run's human summary."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoadgenSummary:
    values: dict[str, str] = field(default_factory=dict)  # "key : value" lines of the summary
    checks: list[str] = field(default_factory=list)  # the indented lines under "Result is"
    warnings: list[str] = field(default_factory=list)  # errors/warnings of the detail log

    @property
    def result(self) -> str:
        return self.values.get("Result is", "UNKNOWN")

    def number(self, key: str) -> float | None:
        raw = self.values.get(key)
        try:
            return None if raw is None else float(raw)
        except ValueError:
            return None

    def failed_checks(self) -> list[str]:
        return [c for c in self.checks if re.search(r":\s*(No|NO)\b", c)]


_KV = re.compile(r"^(\S[^:]*?)\s*:\s*(.*)$")


def read_summary(output_dir: Path) -> LoadgenSummary:
    """Parse the summary (missing files give an empty summary: the caller reports UNKNOWN)."""
    summary = LoadgenSummary()
    path = output_dir / "mlperf_log_summary.txt"
    if path.exists():
        in_result = False
        for line in path.read_text().splitlines():
            if line.startswith("  ") and in_result:
                summary.checks.append(line.strip())
                continue
            in_result = line.startswith("Result is")
            m = _KV.match(line.strip())
            if m and not line.startswith("="):
                summary.values.setdefault(m.group(1).strip(), m.group(2).strip())
    detail = output_dir / "mlperf_log_detail.txt"
    if detail.exists():
        for line in detail.read_text().splitlines():
            # Detail lines are ":::MLLOG {json}"; keep the errors and warnings LoadGen logged.
            if not line.startswith(":::MLLOG"):
                continue
            try:
                rec = json.loads(line[len(":::MLLOG"):])
            except json.JSONDecodeError:
                continue
            if rec.get("key") in ("error", "warning"):
                summary.warnings.append(f"{rec['key']}: {rec.get('value')}")
    return summary


def _ms(ns: float | None) -> str:
    return "n/a" if ns is None else f"{ns / 1e6:.2f} ms"


def format_summary(
    scenario: str,
    mode: str,
    summary: LoadgenSummary,
    completed_samples: int,
    completed_pairs: int,
    wall_s: float,
    error_samples: int,
    complete_ns_per_sample: float,
    notes: list[str],
    auc_lines: list[str] | None = None,
    unsent_samples: int = 0,
    warnings: list[str] | None = None,
    requests_line: str | None = None,
) -> str:
    """The short human summary printed at the end of a run."""
    out = [f"== loadgen_driver: {scenario} {mode} =="]
    for note in notes:
        out.append(f"NOTE: {note}")
    rate_key = "Samples per second" if scenario == "Offline" else "Completed samples per second"
    sps = summary.number(rate_key) or summary.number("Samples per second")
    if mode == "PerformanceOnly":
        if not completed_samples:
            out.append("throughput: n/a (no sample got a prediction)")
        elif sps is not None:
            pairs_per_sample = completed_pairs / completed_samples
            out.append(f"throughput: {sps:,.0f} samples/s, {sps * pairs_per_sample:,.0f} pairs/s (LoadGen)")
        if scenario == "Server":
            sched = summary.number("Scheduled samples per second")
            if sched is not None:
                out.append(f"scheduled: {sched:,.0f} samples/s")
        out.append(
            "latency: p50 {} p90 {} p99 {}".format(
                _ms(summary.number("50.00 percentile latency (ns)")),
                _ms(summary.number("90.00 percentile latency (ns)")),
                _ms(summary.number("99.00 percentile latency (ns)")),
            )
        )
        result = summary.result
        why = summary.failed_checks()
        if error_samples:
            # Failed samples were completed without data, so LoadGen's own verdict means nothing.
            out.append(f"result: INVALID ({error_samples:,} samples failed; LoadGen's own verdict, {result}, "
                       "does not count)")
        else:
            out.append(f"result: {result}" + (f" ({'; '.join(why)})" if why and result != "VALID" else ""))
    out.append(
        f"driver: {completed_samples:,} samples, {completed_pairs:,} pairs in {wall_s:.1f} s; "
        f"completion cost {complete_ns_per_sample:,.0f} ns/sample; errors: {error_samples:,} samples"
        + (f" ({unsent_samples:,} of them never sent: the daemon had stopped answering)" if unsent_samples else "")
    )
    if requests_line:
        out.append(requests_line)
    for w in warnings or []:
        out.append(f"warning: {w}")
    for w in summary.warnings[:5]:
        out.append(f"loadgen {w}")
    out.extend(auc_lines or [])
    return "\n".join(out)
