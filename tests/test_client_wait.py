"""daemon.client.wait_until_serving: the start-up wait shared by the demo and the benchmarks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wire.client import wait_until_serving
from wire.errors import ConnectionFailed


def test_daemon_that_exits_fails_at_once_with_its_code(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait(10)
    with pytest.raises(ConnectionFailed, match="exited with code 3"):
        wait_until_serving(f"ipc://{tmp_path}/none.sock", timeout_s=30, proc=proc)


def test_no_daemon_times_out_naming_the_endpoint(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/none.sock"
    with pytest.raises(ConnectionFailed, match="did not report 'serving'") as info:
        wait_until_serving(endpoint, timeout_s=0.3)
    assert endpoint in str(info.value)
