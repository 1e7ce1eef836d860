"""Live model reload (issue 16) on real CPU engines: a swap in the middle of a LoadGen Server run loses
nothing and answers every query once, naming the model that computed it; a bad new model is refused
with its reason while the old one serves on."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from daemon.metrics import model_id
from engines.reference import Int8Reference
from formats.artifact import Artifact
from formats.dataset import Dataset
from formats.model_config import DLRMConfig
from loadgen_driver.summary import read_summary
from test_daemon_support import REPO, DaemonProc, guarded, make_cpu_artifact, make_dataset, wait_for

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=1000)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reload")
    out = {"a": make_cpu_artifact(d / "a", CONFIG, seed=5), "b": make_cpu_artifact(d / "b", CONFIG, seed=6),
           "small": make_cpu_artifact(d / "small", DLRMConfig.mlperf().scaled(1e-4, cap=500), seed=7)}
    bad = d / "bad"
    shutil.copytree(out["b"], bad)
    emb = bad / "embeddings.int8"
    data = bytearray(emb.read_bytes())
    data[len(data) // 2] ^= 0x55  # one byte of one row: the sampled checksum must see it
    emb.write_bytes(bytes(data))
    out["bad"] = bad
    out["nan"] = _nan_artifact(d / "nan")
    out["ds"] = make_dataset(d / "ds", np.random.default_rng(1).integers(1, 40, size=300), seed=4,
                             table_rows=CONFIG.table_rows)
    return out


def _nan_artifact(d: Path) -> Path:
    """A model whose training diverged: NaN in a top-MLP weight. Its files are sound (checksums, shape);
    only its predictions show it, which the reload's canary must catch."""
    import torch

    from engines.model import random_state_dict
    from formats.frequencies import write_row_frequencies
    from prepare.convert import convert

    d.mkdir(parents=True)
    state = random_state_dict(CONFIG, seed=8)
    state["top_l.2.weight"][3, 5] = float("nan")
    torch.save(state, d / "ckpt.pt")
    write_row_frequencies(d / "f.bin", [np.random.default_rng(t).random(r).astype(np.float32)
                                        for t, r in enumerate(CONFIG.table_rows)])
    convert(d / "ckpt.pt", d / "art", d / "f.bin")
    return d / "art"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reload(d: DaemonProc, **edit: str) -> subprocess.CompletedProcess[str]:
    """Edit the daemon's config file (key = TOML value) and run `dlrm-daemon reload` as a user would."""
    text = d.config_path.read_text()
    for key, value in edit.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        if not n:
            text = f"{key} = {value}\n" + text
    d.config_path.write_text(text)
    return subprocess.run([sys.executable, "-m", "daemon.cli", "reload", "--config", str(d.config_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _metric(port: int, name: str, labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", body, re.M)
    assert found, f"{name}{{{labels}}} not in\n{body}"
    return float(found.group(1))


def test_reload_during_a_loadgen_server_run(models: dict[str, Path], tmp_path: Path) -> None:
    ds = Dataset.open(models["ds"])
    a_id, b_id = model_id(str(models["a"])), model_id(str(models["b"]))
    port = _free_port()
    d = DaemonProc({"engines": ["cpu"], "model": str(models["a"]), "datasets": {"ds": str(models["ds"])},
                    "max_batch_pairs": 512, "heartbeat_timeout_s": 5.0, "metrics_port": port})
    seen: list[tuple[str, np.ndarray, np.ndarray]] = []  # (model, sample ids, predictions) in reply order
    errors: list[str] = []
    stop = threading.Event()

    try:
        d.wait_serving(60)
        # 60 queries/s for 12 s (720 queries: enough for LoadGen's early stopping) of ~20 pairs each. The
        # bound is 2 s, not the GPU's 30 ms: on a 2-core machine the new engine loads (seconds of CPU)
        # beside the serving one, the driver and LoadGen.
        driver = subprocess.Popen(
            [sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Server", "--dataset", str(models["ds"]),
             "--dataset-name", "ds", "--endpoint", d.endpoint, "--target-qps", "60", "--min-duration-s", "12",
             "--min-query-count", "700", "--latency-ms", "2000", "--quiet", "--output-dir", str(tmp_path / "o")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        prober = threading.Thread(target=guarded(_probe, errors), args=(d, ds, seen, stop))  # beside LoadGen
        prober.start()
        wait_for(lambda: len(seen) >= 20, 60, "replies of the first model")
        done = _reload(d, model=f'"{models["b"]}"')
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"reloaded: {a_id} -> {b_id}" in done.stdout and "canary cpu0.m2" in done.stdout, done.stdout
        wait_for(lambda: sum(m == b_id for m, _, _ in seen) >= 20, 60, "replies of the new model")
        out, err = driver.communicate(timeout=180)
        stop.set()
        prober.join(60)
        st = d.status()
        ok = _metric(port, "dlrm_reloads_total", 'outcome="ok"')
        build = _metric(port, "dlrm_build_info", f'model="{b_id}",version="[^"]+"')
    finally:
        stop.set()
        d.close()
    assert not errors, errors
    assert driver.returncode == 0, out + err
    assert read_summary(tmp_path / "o").result == "VALID", out
    assert "errors: 0 samples" in out, out  # every LoadGen query answered, none failed
    # Replies name the model that computed them: the first model, then (once) the new one for good.
    names = [m for m, _, _ in seen]
    switch = names.index(b_id)
    assert set(names[:switch]) == {a_id} and set(names[switch:]) == {b_id}, names
    _check_models(models, ds, seen)
    assert [(e["name"], e["role"], e["model"]) for e in st["engines"]] == [("cpu0.m2", "active", b_id)]
    assert st["model"] == b_id and ok == 1 and build == 1


def test_a_bad_new_model_is_refused_and_the_old_one_serves_on(models: dict[str, Path]) -> None:
    a_id = model_id(str(models["a"]))
    port = _free_port()
    d = DaemonProc({"engines": ["cpu"], "model": str(models["a"]), "datasets": {"ds": str(models["ds"])},
                    "max_batch_pairs": 512, "heartbeat_timeout_s": 5.0, "metrics_port": port})

    def still_serving_a() -> None:
        with d.client(30) as c:
            assert c.infer_by_ref("ds", np.array([0, 1])).model == a_id
        assert [(e["name"], e["model"]) for e in d.status()["engines"]] == [("cpu0", a_id)]

    try:
        d.wait_serving(60)
        cases = [
            ({"model": f'"{models["bad"]}"'}, "bad checksum"),
            ({"model": f'"{models["small"]}"'}, "another shape"),
            ({"model": f'"{models["nan"]}"'}, "non-finite predictions"),
            ({"model": f'"{models["a"]}"', "max_batch_pairs": "1024"}, "need a restart"),
            ({"model": f'"{models["a"]}/missing"', "max_batch_pairs": "512"}, "configuration"),
        ]
        for edit, why in cases:
            r = _reload(d, **edit)
            assert r.returncode == 1 and "refused" in r.stderr and why in r.stderr, (edit, r.stdout, r.stderr)
            still_serving_a()
        assert _metric(port, "dlrm_reloads_total", 'outcome="failed"') == len(cases)
        r = _reload(d, model=f'"{models["a"]}"')  # the same model again: nothing to swap
        assert r.returncode == 0 and "the engines keep model" in r.stdout, r.stdout + r.stderr
        still_serving_a()
        # SIGHUP reloads too (systemd's Type=notify-reload, or `kill -HUP`): the config now names model b
        text = d.config_path.read_text()
        d.config_path.write_text(re.sub(r'^model = .*$', f'model = "{models["b"]}"', text, flags=re.M))
        os.kill(d.proc.pid, signal.SIGHUP)
        b_id = model_id(str(models["b"]))
        wait_for(lambda: d.status()["model"] == b_id and len(d.status()["engines"]) == 1, 120, "the SIGHUP reload")
        with d.client(30) as c:
            assert c.infer_by_ref("ds", np.array([0])).model == b_id
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        d.close()


def _probe(d: DaemonProc, ds: Dataset, seen: list[tuple[str, np.ndarray, np.ndarray]], stop: threading.Event) -> None:
    """A client asking all along, recording which model answered what (any error fails the test)."""
    rng = np.random.default_rng(3)
    with d.client(120) as c:
        while not stop.is_set():
            ids = rng.integers(0, ds.num_samples, size=3)
            preds = c.infer_by_ref("ds", ids)
            seen.append((preds.model, ids, np.array(preds)))
            time.sleep(0.02)


def _check_models(models: dict[str, Path], ds: Dataset, seen: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Every reply equals the reference of the model it names (one model per query)."""
    refs = {model_id(str(models[k])): Int8Reference(Artifact.open(models[k]), 1.0) for k in ("a", "b")}
    off = ds.sample_offsets
    for m, ids, preds in seen:
        idx = np.concatenate([np.arange(off[s], off[s + 1]) for s in ids])
        np.testing.assert_allclose(preds, refs[m].predict(ds.dense[idx], ds.sparse[idx]), rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _serving_with_probe(models: dict[str, Path], engines: list[str],
                        **config: Any) -> Iterator[tuple[DaemonProc, list[tuple[str, np.ndarray, np.ndarray]]]]:
    """A daemon on model a, a probing client asking all along (its replies in the list), both stopped after."""
    d = DaemonProc({"engines": engines, "model": str(models["a"]), "datasets": {"ds": str(models["ds"])},
                    "max_batch_pairs": 512, "heartbeat_timeout_s": 5.0, **config})
    seen: list[tuple[str, np.ndarray, np.ndarray]] = []
    errors: list[str] = []
    stop = threading.Event()
    prober = threading.Thread(target=guarded(_probe, errors), args=(d, Dataset.open(models["ds"]), seen, stop))
    try:
        d.wait_serving(60)
        prober.start()
        wait_for(lambda: len(seen) >= 10, 60, "replies of the first model")
        yield d, seen
    finally:
        stop.set()
        if prober.is_alive():
            prober.join(60)
        d.close()
    assert not errors, errors


@pytest.mark.parametrize("engines", [["cpu", "cpu"], ["cpu"]])
def test_rolling_reload_engine_by_engine(models: dict[str, Path], engines: list[str]) -> None:
    """reload_strategy = "rolling": each old engine stops before its replacement loads (for GPUs without
    room for two models); the others serve meanwhile, and with one engine the queries wait for the new one.
    Nothing fails, and each reply is one model's."""
    b_id = model_id(str(models["b"]))
    names = [f"cpu{i}" for i in range(len(engines))]
    with _serving_with_probe(models, engines, reload_strategy="rolling") as (d, seen):
        r = _reload(d, model=f'"{models["b"]}"')
        assert r.returncode == 0, r.stdout + r.stderr
        for n in names:
            assert f"{n} replaced by {n}.m2" in r.stdout, r.stdout
        wait_for(lambda: sum(m == b_id for m, _, _ in seen) >= 10, 60, "replies of the new model")
        st = d.status()
    assert sorted((e["name"], e["model"]) for e in st["engines"]) == [(f"{n}.m2", b_id) for n in names]
    _check_models(models, Dataset.open(models["ds"]), seen)


def test_rolling_reload_of_a_bad_model_puts_the_old_one_back(models: dict[str, Path]) -> None:
    a_id = model_id(str(models["a"]))
    with _serving_with_probe(models, ["cpu", "cpu"], reload_strategy="rolling") as (d, seen):
        r = _reload(d, model=f'"{models["nan"]}"')
        assert r.returncode == 1 and "non-finite predictions" in r.stderr, r.stdout + r.stderr
        wait_for(lambda: len(d.status()["engines"]) == 2 and all(e["state"] == "ready" and e["model"] == a_id
                                                                 for e in d.status()["engines"]), 60, "the old model back")
        n = len(seen)
        wait_for(lambda: len(seen) >= n + 10, 60, "replies after the rollback")
    assert {m for m, _, _ in seen} == {a_id}  # the bad model never answered
    _check_models(models, Dataset.open(models["ds"]), seen)
