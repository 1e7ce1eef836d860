"""daemon/datasets.py as pure logic: per-client load state, and what a disconnect frees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.datasets import DatasetRegistry
from wire.errors import BadRequest
from test_daemon_support import make_dataset


def test_load_state_is_per_client_and_freed(tmp_path: Path) -> None:
    reg = DatasetRegistry(None)
    reg.add_configured("d", str(make_dataset(tmp_path / "d", np.array([2, 0, 3, 1]))))
    ds = reg.entries["d"]
    a, b = b"client-a", b"client-b"
    ds.set_loaded(np.arange(4), True, a)  # loading what is servable anyway costs nothing
    assert ds.loaded == {}
    ds.set_loaded(np.array([0, 3]), False, a)
    with pytest.raises(BadRequest, match="sample id 3 .* not loaded by this client"):
        ds.pair_ranges(np.array([2, 3]), a)
    starts, counts, total = ds.pair_ranges(np.array([3, 1, 2]), b)  # b is untouched; empty sample 1 dropped
    assert (starts.tolist(), counts.tolist(), total) == ([5, 2], [1, 3], 4)
    ds.set_loaded(np.array([0]), True, a)
    assert a in ds.loaded  # sample 3 still unloaded for a
    ds.set_loaded(np.array([3]), True, a)
    assert ds.loaded == {}  # whole again: no mask kept
    ds.set_loaded(np.array([1]), False, a)
    ds.set_loaded(np.array([2]), False, b)
    reg.forget_clients({a})
    assert set(ds.loaded) == {b}
    with pytest.raises(BadRequest, match="out of range"):
        ds.set_loaded(np.array([4]), False, b)
