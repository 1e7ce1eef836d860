"""Per-engine shared-memory regions: one /dev/shm file per engine, divided into batch slots.

Files are created by the dispatcher with O_EXCL and mode 0600 under an unpredictable per-run
prefix `dlrmd-<uid>-<pid>-<random>-`; the dispatcher removes them on exit, and removes regions left
by a crashed run (same scheme, owner pid dead) at start. Engines only open and map existing files.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wire.messages import DENSE_FEATURES, SPARSE_FEATURES

SHM_DIR = Path("/dev/shm")
_ALIGN = 4096
_NAME_RE = re.compile(r"^dlrmd-(\d+)-(\d+)-[0-9a-f]{16}-")
log = logging.getLogger("dlrm.shm")


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class SlotLayout:
    """Byte offsets inside one slot. By value the inputs are dense f32 [P,13] + sparse i32 [P,26];
    by reference int64 starts + counts of at most P ranges (every range has >= 1 pair)."""

    max_pairs: int

    @property
    def out_offset(self) -> int:
        return 0

    @property
    def in_offset(self) -> int:
        return _align(4 * self.max_pairs)

    @property
    def slot_bytes(self) -> int:
        return _align(self.in_offset + 4 * (DENSE_FEATURES + SPARSE_FEATURES) * self.max_pairs)


class SlotViews:
    """numpy views of one slot of a mapped region (no copies)."""

    def __init__(self, buf: mmap.mmap, base: int, layout: SlotLayout) -> None:
        p = layout.max_pairs
        i = base + layout.in_offset
        self.out = np.frombuffer(buf, np.float32, p, base + layout.out_offset)
        self.dense = np.frombuffer(buf, np.float32, p * DENSE_FEATURES, i).reshape(p, DENSE_FEATURES)
        self.sparse = np.frombuffer(buf, np.int32, p * SPARSE_FEATURES, i + 4 * DENSE_FEATURES * p).reshape(
            p, SPARSE_FEATURES)
        self.starts = np.frombuffer(buf, np.int64, p, i)
        self.counts = np.frombuffer(buf, np.int64, p, i + 8 * p)


class Region:
    """A mapped region of `slots` slots. Owner side creates (and later unlinks) the file."""

    def __init__(self, path: Path, slots: int, max_pairs: int, owner: bool) -> None:
        self.path = path
        self.layout = SlotLayout(max_pairs)
        self.size = self.layout.slot_bytes * slots
        self.owner = owner
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if owner else 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if owner:
                os.ftruncate(fd, self.size)
            elif os.fstat(fd).st_size != self.size:
                raise ValueError(f"{path}: size {os.fstat(fd).st_size}, expected {self.size}")
            self._mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.slots = [SlotViews(self._mm, k * self.layout.slot_bytes, self.layout) for k in range(slots)]

    def whole(self) -> np.ndarray:
        """The whole mapping as uint8 (a GPU engine page-locks it, so slots move by DMA)."""
        return np.frombuffer(self._mm, np.uint8, self.size)

    def close(self) -> None:
        self.slots = []
        try:
            self._mm.close()
        except BufferError:  # a view is still referenced somewhere; the mapping dies with the process
            pass
        if self.owner:
            unlink_quietly(self.path)


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def run_prefix() -> str:
    """The per-run name prefix: uid, owner pid, 64 random bits."""
    return f"dlrmd-{os.getuid()}-{os.getpid()}-{secrets.token_hex(8)}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove regions of our uid whose owner process is gone (a crashed earlier run)."""
    removed: list[Path] = []
    if not shm_dir.is_dir():
        return removed
    uid = os.getuid()
    for p in shm_dir.iterdir():
        m = _NAME_RE.match(p.name)
        if m is None or int(m.group(1)) != uid:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and not _pid_alive(pid):
            unlink_quietly(p)
            removed.append(p)
            log.warning("removed stale shared memory %s (owner pid %d is gone)", p, pid)
    return removed


def list_regions(pid: int | None = None, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Regions of our uid (optionally of one owner pid): tests check nothing is left behind."""
    if not shm_dir.is_dir():
        return []
    out = []
    for p in shm_dir.iterdir():
        m = _NAME_RE.match(p.name)
        if m and int(m.group(1)) == os.getuid() and (pid is None or int(m.group(2)) == pid):
            out.append(p)
    return out
