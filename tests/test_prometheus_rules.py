"""systemd/ Prometheus files pass promtool: config, rules and the rules' unit tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:  # installed by `make test-deps`; a missing tool must fail, not skip
        pytest.fail("promtool not found: run `make test-deps` (apt-get install prometheus)")
    return subprocess.run([tool, *args], cwd=SYSTEMD, capture_output=True, text=True, timeout=120)


def test_check_rules() -> None:
    proc = _promtool("check", "rules", "dlrm-rules.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 15 rules found" in proc.stdout


def test_rules_unit_tests() -> None:
    proc = _promtool("test", "rules", "dlrm-rules.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rules_unit_tests_can_fail(tmp_path: Path) -> None:
    # The same tests with a wrong expected p99 must fail: the tests really compare values.
    shutil.copy(SYSTEMD / "dlrm-rules.yml", tmp_path)
    text = (SYSTEMD / "dlrm-rules.test.yml").read_text()
    assert "value: 0.03995" in text
    (tmp_path / "t.yml").write_text(text.replace("value: 0.03995", "value: 0.035"))
    proc = _promtool("test", "rules", str(tmp_path / "t.yml"))
    assert proc.returncode != 0 and "3.995E-02" in proc.stdout + proc.stderr


def test_check_config() -> None:
    proc = _promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
