"""The command lines a new user meets first: `dlrm-daemon status`, help texts, default endpoints."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from daemon.config import ConfigError, find_endpoint, load_config
from wire.endpoints import client_endpoint, default_endpoint
from test_daemon_support import REPO, DaemonProc, make_dataset


@pytest.fixture(scope="module")
def default_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A null-engine daemon on its default endpoint (no endpoint, no runtime_dir configured)."""
    d = tmp_path_factory.mktemp("cli")
    art = d / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    ds = make_dataset(d / "ds", np.full(40, 3))
    daemon = DaemonProc({"engines": ["null"], "model": str(art)}, default_runtime_dir=True)
    try:
        daemon.wait_serving()
        yield daemon, ds
    finally:
        daemon.terminate()


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_status_without_flags_finds_the_daemon(default_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon, _ = default_daemon
    proc = _cli(["daemon.cli", "status"], daemon.client_env)
    assert proc.returncode == 0, proc.stderr
    assert f"on {daemon.endpoint}" in proc.stdout and "null0" in proc.stdout


def test_status_config_needs_only_the_endpoint(default_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    daemon, _ = default_daemon
    cfg = tmp_path / "client.toml"  # no model, no engines: not a serving config, and it need not be
    cfg.write_text(f'endpoint = "{daemon.endpoint}"\n')
    proc = _cli(["daemon.cli", "status", "--config", str(cfg)], daemon.client_env)
    assert proc.returncode == 0, proc.stderr


def test_driver_default_endpoint_is_the_daemons(default_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    daemon, ds = default_daemon
    proc = _cli(["loadgen_driver.cli", "--scenario", "Offline", "--dataset", str(ds), "--quiet",
                 "--min-duration-s", "0", "--min-query-count", "40", "--target-qps", "100",
                 "--output-dir", str(tmp_path / "o")], daemon.client_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "errors: 0 samples" in proc.stdout


def test_status_into_a_closed_pipe_prints_no_traceback(default_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon, _ = default_daemon
    proc = subprocess.run(f"{sys.executable} -m daemon.cli status --endpoint {daemon.endpoint} | true",
                          shell=True, cwd=REPO, env=daemon.client_env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_one_default_endpoint_for_daemon_and_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    cfg = load_config(None, {"engines": "null"}, env=env)
    assert cfg.endpoint == default_endpoint(env) == client_endpoint(env)
    assert client_endpoint({**env, "DLRM_ENDPOINT": "tcp://127.0.0.1:5"}) == "tcp://127.0.0.1:5"
    assert client_endpoint({"DLRM_RUNTIME_DIR": str(tmp_path / "x")}) == f"ipc://{tmp_path}/x/dlrm.sock"
    # Under systemd the daemon's RUNTIME_DIRECTORY is not in a client's environment: the client finds
    # the unit's socket where it exists.
    import socket

    import wire.endpoints as endpoints

    unit_dir = tmp_path / "run-dlrm-daemon"
    unit_dir.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(unit_dir / "dlrm.sock"))
    try:
        monkeypatch.setattr(endpoints, "SYSTEMD_RUNTIME_DIR", str(unit_dir))
        daemon_side = load_config(None, {"engines": "null"}, env={"RUNTIME_DIRECTORY": str(unit_dir)})
        assert client_endpoint({}) == daemon_side.endpoint
    finally:
        sock.close()


def test_config_errors_name_the_file_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.toml", env={})
    assert "cannot read config file" in str(err.value) and "config key" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot read config file"):
        find_endpoint(tmp_path / "missing.toml")
    proc = _cli(["daemon.cli", "--config", str(tmp_path / "missing.toml")], {"PATH": "/usr/bin:/bin",
                                                                             "PYTHONPATH": str(REPO)})
    assert proc.returncode == 78 and "cannot read config file" in proc.stderr, proc.stderr
    assert "config key '--config'" not in proc.stderr


def test_help_texts_show_defaults() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    serve = _cli(["daemon.cli", "--help"], env).stdout
    assert "default: 0.002" in serve and "default: 10.0" in serve, serve
    status = _cli(["daemon.cli", "status", "--help"], env).stdout
    assert "seconds to wait for the daemon's answer (default: 5.0)" in " ".join(status.split()), status
    assert "read the endpoint" in status
    driver = " ".join(_cli(["loadgen_driver.cli", "--help"], env).stdout.split())
    assert "(default: 2048)" in driver and "(default: 30.0)" in driver, driver
    prepare = _cli(["prepare.cli", "criteo", "--help"], env).stdout
    assert "(default: 8)" in prepare, prepare


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_engines_log_at_the_daemons_log_level(level: str, tmp_path: Path) -> None:
    """log_level reaches the engine processes (they logged INFO whatever it was, and a GPU engine's
    libraries dozens of lines per start)."""
    art = tmp_path / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    d = DaemonProc({"engines": ["null"], "model": str(art), "log_level": level})
    try:
        d.wait_serving()
        log = d.log()
    finally:
        d.terminate()
    assert ("engine null0 ready on null" in log) == (level == "INFO"), log
