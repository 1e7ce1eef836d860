"""The dispatcher's view of registered datasets: sample -> pair-range mapping, each client's loaded set,
and the registration of a dataset with every engine (pure bookkeeping: no sockets; the caller sends
and acks).

Load state is per client (per connection, by its routing id): LoadSamples / UnloadSamples of one
LoadGen run change what that client may ask for, never what another client may. A client that never
unloaded anything may ask for every sample; its mask exists only between an unload and the load that
makes it whole again (or its disconnect), so idle and well-behaved clients cost no memory.

A dataset is opened with formats.dataset (the format's own checks) and checked against the model's
table sizes from formats.artifact.read_model_config: the dispatcher reads no other meta.json.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.dataset import Dataset, DatasetError
from formats.model_config import DLRMConfig
from wire.errors import BadRequest


class DatasetState(enum.Enum):
    REGISTERING = "registering"  # sent to the engines, not every engine has added it yet
    READY = "ready"


@dataclass(eq=False)
class DatasetEntry:
    name: str
    path: str
    starts: np.ndarray  # int64 [num_samples]: first pair of each sample
    ends: np.ndarray  # int64 [num_samples]
    num_samples: int
    num_pairs: int
    has_empty: bool  # some sample has no pairs (such ranges are dropped before batching)
    state: DatasetState = DatasetState.READY
    loaded: dict[bytes, np.ndarray] = field(default_factory=dict)  # client -> bool [num_samples]; absent = all
    waiting: set[str] = field(default_factory=set)  # engines that have not added it yet
    waiters: list[tuple[bytes, int]] = field(default_factory=list)  # (client, request_id) to answer

    def pair_ranges(self, ids: np.ndarray, client: bytes) -> tuple[np.ndarray, np.ndarray, int]:
        """Validated sample ids (loaded for `client`) -> (starts, counts) per sample in request order,
        total pairs."""
        if len(ids) == 0:
            return ids, ids, 0
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_samples:
            bad = lo if lo < 0 else hi
            raise BadRequest(f"sample id {bad} out of range [0, {self.num_samples}) of dataset {self.name!r}")
        mask = self.loaded.get(client)
        if mask is not None:
            ok = mask[ids]
            if not ok.all():
                first = int(ids[int(np.argmin(ok))])
                raise BadRequest(f"sample id {first} of dataset {self.name!r} is not loaded by this client "
                                 "(LoadSamples)")
        starts = self.starts[ids]
        counts = self.ends[ids] - starts
        total = int(counts.sum())
        if self.has_empty:
            keep = counts > 0
            starts, counts = starts[keep], counts[keep]
        return starts, counts, total

    def set_loaded(self, ids: np.ndarray, value: bool, client: bytes) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise BadRequest(f"sample ids out of range [0, {self.num_samples}) of dataset {self.name!r}")
        mask = self.loaded.get(client)
        if mask is None:
            if value:
                return
            mask = self.loaded[client] = np.ones(self.num_samples, dtype=bool)
        mask[ids] = value
        if value and mask.all():
            del self.loaded[client]  # whole again: the same as never having unloaded


def open_dataset(name: str, path: str, model: DLRMConfig | None) -> DatasetEntry:
    """Open and validate a dataset directory; BadRequest names what is wrong."""
    try:
        ds = Dataset.open(Path(path))
    except (DatasetError, OSError, ValueError) as exc:
        raise BadRequest(f"dataset {name!r} at {path}: {exc}") from None
    if model is not None:
        too_big = [t for t, (d, m) in enumerate(zip(ds.table_rows, model.table_rows)) if d > m]
        if too_big:
            t = too_big[0]
            raise BadRequest(f"dataset {name!r}: table {t} has ids up to {ds.table_rows[t]} but the model "
                             f"table has {model.table_rows[t]} rows")
    offsets = np.ascontiguousarray(ds.sample_offsets, dtype=np.int64)
    counts = np.diff(offsets)
    return DatasetEntry(name=name, path=str(path), starts=offsets[:-1].copy(), ends=offsets[1:].copy(),
                        num_samples=ds.num_samples, num_pairs=ds.num_pairs,
                        has_empty=bool(ds.num_samples and counts.min() == 0))


def valid_name(name: str) -> bool:
    return bool(name) and name.replace("-", "").replace("_", "").replace(".", "").isalnum()


class DatasetRegistry:
    """Registered datasets by name, and the registrations still waiting for engines."""

    def __init__(self, model: DLRMConfig | None) -> None:
        self.model = model
        self.entries: dict[str, DatasetEntry] = {}

    def get_ready(self, name: str) -> DatasetEntry:
        ds = self.entries.get(name)
        if ds is None:
            raise BadRequest(f"unknown dataset {name!r} (registered: {', '.join(self.entries) or 'none'})")
        if ds.state is not DatasetState.READY:
            raise BadRequest(f"dataset {name!r} is still being registered")
        return ds

    def add_configured(self, name: str, path: str) -> None:
        """A dataset of the config: registered before the engines start (they load it at start)."""
        self.entries[name] = open_dataset(name, path, self.model)

    def begin(self, name: str, path: str, engines: set[str]) -> DatasetEntry | None:
        """Start registering `name` with the engines in `engines`; None when the same dataset is
        already registered (ready or under way: the caller answers or queues the request)."""
        old = self.entries.get(name)
        if old is not None:
            if Path(old.path).resolve() != Path(path).resolve():
                raise BadRequest(f"dataset {name!r} is already registered with path {old.path}")
            return None
        if not valid_name(name):
            raise BadRequest(f"dataset name {name!r}: use letters, digits, '-', '_', '.'")
        ds = open_dataset(name, path, self.model)
        ds.state = DatasetState.REGISTERING
        ds.waiting = set(engines)
        self.entries[name] = ds
        return ds

    def engine_done(self, ds: DatasetEntry, engine: str, error: str) -> bool:
        """An engine added the dataset (error "" = success) or is gone; True once the registration is
        settled: ready, or dropped on an error. The caller then answers `ds.waiters`."""
        ds.waiting.discard(engine)
        if error:
            self.entries.pop(ds.name, None)
            return True
        if not ds.waiting and ds.state is not DatasetState.READY:
            ds.state = DatasetState.READY
            return True
        return False

    def forget_clients(self, clients: set[bytes]) -> None:
        """Disconnected clients: their load state goes with them."""
        for ds in self.entries.values():
            for c in clients & ds.loaded.keys():
                del ds.loaded[c]

    def ready_names(self) -> list[str]:
        """Names of the datasets every engine has (configured first, then by registration)."""
        return [name for name, ds in self.entries.items() if ds.state is DatasetState.READY]

    def paths(self) -> dict[str, str]:
        """name -> path of every dataset, for an engine that starts now."""
        return {name: ds.path for name, ds in self.entries.items()}
