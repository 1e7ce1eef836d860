"""Vectorised parsing of Criteo TSV day files (label, 13 ints, 26 hex; empty fields mean 0).

Files are read in blocks of bytes cut at the last newline; each block is parsed with numpy only:
tab/newline positions give the field boundaries, and integers and hex values are accumulated
as right-aligned 8-byte words of all fields at once, decoded with SWAR arithmetic on uint64
(eight digits or nibbles per word in three multiply/shift/mask steps).
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
MAX_INT_CHARS = 18   # always fits int64 (and three 8-byte words with a sign)
MAX_HEX_CHARS = 16   # fits uint64



class CriteoFormatError(ValueError):
    """A malformed line; the message names the file, the 1-based line number and the reason."""


@dataclass
class Block:
    labels: np.ndarray      # int8 [n] (0/1)
    ints: np.ndarray        # int64 [n, 13] raw integer features (negatives kept)
    cats: np.ndarray        # uint64 [n, 26] raw hex values
    bad_lines: int          # malformed lines dropped (only with skip_bad)
    first_bad: str | None   # description of the first malformed line, if any


_PAD = 32  # bytes of b"0" put before each block so that right-aligned 8-byte windows never underflow


def _u64(x: int) -> np.uint64:
    return np.uint64(x)


_ZEROS = 0x3030303030303030  # eight ASCII "0"
_LO8 = _u64(0x00FF00FF00FF00FF)
_LO16 = _u64(0x0000FFFF0000FFFF)
_LO32 = _u64(0x00000000FFFFFFFF)


_ONES = 0x0101010101010101
_HIGH = _u64(0x8080808080808080)
_LOW7 = _u64(0x7F7F7F7F7F7F7F7F)
# _PAD_MASK[k]: the k low bytes of a word (the k leading characters in file order).
_PAD_MASK = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)


def _words(buf: np.ndarray, ends: np.ndarray, lens: np.ndarray, width: int) -> np.ndarray:
    """Fields as ``[width / 8, m]`` little-endian uint64 words, right-aligned, padded with "0".

    One unaligned 8-byte gather per word (a uint64 view of the buffer with a one-byte stride),
    never one per character; the padding is applied with word masks.
    """
    n_words = width // 8
    u64 = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
    out = np.empty((n_words, len(ends)), dtype="<u8")
    zeros = _u64(_ZEROS)
    for j in range(n_words):
        w = u64[ends - 8 * (n_words - j)]
        mask = _PAD_MASK[np.clip(width - 8 * j - lens, 0, 8)]
        out[j] = w ^ ((w ^ zeros) & mask)
    return out


def _bytes_between(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per byte of each word: high bit set iff ``lo < byte < hi`` (bit-twiddling "hasbetween",
    exact per byte because the low seven bits are summed apart from the high bit)."""
    t = x & _LOW7
    return (_u64(_ONES * (127 + hi)) - t) & ~x & (t + _u64(_ONES * (127 - lo))) & _HIGH


def _width(lens: np.ndarray, cap: int) -> int:
    return max(8, -(-int(min(lens.max(initial=0), cap)) // 8) * 8)


def _parse_ints(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed decimal fields (1-D arrays) -> (int64 values, bool bad). Empty field = 0."""
    neg = (lens > 0) & (buf[starts] == ord("-"))
    bad = (lens > MAX_INT_CHARS) | (neg & (lens == 1))
    lens = np.minimum(lens, MAX_INT_CHARS)
    width = _width(lens, MAX_INT_CHARS + 6)   # 24 bytes max
    words = _words(buf, starts + lens, lens - neg, width)   # the sign becomes a "0" pad byte
    value = np.zeros(len(starts), np.uint64)
    for v in words:
        bad |= _bytes_between(v, 0x2F, 0x3A) != _HIGH
        # SWAR: eight digits of one word to an integer in three multiply-shift-mask steps.
        v = v - _u64(_ZEROS)
        v = (v * _u64(10) + (v >> _u64(8))) & _LO8
        v = (v * _u64(100) + (v >> _u64(16))) & _LO16
        v = (v * _u64(10000) + (v >> _u64(32))) & _LO32
        value = value * _u64(100_000_000) + v
    out = value.view(np.int64)
    np.negative(out, out=out, where=neg)
    return out, bad


def _parse_hex(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hex fields (1-D arrays) -> (uint64 values, bool bad). Empty field = 0."""
    bad = lens > MAX_HEX_CHARS
    lens = np.minimum(lens, MAX_HEX_CHARS)
    width = _width(lens, MAX_HEX_CHARS)
    value = np.zeros(len(starts), np.uint64)
    for c in _words(buf, starts + lens, lens, width):
        ok = _bytes_between(c, 0x2F, 0x3A) | _bytes_between(c | _u64(_ONES * 0x20), 0x60, 0x67)
        bad |= ok != _HIGH
        # Per byte: low nibble, plus 9 for letters (bit 6): "0"-"9" -> 0-9, "a"/"A"-"f"/"F" -> 10-15.
        v = (c & _u64(_ONES * 0x0F)) + _u64(9) * ((c >> _u64(6)) & _u64(_ONES))
        # SWAR: eight nibble bytes (first = most significant) to a 32-bit value.
        v = ((v & _LO8) << _u64(4)) | ((v >> _u64(8)) & _LO8)
        v = ((v & _LO16) << _u64(8)) | ((v >> _u64(16)) & _LO16)
        v = ((v & _LO32) << _u64(16)) | (v >> _u64(32))
        value = (value << _u64(32)) | v
    return value, bad


def parse_block(data: bytes, name: str, first_line: int, skip_bad: bool) -> Block:
    """Parse complete lines (``data`` ends with a newline). ``first_line`` is 1-based."""
    buf = np.frombuffer(b"0" * _PAD + data, dtype=np.uint8)
    delim = np.flatnonzero((buf == 9) | (buf == 10))
    is_nl = buf[delim] == 10
    n_lines = int(np.count_nonzero(is_nl))
    field_start = np.empty_like(delim)
    field_start[0:1] = _PAD
    field_start[1:] = delim[:-1] + 1
    if len(delim) == N_FIELDS * n_lines and is_nl[N_FIELDS - 1::N_FIELDS].all():
        # Every line has exactly 39 tabs (the common case): no per-line counting needed.
        ok_count = np.ones(n_lines, bool)
        tabs = np.full(n_lines, N_FIELDS - 1)
        starts = field_start.reshape(-1, N_FIELDS)
        ends = delim.reshape(-1, N_FIELDS)
        line_idx = None
    else:
        line_of = np.cumsum(is_nl) - is_nl
        tabs = np.bincount(line_of[~is_nl], minlength=n_lines)
        ok_count = tabs == N_FIELDS - 1
        keep = ok_count[line_of]
        starts = field_start[keep].reshape(-1, N_FIELDS)
        ends = delim[keep].reshape(-1, N_FIELDS)
        line_idx = np.flatnonzero(ok_count)
    # A trailing carriage return (CRLF files) is not part of the last field.
    if len(ends):
        cr = (ends[:, -1] > starts[:, -1]) & (buf[np.maximum(ends[:, -1] - 1, 0)] == 13)
        ends[:, -1] -= cr
    lens = ends - starts
    n = len(starts)
    ints, bad_int = _parse_ints(buf, starts[:, : 1 + N_INT].ravel(), lens[:, : 1 + N_INT].ravel())
    cats, bad_hex = _parse_hex(buf, starts[:, 1 + N_INT:].ravel(), lens[:, 1 + N_INT:].ravel())
    ints, bad_int = ints.reshape(n, 1 + N_INT), bad_int.reshape(n, 1 + N_INT)
    cats, bad_hex = cats.reshape(n, N_CAT), bad_hex.reshape(n, N_CAT)
    bad_label = ~bad_int[:, 0] & (ints[:, 0] != 0) & (ints[:, 0] != 1)
    bad = bad_int.any(axis=1) | bad_hex.any(axis=1) | bad_label
    n_bad = int(bad.sum()) + int((~ok_count).sum())
    first_bad = None
    if n_bad:
        first_bad = _describe_first_bad(data, name, first_line, ok_count, line_idx, bad,
                                        bad_int, bad_hex, bad_label, tabs)
        if not skip_bad:
            raise CriteoFormatError(first_bad)
    if bad.any():
        good = ~bad
        ints, cats = ints[good], cats[good]
    return Block(ints[:, 0].astype(np.int8), ints[:, 1:], cats, n_bad, first_bad)


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
        self.stream: BinaryIO = (gzip.GzipFile(fileobj=self.raw) if magic == b"\x1f\x8b"  # type: ignore[assignment]
                                 else self.raw)

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
    """REFERENCE / reference: log(max(0, x) + 1), computed in float32 like the reference's torch.log."""
    x = np.maximum(ints, 0).astype(np.float32)
    x += np.float32(1)
    return np.log(x, out=x)
