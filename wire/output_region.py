"""Output regions: predictions written by the engines straight into a client's shared memory.

A client on the daemon's host creates a /dev/shm file of float32 slots (`OutputRegion`), registers it
(`RegisterOutput`), and names it with an element offset in each by-reference request. The engine that
computes a batch writes each query's predictions there; the reply (`InferWritten`) carries no bytes.
At front-end rates the predictions are most of the bytes that move (4 per pair: 6.5 GB/s at 6 M
samples/s of 270 pairs), and without regions they are copied by the engine into its slot, by the
dispatcher into a reply (reassembling queries cut over batches), by the kernel into and out of the
socket, and read by the client: four passes that one engine-side write replaces.

Three users, one module: the client makes and allocates (`OutputRegion`, `OutputRing`), the
dispatcher checks what a client registers (`check_output_file`), engines map and write (`MappedOutputs`).
Files follow wire/shm.py's naming (`dlrmd-<uid>-<pid>-<random>-out`), so a crashed client's file is
removed by the next daemon start like a crashed daemon's regions.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from pathlib import Path

import numpy as np

from wire.shm import SHM_DIR, run_prefix, unlink_quietly

PRED_BYTES = 4  # float32
OUTPUT_SUFFIX = "out"
# What OutputRegion names its files; the engines' own slot files (same prefix, a number at the end) and
# anything else under /dev/shm are refused, so no request can have engines write over them.
_OUTPUT_NAME_RE = re.compile(r"^dlrmd-\d+-\d+-[0-9a-f]{16}-" + OUTPUT_SUFFIX + "$")


class OutputFileError(ValueError):
    """A registered output path that cannot be used; the message says why."""


def check_output_file(path: str, num_predictions: int, shm_dir: Path = SHM_DIR) -> None:
    """What the dispatcher accepts: an absolute path directly under /dev/shm named as OutputRegion names
    its files, a regular file (not a link) owned by the daemon's user, with room for `num_predictions`
    float32 values."""
    if num_predictions <= 0:
        raise OutputFileError(f"num_predictions={num_predictions} must be > 0")
    p = Path(path)
    if not p.is_absolute() or p.parent != shm_dir or p.name in ("", ".", ".."):
        raise OutputFileError(f"output region {path!r} must be a file directly under {shm_dir}")
    if not _OUTPUT_NAME_RE.match(p.name):
        raise OutputFileError(f"output region {path!r} is not named as wire.output_region.OutputRegion names "
                              "its files (dlrmd-UID-PID-RANDOM-out)")
    try:
        st = os.lstat(p)
    except OSError as exc:
        raise OutputFileError(f"output region {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise OutputFileError(f"output region {path!r} is not a regular file")
    if st.st_uid != os.getuid():
        raise OutputFileError(f"output region {path!r} is owned by uid {st.st_uid}, not the daemon's {os.getuid()}")
    if st.st_size < PRED_BYTES * num_predictions:
        raise OutputFileError(f"output region {path!r} has {st.st_size} bytes, fewer than "
                              f"{num_predictions} predictions need")


class OutputRing:
    """Offsets in a region of `size` elements for requests in flight, handed out in order around a
    ring; an allocation frees when its request is answered (in any order), and space is reused once
    every older allocation is free too. `allocate` never waits: None when no room (the caller then
    asks for the predictions in the reply). Thread-safe (issue and completion threads)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._head = 0  # next free element
        self._live: dict[int, int] = {}  # offset -> end, in allocation order (oldest first)
        self._freed: set[int] = set()
        self._lock = threading.Lock()

    def _tail(self) -> int:
        return next(iter(self._live)) if self._live else self._head

    def allocate(self, n: int) -> int | None:
        if n <= 0 or n > self.size:
            return None
        with self._lock:
            if not self._live:
                self._head = 0
            tail, head = self._tail(), self._head
            if self._live and head <= tail:  # wrapped: live data is [tail, ...) then [0, head)
                if head + n > tail:
                    return None
                start = head
            elif head + n <= self.size:  # live data is [tail, head): room after it
                start = head
            elif n <= tail:  # or before it (the end of the ring is skipped this round)
                start = 0
            else:
                return None
            self._live[start] = start + n
            self._head = start + n
            return start

    def free(self, offset: int) -> None:
        with self._lock:
            if offset not in self._live:
                return
            self._freed.add(offset)
            while self._live:  # release from the oldest on
                first = next(iter(self._live))
                if first not in self._freed:
                    break
                self._freed.discard(first)
                del self._live[first]

    @property
    def in_use(self) -> int:
        """Allocations not yet reclaimable (live, or freed behind an older live one)."""
        with self._lock:
            return len(self._live)


class OutputRegion:
    """A client's region: a new /dev/shm file of `num_predictions` float32 values, mapped; removed on
    close. `ring` hands out offsets; `view(offset, n)` reads what the engines wrote."""

    def __init__(self, num_predictions: int, shm_dir: Path = SHM_DIR) -> None:
        if num_predictions <= 0:
            raise ValueError("num_predictions must be > 0")
        self.num_predictions = num_predictions
        self.path = shm_dir / f"{run_prefix()}{OUTPUT_SUFFIX}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.ftruncate(fd, PRED_BYTES * num_predictions)
            self._mm: mmap.mmap | None = mmap.mmap(fd, PRED_BYTES * num_predictions)
        except BaseException:
            unlink_quietly(self.path)
            raise
        finally:
            os.close(fd)
        self.values = np.frombuffer(self._mm, np.float32, num_predictions)
        self.ring = OutputRing(num_predictions)

    def view(self, offset: int, n: int) -> np.ndarray:
        return self.values[offset:offset + n]

    def close(self) -> None:
        """Unlink the file (engines that mapped it keep their mapping until they release it)."""
        unlink_quietly(self.path)
        mm, self._mm = self._mm, None
        self.values = np.empty(0, np.float32)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still held by the caller: the mapping goes with it
                pass


class MappedOutputs:
    """An engine's mappings of the output regions its batches name, opened at first use and kept until
    the dispatcher releases them (after every batch sent before the release is done)."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}

    def view(self, path: str, offset: int, n: int) -> np.ndarray:
        """float32 elements [offset, offset + n) of the region at `path`; OutputFileError if it cannot be
        opened or is too small."""
        entry = self._maps.get(path)
        if entry is None:
            entry = self._open(path)
            self._maps[path] = entry
        values = entry[1]
        if offset < 0 or n < 0 or offset + n > len(values):
            raise OutputFileError(f"output region {path}: elements [{offset}, {offset + n}) outside its "
                                  f"{len(values)}")
        return values[offset:offset + n]

    @staticmethod
    def _open(path: str) -> tuple[mmap.mmap, np.ndarray]:
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise OutputFileError(f"output region {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < PRED_BYTES:
                raise OutputFileError(f"output region {path} is empty")
            mm = mmap.mmap(fd, size - size % PRED_BYTES)
        finally:
            os.close(fd)
        return mm, np.frombuffer(mm, np.float32)

    def release(self, path: str) -> None:
        entry = self._maps.pop(path, None)
        if entry is not None:
            try:
                entry[0].close()
            except BufferError:  # a view lives on (an unfinished scatter): the mapping goes with it
                pass

    def close(self) -> None:
        for path in list(self._maps):
            self.release(path)

    def __len__(self) -> int:
        return len(self._maps)
