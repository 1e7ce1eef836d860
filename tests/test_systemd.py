"""systemd/dlrm-daemon.service passes `systemd-analyze verify` and matches wire/exitcodes.py."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from wire.exitcodes import ExitCode

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "dlrm-daemon.service"
EXEC = "/opt/dlrm-daemon/venv/bin/dlrm-daemon"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # installed by `make test-deps`; a missing tool must fail, not skip
        pytest.fail(f"{name} not found: run `make test-deps` (apt-get install systemd)")
    return path


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # verify checks that ExecStart exists: point it at a real executable in a copy.
    fake = tmp_path / "dlrm-daemon"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    unit = tmp_path / "dlrm-daemon.service"
    unit.write_text(unit_text.replace(EXEC, str(fake)))
    return subprocess.run([_tool("systemd-analyze"), "verify", str(unit)], capture_output=True,
                          text=True, timeout=120)


def test_verify_passes_clean(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert EXEC in text
    proc = _verify(text, tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_verify_can_fail(tmp_path: Path) -> None:
    proc = _verify(UNIT.read_text().replace("Type=notify", "Type=notyfy"), tmp_path)
    assert "notyfy" in proc.stderr


def test_restart_policy_matches_exit_codes() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    prevent = {int(x) for x in d["RestartPreventExitStatus"][0].split()}
    assert ExitCode.CONFIG_ERROR in prevent and ExitCode.USAGE in prevent
    assert ExitCode.RUNTIME_FAILURE not in prevent and ExitCode.ENGINE_LOAD_FAILURE not in prevent


def test_stop_timeout_exceeds_drain_timeout() -> None:
    d = _directives(UNIT.read_text())
    config = (SYSTEMD / "config.example.toml").read_text()
    drain = float(re.search(r"^drain_timeout_s\s*=\s*([0-9.]+)", config, re.M).group(1))
    assert float(d["TimeoutStopSec"][0]) > drain + 10


def test_gpu_stays_reachable() -> None:
    d = _directives(UNIT.read_text())
    allowed = " ".join(d["DeviceAllow"])
    for dev in ("char-nvidia-frontend", "/dev/nvidiactl", "/dev/nvidia-uvm"):
        assert dev in allowed
    # Each of these would break CUDA: hidden /dev/nvidia*, no JIT, no /proc/driver/nvidia.
    assert "PrivateDevices" not in d and "MemoryDenyWriteExecute" not in d and "ProcSubset" not in d
    assert d["NoNewPrivileges"] == ["yes"] and d["ProtectSystem"] == ["strict"]
    assert d["RuntimeDirectory"] == ["dlrm-daemon"] and d["RuntimeDirectoryMode"] == ["0700"]
    assert d["User"] == ["dlrm"]


def test_ip_traffic_only_over_loopback() -> None:
    d = _directives(UNIT.read_text())
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]
    # derived and shown on the GPU host (bench/syscall_check.sh, docs/OPERATIONS.md); killing, not EPERM
    assert d["SystemCallFilter"] == ["@system-service"] and "SystemCallErrorNumber" not in d


def test_security_exposure_is_low(tmp_path: Path) -> None:
    unit = tmp_path / "dlrm-daemon.service"
    unit.write_text(UNIT.read_text())
    proc = subprocess.run([_tool("systemd-analyze"), "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0  # 1.7 with SystemCallFilter=@system-service (3.1 without; 3.2 at first)


def test_example_config_loads(tmp_path: Path) -> None:
    import tomllib

    from daemon.config import FIELDS, load_config

    text = (SYSTEMD / "config.example.toml").read_text()
    raw = tomllib.loads(text)
    assert set(raw) <= set(FIELDS)
    # The example's paths point at a real host; swap in stand-in directories to validate the rest.
    for name in ("model", "day23"):
        (tmp_path / name).mkdir()
        # the daemon checks an artifact's meta for its table sizes at config time
        write_model_description(tmp_path / name, DLRMConfig((10,) * 26))
    text = text.replace(raw["model"], str(tmp_path / "model"))
    text = text.replace(raw["datasets"]["day23"], str(tmp_path / "day23"))
    path = tmp_path / "config.toml"
    path.write_text(text)
    cfg = load_config(path, env={})
    assert cfg.metrics_port == 9464 and cfg.metrics_host == "127.0.0.1"
    assert cfg.engines == ("cuda:0",) and cfg.drain_timeout_s == 30.0


def test_env_example_names_config_keys() -> None:
    from daemon.config import FIELDS, env_name

    names = set(re.findall(r"^#?(DLRM_[A-Z_]+)=", (SYSTEMD / "dlrm-daemon.env").read_text(), re.M))
    assert names and names <= {env_name(k) for k in FIELDS}


def test_reload_swaps_the_model_with_the_start_config() -> None:
    """`systemctl reload` runs `dlrm-daemon reload` on the config file ExecStart serves (issue 16)."""
    d = _directives(UNIT.read_text())
    start, reload = d["ExecStart"][0].split(), d["ExecReload"][0].split()
    assert reload[0] == start[0] and reload[1] == "reload"
    assert reload[reload.index("--config") + 1] == start[start.index("--config") + 1]
    assert float(d["TimeoutStartSec"][0]) >= 300  # ExecReload's limit too: a second 24 GB model loads in it
