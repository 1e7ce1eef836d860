"""Standby engines (issue 14, item 3: a lost engine must not stop the service for its restart): with
`standby_engines`, a loaded spare per device takes the batches of a killed active engine at once, and the
killed one restarts as the new spare. On real CPU engines, with a client asking all along."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.metrics import model_id
from formats.dataset import Dataset
from test_daemon_reload import _check_models, _reload, models  # noqa: F401  (the fixture)
from test_daemon_support import DaemonProc, guarded, wait_for

SERVING = ("ready", "busy")


def _roles(d: DaemonProc) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["role"], e["state"] if e["state"] not in SERVING else "serving")
            for e in d.status()["engines"]}


def _ask(d: DaemonProc, ds: Dataset, seen: list[tuple[float, str, np.ndarray, np.ndarray]],
         stop: threading.Event) -> None:
    """A client asking all along; each reply with the time it came (any error fails the test)."""
    rng = np.random.default_rng(3)
    with d.client(120) as c:
        while not stop.is_set():
            ids = rng.integers(0, ds.num_samples, size=3)
            preds = c.infer_by_ref("ds", ids)
            seen.append((time.monotonic(), preds.model, ids, np.array(preds)))
            time.sleep(0.01)


def _longest_wait(seen: list[tuple[float, str, np.ndarray, np.ndarray]], since: float, until: float) -> float:
    times = [since] + [t for t, *_ in seen if since < t <= until]
    return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else until - since


def test_the_standby_serves_at_once_when_the_active_engine_is_killed(models: dict[str, Path]) -> None:
    ds = Dataset.open(models["ds"])
    # restart_backoff_s 5: without the spare the service would stop for at least 5 s plus a CPU engine's
    # start (its torch import alone takes seconds here), so a short wait shows the spare took over.
    d = DaemonProc({"engines": ["cpu"], "model": str(models["a"]), "datasets": {"ds": str(models["ds"])},
                    "max_batch_pairs": 512, "heartbeat_timeout_s": 5.0, "standby_engines": True,
                    "restart_backoff_s": 5.0})
    seen: list[tuple[float, str, np.ndarray, np.ndarray]] = []
    errors: list[str] = []
    stop = threading.Event()
    asker = threading.Thread(target=guarded(_ask, errors), args=(d, ds, seen, stop))
    try:
        d.wait_serving(90)
        wait_for(lambda: _roles(d) == {"cpu0": ("active", "serving"), "cpu0.standby": ("standby", "serving")},
                 90, "the active engine and its spare")
        log = d.log()  # the spare starts once the active engine serves (it must not take memory the active needs)
        assert log.index("engine cpu0 ready (pid") < log.index("engine cpu0.standby (cpu) starting"), log
        asker.start()
        wait_for(lambda: len(seen) >= 10, 60, "first replies")
        for active, spare in (("cpu0", "cpu0.standby"), ("cpu0.standby", "cpu0")):
            pid = next(e["pid"] for e in d.status()["engines"] if e["name"] == active)
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: any(t > killed + 3.0 for t, *_ in seen), 30, "replies 3 s after the kill")
            wait = _longest_wait(seen, killed, killed + 3.0)
            assert wait < 1.5, f"no reply for {wait:.2f} s after {active} was killed (its spare: {spare})"
            assert _roles(d)[spare][0] == "active"
            # the killed engine restarts (after the 5 s backoff) as the new spare
            wait_for(lambda: _roles(d) == {spare: ("active", "serving"), active: ("standby", "serving")}, 90,
                     f"{active} back as the standby")
        restarts = {e["name"]: e["restarts"] for e in d.status()["engines"]}
        assert restarts == {"cpu0": 1, "cpu0.standby": 1}, restarts
    finally:
        stop.set()
        if asker.is_alive():
            asker.join(60)
        d.close()
    assert not errors, errors
    _check_models(models, ds, [(m, ids, p) for _, m, ids, p in seen])


def test_a_reload_replaces_the_standby_with_the_new_model(models: dict[str, Path]) -> None:
    """The spare holds the served model: a reload retires it first (its memory goes to the new model) and
    starts a new one with the new model after."""
    b_id = model_id(str(models["b"]))
    d = DaemonProc({"engines": ["cpu"], "model": str(models["a"]), "datasets": {"ds": str(models["ds"])},
                    "max_batch_pairs": 512, "heartbeat_timeout_s": 5.0, "standby_engines": True})
    try:
        d.wait_serving(90)
        wait_for(lambda: _roles(d).get("cpu0.standby") == ("standby", "serving"), 90, "the spare")
        r = _reload(d, model=f'"{models["b"]}"')
        assert r.returncode == 0, r.stdout + r.stderr

        def settled() -> Any:
            st = d.status()["engines"]
            return sorted((e["name"], e["role"], e["model"]) for e in st if e["state"] in SERVING) == [
                ("cpu0.m2", "active", b_id), ("cpu0.standby", "standby", b_id)] and len(st) == 2
        wait_for(settled, 90, "the new model's engine and spare")
    finally:
        d.close()
