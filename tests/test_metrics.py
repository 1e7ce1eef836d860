"""DaemonMetrics: values through a real HTTP scrape, and `promtool check metrics` on that scrape."""
from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import LATENCY_BUCKETS_S, DaemonMetrics, start_exporter


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # `make test` installs it (make test-deps); failing beats skipping silently
        pytest.fail(f"{name} not found: run `make test-deps` (apt-get install prometheus systemd)")
    return path


def _exercise(m: DaemonMetrics) -> None:
    m.register_engine("cuda3", "cuda:3", "tb00_40M@0123456789ab")
    m.register_engine("cpu1", "cpu", "tb00_40M@0123456789ab")
    m.set_engine_info("cuda3", "NVIDIA H200")
    m.set_engine_info("cuda3", "NVIDIA H100 80GB HBM3")  # a restart on another card replaces the series
    m.set_engine_info("cpu1", "")
    m.set_engine_up("cuda3", True)
    m.set_engine_up("cpu1", False)
    m.engine_restarted("cpu1")
    m.observe_query("by_ref", "ok", samples=3, pairs=810, latency_s=0.012)
    m.observe_query("by_ref", "ok", samples=1, pairs=100, latency_s=0.031)
    m.observe_query("by_value", "TIMEOUT", samples=0, pairs=200, latency_s=0.5)
    m.observe_error("TIMEOUT")  # the dispatcher reports every Error reply once here
    m.observe_error("BAD_REQUEST")
    m.observe_batch("cuda3", pairs=910, queue_wait_s=0.002, assembly_s=0.001, compute_s=0.007,
                    hot_lookups=900, cold_lookups=100)
    m.observe_reply("cuda3", 0.0004)
    m.batch_retried("cpu1")
    m.queries_dropped("client_disconnected", 3)
    m.set_build_info("1.2.3", "tb00_40M@0123456789ab")
    m.set_queue_depth(queries=4, pairs=1080)
    m.set_inflight("cuda3", 2)
    m.set_device_memory("cuda3", 123456789)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def scrape_text() -> str:
    registry = CollectorRegistry()
    m = DaemonMetrics(registry)
    _exercise(m)
    exporter = start_exporter(registry, "127.0.0.1", 0)
    try:
        assert exporter.port > 0
        return _scrape(exporter.port)
    finally:
        exporter.close()


def test_values_over_http(scrape_text: str) -> None:
    s = _samples(scrape_text)
    assert s[("dlrm_queries_total", (("kind", "by_ref"), ("outcome", "ok")))] == 2
    assert s[("dlrm_samples_total", (("kind", "by_ref"), ("outcome", "ok")))] == 4
    assert s[("dlrm_pairs_total", (("kind", "by_ref"), ("outcome", "ok")))] == 910
    assert s[("dlrm_pairs_total", (("kind", "by_value"), ("outcome", "TIMEOUT")))] == 200
    assert s[("dlrm_errors_total", (("code", "TIMEOUT"),))] == 1
    assert s[("dlrm_errors_total", (("code", "BAD_REQUEST"),))] == 1
    assert s[("dlrm_errors_total", (("code", "OVERLOADED"),))] == 0  # pre-created, so rate() works
    # 12 ms falls in the 12.5 ms bucket, 31 ms only from the 32.5 ms bucket on.
    assert s[("dlrm_query_latency_seconds_bucket", (("kind", "by_ref"), ("le", "0.0125")))] == 1
    assert s[("dlrm_query_latency_seconds_bucket", (("kind", "by_ref"), ("le", "0.03")))] == 1
    assert s[("dlrm_query_latency_seconds_bucket", (("kind", "by_ref"), ("le", "0.0325")))] == 2
    assert s[("dlrm_query_latency_seconds_count", (("kind", "by_ref"),))] == 2
    assert s[("dlrm_query_latency_seconds_sum", (("kind", "by_ref"),))] == pytest.approx(0.043)
    for stage, value in (("queue_wait", 0.002), ("batch_assembly", 0.001), ("engine_compute", 0.007),
                         ("reply", 0.0004)):
        assert s[("dlrm_stage_latency_seconds_sum", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"), ("stage", stage)))] == pytest.approx(value)
        assert s[("dlrm_stage_latency_seconds_count", (("engine", "cpu1"), ("gpu", ""), ("model", "tb00_40M@0123456789ab"), ("stage", stage)))] == 0
    assert s[("dlrm_batch_retries_total", (("engine", "cpu1"), ("gpu", ""), ("model", "tb00_40M@0123456789ab"),))] == 1
    assert s[("dlrm_batch_retries_total", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"),))] == 0
    assert s[("dlrm_dropped_queries_total", (("reason", "client_disconnected"),))] == 3
    assert s[("dlrm_build_info", (("model", "tb00_40M@0123456789ab"), ("version", "1.2.3")))] == 1
    # the dispatcher's own process (the soak tracks its memory), from prometheus_client's collectors
    assert s[("process_resident_memory_bytes", ())] > 10e6 and ("process_cpu_seconds_total", ()) in s
    assert ("python_info", (("implementation", "CPython"), ("major", "3"), ("minor", str(sys.version_info.minor)),
                            ("patchlevel", str(sys.version_info.micro)), ("version", sys.version.split()[0]))) in s
    # an overload's seconds are resolved, up to a minute
    assert 2.5 in LATENCY_BUCKETS_S and 60.0 in LATENCY_BUCKETS_S
    assert s[("dlrm_query_latency_seconds_bucket", (("kind", "by_value"), ("le", "0.5")))] == 1
    assert s[("dlrm_batch_latency_seconds_sum", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"),))] == pytest.approx(0.010)
    assert s[("dlrm_batch_size_pairs_bucket", (("engine", "cuda3"), ("gpu", "3"), ("le", "1000.0"), ("model", "tb00_40M@0123456789ab")))] == 1
    assert s[("dlrm_batch_size_pairs_bucket", (("engine", "cuda3"), ("gpu", "3"), ("le", "500.0"), ("model", "tb00_40M@0123456789ab")))] == 0
    assert s[("dlrm_batches_total", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"),))] == 1
    assert s[("dlrm_embedding_lookups_total", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"), ("tier", "device")))] == 900
    assert s[("dlrm_embedding_lookups_total", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"), ("tier", "host")))] == 100
    assert s[("dlrm_embedding_lookups_total", (("engine", "cpu1"), ("gpu", ""), ("model", "tb00_40M@0123456789ab"), ("tier", "host")))] == 0
    assert s[("dlrm_queue_depth_queries", ())] == 4
    assert s[("dlrm_queue_depth_pairs", ())] == 1080
    assert s[("dlrm_engine_inflight_batches", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"),))] == 2
    assert s[("dlrm_engine_up", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"),))] == 1
    assert s[("dlrm_engine_up", (("engine", "cpu1"), ("gpu", ""), ("model", "tb00_40M@0123456789ab"),))] == 0
    assert s[("dlrm_engine_restarts_total", (("engine", "cpu1"), ("gpu", ""), ("model", "tb00_40M@0123456789ab"),))] == 1
    assert s[("dlrm_engine_restarts_total", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"),))] == 0
    assert s[("dlrm_device_memory_used_bytes", (("engine", "cuda3"), ("gpu", "3"), ("model", "tb00_40M@0123456789ab"),))] == 123456789
    # the GPU's name, once per engine: the latest the engine reported
    info = {k[1]: v for k, v in s.items() if k[0] == "dlrm_engine_info"}
    model = ("model", "tb00_40M@0123456789ab")
    assert info == {(("device", "cuda:3"), ("engine", "cuda3"), ("gpu", "3"), ("gpu_name", "NVIDIA H100 80GB HBM3"),
                     model): 1,
                    (("device", "cpu"), ("engine", "cpu1"), ("gpu", ""), ("gpu_name", ""), model): 1}


def test_every_metric_is_dlrm_and_typed(scrape_text: str) -> None:
    families = list(text_string_to_metric_families(scrape_text))
    names = {f.name for f in families}
    # ours, and prometheus_client's process and platform collectors' (process_*, python_info)
    assert all(n.startswith(("dlrm_", "process_", "python_info")) for n in names), names
    assert any(n.startswith("process_") for n in names)
    types = {f.name: f.type for f in families}
    assert types["dlrm_query_latency_seconds"] == "histogram"
    assert types["dlrm_queries"] == "counter"  # the parser strips _total from counter families
    assert "summary" not in types.values()
    assert 0.03 in LATENCY_BUCKETS_S


def test_registry_is_injected_not_global() -> None:
    before = {m.name for m in REGISTRY.collect()}
    DaemonMetrics(CollectorRegistry())
    DaemonMetrics(CollectorRegistry())  # a second instance must not collide
    assert not any(n.startswith("dlrm_") for n in {m.name for m in REGISTRY.collect()} - before)


def test_promtool_check_metrics(scrape_text: str) -> None:
    proc = subprocess.run([_tool("promtool"), "check", "metrics"], input=scrape_text,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", (
        proc.stdout + proc.stderr)


def test_exporter_bind_error_is_clear() -> None:
    registry = CollectorRegistry()
    first = start_exporter(registry, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{first.port}"):
            start_exporter(registry, "127.0.0.1", first.port)
    finally:
        first.close()


def test_version_and_model_id(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import re
    from pathlib import Path

    from daemon.metrics import daemon_version, model_id
    from formats.artifact import write_model_description
    from formats.model_config import DLRMConfig

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert daemon_version() == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)  # type: ignore[union-attr]
    art = write_model_description(tmp_path / "tb00", DLRMConfig((5, 5)))
    first = model_id(str(art))
    assert re.fullmatch(r"tb00@[0-9a-f]{12}", first) and model_id(str(art)) == first
    write_model_description(art, DLRMConfig((5, 6)))  # another model in the same directory
    assert model_id(str(art)) != first
    assert model_id("") == "none" and model_id(str(tmp_path / "missing")) == "none"
