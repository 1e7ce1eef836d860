"""daemon/memory.py: the idle heap trim runs only when idle and at most once per interval."""
from __future__ import annotations

import pytest

from daemon.memory import IdleTrimmer


def test_idle_trimmer_interval_and_idleness() -> None:
    t = IdleTrimmer(min_interval_s=10.0)
    if t._trim is None:
        pytest.skip("not glibc")
    start = t._last
    t.tick(start + 5, idle=True)
    assert t.trims == 0  # interval not reached
    t.tick(start + 11, idle=False)
    assert t.trims == 0  # busy
    t.tick(start + 11, idle=True)
    assert t.trims == 1 and t.last_trim_s >= 0  # the real malloc_trim ran
    t.tick(start + 15, idle=True)
    assert t.trims == 1
    off = IdleTrimmer(min_interval_s=0.0)
    off.tick(start + 1e6, idle=True)
    assert off.trims == 0
