"""Faults beyond tests/test_daemon_serving.py (issue 6): a LoadGen Server run with one engine
SIGKILLed and another SIGSTOPped mid-run; a driver SIGKILLed mid-run (its queued work is dropped,
others are served); a dispatcher SIGKILLed and the next start on the same runtime dir; corrupt or
truncated artifacts and datasets refused at start with the file named and the documented exit code."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from formats.artifact import write_model_description
from wire.shm import list_regions
from formats.model_config import DLRMConfig
from engines.model import random_state_dict
from loadgen_driver.summary import read_summary
from prepare.convert import convert
from test_daemon_support import REPO, DaemonProc, expected_null_by_ref, make_dataset, wait_for


def _null_art(d: Path) -> Path:
    art = d / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    return art


def test_loadgen_server_run_survives_engine_kill_and_hang(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", np.random.default_rng(3).integers(1, 20, size=400))
    d = DaemonProc({"engines": ["null", "null", "null"], "model": str(_null_art(tmp_path)),
                    "max_batch_pairs": 2048, "max_pairs_per_query": 2000},
                   env={"DLRM_NULL_DELAY_S": "0.002"})
    out_dir = tmp_path / "o"
    try:
        engines = d.wait_serving()["engines"]
        driver = subprocess.Popen(
            [sys.executable, "-m", "loadgen_driver.cli", "--scenario", "Server", "--dataset", str(ds),
             "--endpoint", d.endpoint, "--target-qps", "400", "--min-duration-s", "6",
             "--min-query-count", "100", "--timeout-s", "10", "--latency-ms", "1000", "--quiet",
             "--output-dir", str(out_dir)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_for(lambda: (out_dir / "mlperf_log_detail.txt").exists() or driver.poll() is not None, 60, "LoadGen")
        time.sleep(1.5)
        os.kill(engines[0]["pid"], signal.SIGKILL)
        time.sleep(1.5)
        os.kill(engines[1]["pid"], signal.SIGSTOP)
        t_stop = time.monotonic()
        hung = wait_for(lambda: d.status()["engines"][1]["last_error"].startswith("no heartbeat") and
                     time.monotonic(), 10, "the hung engine to be noticed")
        noticed_s = hung - t_stop
        out, err = driver.communicate(timeout=120)
        st = wait_for(lambda: (lambda s: s if all(e["state"] == "ready" for e in s["engines"]) else None)(
            d.status()), 20, "every engine back")
    finally:
        d.close()
    # The run completed (LoadGen wrote its summary only after every issued sample was completed).
    summary = read_summary(out_dir)
    assert summary.result in ("VALID", "INVALID"), out + err
    errors = int(re.search(r"errors: ([\d,]+) samples", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    if driver.returncode == 0:
        assert errors == 0
    else:  # every lost sample reported as an engine error, none silently missing
        assert driver.returncode == 1 and "RUN FAILED" in err and "ENGINE_FAILED" in err, err
        assert "no reply from the backend" not in err, err
    # Both engines came back with new processes; the hang was noticed by its heartbeat in time.
    e0, e1 = st["engines"][0], st["engines"][1]
    assert e0["pid"] != engines[0]["pid"] and e0["restarts"] >= 1
    assert e1["pid"] != engines[1]["pid"] and e1["restarts"] >= 1
    assert noticed_s < 5.0, noticed_s  # heartbeat_timeout_s 0.8 (DaemonProc); slack for a loaded CI host
    print(f"server run: rc={driver.returncode} errors={errors} samples; hang noticed after {noticed_s:.2f} s; "
          f"totals={st['totals']}")


_FLOOD = """
import sys, time, numpy as np
from wire.client import PipelinedClient
pc = PipelinedClient(sys.argv[1])
for rid in range(3000):
    pc.send_by_ref(rid, "ds", np.array([rid % 200, (rid + 1) % 200]))
print("sent", flush=True)
time.sleep(60)
"""


def test_killed_driver_work_is_dropped_others_served(tmp_path: Path) -> None:
    sizes = np.random.default_rng(4).integers(1, 20, size=200)
    ds = make_dataset(tmp_path / "ds", sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    d = DaemonProc({"engines": ["null"], "datasets": {"ds": str(ds)}, "max_batch_pairs": 200,
                    "inflight_batches": 1}, env={"DLRM_NULL_DELAY_S": "0.05"})
    try:
        d.wait_serving()
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, d.endpoint], cwd=REPO, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert flood.stdout is not None and flood.stdout.readline().strip() == "sent"
        queued = wait_for(lambda: d.status()["queue_queries"] > 1000 and d.status()["queue_queries"], 20, "a queue")
        flood.kill()
        flood.wait()
        # Without cancellation the queue would take ~3000 queries / (10 per 0.05 s batch) = 15 s to drain.
        st = wait_for(lambda: (lambda s: s if s["queue_queries"] == 0 else None)(d.status()), 3, "the queue dropped")
        assert st["totals"]["cancelled_disconnected"] >= queued - 50, st["totals"]
        with d.client(5.0) as c:
            ids = np.array([5, 7])
            t0 = time.monotonic()
            np.testing.assert_array_equal(c.infer_by_ref("ds", ids), expected_null_by_ref(offsets, ids))
            assert time.monotonic() - t0 < 5.0  # now, not after the dead client's ~15 s backlog
    finally:
        assert d.terminate() == 0


def test_dispatcher_killed_next_start_cleans_up(tmp_path: Path) -> None:
    d = DaemonProc({"engines": ["null", "null"]})
    d2 = None
    try:
        pids = [e["pid"] for e in d.wait_serving()["engines"]]
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text()
                              .split(")")[-1].split()[0] for p in pids), 10, "engines to exit")
        old_socks = sorted(p.name for p in Path(d.rt).glob("engine-*.sock"))
        # (its regions may already be gone: any daemon starting meanwhile removes regions of dead owners)
        assert old_socks == ["engine-00-000001.sock", "engine-01-000001.sock"], old_socks
        # A second daemon on the same runtime dir: the lock is free (the holder died) and leftovers go.
        d2 = DaemonProc({"engines": ["null"], "runtime_dir": d.rt, "endpoint": f"ipc://{d.rt}/dlrm.sock"})
        d2.endpoint = f"ipc://{d.rt}/dlrm.sock"
        st = d2.wait_serving()
        assert list_regions(d.proc.pid) == []
        now_socks = sorted(p.name for p in Path(d.rt).glob("engine-*.sock"))
        assert now_socks == ["engine-00-000001.sock"], now_socks
        assert len(list_regions(st["pid"])) == 1
        assert d2.terminate() == 0
        d2 = None
    finally:
        if d2 is not None:
            d2.close()
        d.close()


@pytest.fixture(scope="module")
def good_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("corrupt")
    cfg = DLRMConfig.mlperf().scaled(1e-4, cap=1000)
    torch.save(random_state_dict(cfg, seed=5), d / "ckpt.pt")
    convert(d / "ckpt.pt", d / "art", None)
    make_dataset(d / "ds", np.full(20, 5), table_rows=cfg.table_rows)
    return d / "art", d / "ds"


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("case,damage,code,names", [
    ("truncated embeddings", lambda a, s: os.truncate(a / "embeddings.int8", (a / "embeddings.int8").stat().st_size - 4096),
     70, "embeddings.int8"),
    ("flipped byte in embeddings", lambda a, s: _flip(a / "embeddings.int8", 100), 70, "embeddings.int8"),
    ("truncated mlp.npz", lambda a, s: os.truncate(a / "mlp.npz", 1000), 70, "mlp.npz"),
    ("garbage artifact meta.json", lambda a, s: (a / "meta.json").write_text("{garbage"), 78, "meta.json"),
    ("truncated dataset sparse.npy", lambda a, s: os.truncate(s / "sparse.npy", (s / "sparse.npy").stat().st_size - 100),
     78, "sparse.npy"),
    ("garbage dataset offsets", lambda a, s: (s / "sample_offsets.npy").write_bytes(b"\x93NUMPY garbage"),
     78, "sample_offsets.npy"),
])
def test_corrupt_files_refused_at_start(good_files: tuple[Path, Path], tmp_path: Path, case: str,
                                        damage, code: int, names: str) -> None:  # type: ignore[no-untyped-def]
    art, ds = shutil.copytree(good_files[0], tmp_path / "art"), shutil.copytree(good_files[1], tmp_path / "ds")
    damage(art, ds)
    d = DaemonProc({"engines": ["cpu"], "model": str(art), "datasets": {"ds": str(ds)},
                    "heartbeat_timeout_s": 5.0})
    try:
        rc = d.proc.wait(60)
        log = d.log()
    finally:
        d.close()
    assert rc == code, (case, log)
    assert re.search(rf"{re.escape(str(tmp_path))}/(art|ds)/{re.escape(names)}", log), (case, log)
