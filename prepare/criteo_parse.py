"""Vectorised parsing of Criteo TSV day files (label, 13 ints, 26 hex; empty fields mean 0).

Files are read in blocks of bytes cut at the last newline; each block is parsed with numpy only:
tab/newline positions give the field boundaries, and integers and hex values are accumulated
column by column (Horner's rule over at most 18 or 16 characters) over all fields at once.
No per-line Python work happens unless a line is malformed.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

N_INT = 13
N_CAT = 26
N_FIELDS = 1 + N_INT + N_CAT
MAX_INT_CHARS = 18   # always fits int64
MAX_HEX_CHARS = 16   # fits uint64

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


class CriteoFormatError(ValueError):
    """A malformed line; the message names the file, the 1-based line number and the reason."""


@dataclass
class Block:
    labels: np.ndarray      # int8 [n] (0/1)
    ints: np.ndarray        # int64 [n, 13] raw integer features (negatives kept)
    cats: np.ndarray        # uint64 [n, 26] raw hex values
    bad_lines: int          # malformed lines dropped (only with skip_bad)
    first_bad: str | None   # description of the first malformed line, if any


def _parse_ints(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed decimal fields -> (int64 values, bool bad). Empty field = 0."""
    last = len(buf) - 1
    neg = (lens > 0) & (buf[np.minimum(starts, last)] == ord("-"))
    bad = (lens > MAX_INT_CHARS) | (neg & (lens == 1))
    value = np.zeros(starts.shape, dtype=np.int64)
    width = int(min(lens.max(initial=0), MAX_INT_CHARS))
    for k in range(width):
        inside = lens > k
        d = buf[np.minimum(starts + k, last)] - np.uint8(ord("0"))   # uint8 wraps for non-digits
        digit = d < 10
        nondigit = inside & ~digit
        bad |= nondigit & ~neg if k == 0 else nondigit
        use = inside & digit
        value = np.where(use, value * 10 + d, value)
    value = np.where(neg, -value, value)
    return value, bad


def _parse_hex(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hex fields -> (uint64 values, bool bad). Empty field = 0."""
    last = len(buf) - 1
    bad = lens > MAX_HEX_CHARS
    value = np.zeros(starts.shape, dtype=np.uint64)
    width = int(min(lens.max(initial=0), MAX_HEX_CHARS))
    for k in range(width):
        inside = lens > k
        nib = _HEX[buf[np.minimum(starts + k, last)]]
        ok = nib != 255
        bad |= inside & ~ok
        value = np.where(inside & ok, (value << np.uint64(4)) | nib.astype(np.uint64), value)
    return value, bad


def parse_block(data: bytes, name: str, first_line: int, skip_bad: bool) -> Block:
    """Parse complete lines (``data`` ends with a newline). ``first_line`` is 1-based."""
    buf = np.frombuffer(data, dtype=np.uint8)
    delim = np.flatnonzero((buf == 9) | (buf == 10))
    is_nl = buf[delim] == 10
    n_lines = int(is_nl.sum())
    line_of = np.cumsum(is_nl) - is_nl
    tabs = np.bincount(line_of[~is_nl], minlength=n_lines)
    field_start = np.empty_like(delim)
    field_start[0:1] = 0
    field_start[1:] = delim[:-1] + 1
    ok_count = tabs == N_FIELDS - 1
    if ok_count.all():
        starts = field_start.reshape(-1, N_FIELDS)
        ends = delim.reshape(-1, N_FIELDS)
        line_idx = None
    else:
        keep = ok_count[line_of]
        starts = field_start[keep].reshape(-1, N_FIELDS)
        ends = delim[keep].reshape(-1, N_FIELDS)
        line_idx = np.flatnonzero(ok_count)
    # A trailing carriage return (CRLF files) is not part of the last field.
    if len(ends):
        cr = (ends[:, -1] > starts[:, -1]) & (buf[np.maximum(ends[:, -1] - 1, 0)] == 13)
        ends[:, -1] -= cr
    lens = ends - starts
    ints, bad_int = _parse_ints(buf, starts[:, : 1 + N_INT], lens[:, : 1 + N_INT])
    cats, bad_hex = _parse_hex(buf, starts[:, 1 + N_INT:], lens[:, 1 + N_INT:])
    bad_label = ~bad_int[:, 0] & (ints[:, 0] != 0) & (ints[:, 0] != 1)
    bad = bad_int.any(axis=1) | bad_hex.any(axis=1) | bad_label
    n_bad = int(bad.sum()) + int((~ok_count).sum())
    first_bad = None
    if n_bad:
        first_bad = _describe_first_bad(data, name, first_line, ok_count, line_idx, bad,
                                        bad_int, bad_hex, bad_label, tabs)
        if not skip_bad:
            raise CriteoFormatError(first_bad)
    good = ~bad
    return Block(ints[good, 0].astype(np.int8), ints[good, 1:], cats[good], n_bad, first_bad)


def _describe_first_bad(data: bytes, name: str, first_line: int, ok_count: np.ndarray,
                        line_idx: np.ndarray | None, bad: np.ndarray, bad_int: np.ndarray,
                        bad_hex: np.ndarray, bad_label: np.ndarray, tabs: np.ndarray) -> str:
    """Reason for the earliest malformed line of the block (runs once per block at most)."""
    candidates = []
    if not ok_count.all():
        i = int(np.argmin(ok_count))
        candidates.append((i, f"wrong field count: {int(tabs[i]) + 1} fields, expected {N_FIELDS}"))
    if bad.any():
        r = int(np.argmax(bad))
        i = r if line_idx is None else int(line_idx[r])
        if bad_label[r] or bad_int[r, 0]:
            reason = "label is not 0 or 1"
        elif bad_int[r].any():
            f = int(np.argmax(bad_int[r]))
            reason = f"field {f + 1} (integer feature {f - 1}) is not an integer"
        else:
            f = int(np.argmax(bad_hex[r]))
            reason = f"field {f + 15} (categorical feature {f}) is not a hex value"
        candidates.append((i, reason))
    i, reason = min(candidates)
    text = data.split(b"\n", i + 1)[i][:120].decode("latin1")
    return f"{name}:{first_line + i}: {reason}: {text!r}"


class _Reader:
    """Raw file (for the compressed position) and a decompressing view of it."""

    def __init__(self, path: Path) -> None:
        self.raw: BinaryIO = open(path, "rb")
        magic = self.raw.read(2)
        self.raw.seek(0)
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self.raw) if magic == b"\x1f\x8b" else self.raw

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


def iter_line_blocks(path: Path, block_bytes: int = 8 << 20,
                     on_raw_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[bytes, int]]:
    """Yield (complete lines, 1-based number of their first line); plain or gzip input."""
    reader = _Reader(path)
    try:
        carry = b""
        line_no = 1
        raw_pos = 0
        while True:
            chunk = reader.stream.read(block_bytes)
            if on_raw_bytes is not None:
                pos = reader.raw.tell()
                on_raw_bytes(pos - raw_pos)
                raw_pos = pos
            if not chunk:
                break
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                block = data[:cut]
                yield block, line_no
                line_no += block.count(b"\n")
        if carry:
            yield carry + b"\n", line_no
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise CriteoFormatError(f"{path}: read failed near line {line_no}: {exc}") from exc
    finally:
        reader.close()


def count_lines(path: Path, block_bytes: int = 8 << 20) -> int:
    """Number of lines (a last line without newline counts)."""
    return sum(block.count(b"\n") for block, _ in iter_line_blocks(path, block_bytes))


def dense_transform(ints: np.ndarray) -> np.ndarray:
    """SPEC / reference: log(max(0, x) + 1), computed in float32 like the reference's torch.log."""
    x = np.maximum(ints, 0).astype(np.float32)
    x += np.float32(1)
    return np.log(x, out=x)
