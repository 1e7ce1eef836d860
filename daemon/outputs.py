"""The output regions clients have registered (wire/output_region.py), as pure bookkeeping.

A region is known by its path. The client that registered it owns it: its disconnect or an
UnregisterOutput releases it, and every engine is then told to unmap it (after the batches already
sent to it). Requests from any client of the daemon's user may name a registered region.
"""
from __future__ import annotations

from dataclasses import dataclass

from wire.errors import BadRequest
from wire.output_region import OutputFileError, check_output_file


@dataclass(frozen=True)
class OutputEntry:
    path: str
    num_predictions: int
    owner: bytes  # the registering client's identity


class OutputRegistry:
    def __init__(self, max_regions: int = 1024) -> None:
        self.max_regions = max_regions
        self._entries: dict[str, OutputEntry] = {}

    def register(self, client: bytes, path: str, num_predictions: int) -> OutputEntry:
        """Check the file and record it (again by its owner: the new size); BadRequest if unusable or
        another client's."""
        try:
            check_output_file(path, num_predictions)
        except OutputFileError as exc:
            raise BadRequest(str(exc)) from None
        held = self._entries.get(path)
        if held is not None and held.owner != client:
            raise BadRequest(f"output region {path!r} is registered by another client")
        if held is None and len(self._entries) >= self.max_regions:
            raise BadRequest(f"{self.max_regions} output regions are registered already: unregister some")
        entry = OutputEntry(path, num_predictions, client)
        self._entries[path] = entry
        return entry

    def unregister(self, path: str) -> bool:
        """Forget a region; False if it was not registered."""
        return self._entries.pop(path, None) is not None

    def check(self, path: str, offset: int, num_pairs: int) -> None:
        """BadRequest unless `path` is registered and [offset, offset + num_pairs) lies inside it."""
        entry = self._entries.get(path)
        if entry is None:
            raise BadRequest(f"output region {path!r} is not registered (RegisterOutput first)")
        if offset < 0 or offset + num_pairs > entry.num_predictions:
            raise BadRequest(f"output elements [{offset}, {offset + num_pairs}) lie outside region {path!r} "
                             f"of {entry.num_predictions}")

    def forget_clients(self, clients: set[bytes]) -> list[str]:
        """Regions of clients that disconnected: removed; their paths (for the engines to release)."""
        gone = [p for p, e in self._entries.items() if e.owner in clients]
        for p in gone:
            del self._entries[p]
        return gone

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __len__(self) -> int:
        return len(self._entries)
