"""`dlrm-prepare criteo`: Criteo Terabyte day files (TSV, plain or .gz) -> dataset directory.

Categorical ids come either from a modulus per table (``--model ARTIFACT`` or ``--table-rows``:
``id = int(hex, 16) % table_rows[t]``) or from per-feature dictionaries built over
``--dictionary-days`` the way facebookresearch/dlrm ``data_utils.getCriteoAdData`` does for the
MLPerf model: ``v = int(hex, 16) % max_ind_range`` (40 M), then each distinct ``v`` of feature ``t``
gets the next id in order of first appearance over the dictionary days (their ``convertDicts``
insertion order). The sample partition uses the MLCommons rule (formats.trace, seed 123) or a
given trace file. Optionally counts row accesses into ``row_frequencies.bin`` (REFERENCE).
"""
from __future__ import annotations

import argparse
import sys
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Sequence

import numpy as np

from formats.dataset import DatasetError, DatasetWriter
from formats.frequencies import write_row_frequencies
from formats.trace import TraceError, read_trace, reference_sample_sizes
from prepare.progress import progress
from tqdm import tqdm
from prepare.criteo_parse import (N_CAT, Block, CriteoFormatError, count_lines, dense_transform,
                                  iter_line_blocks, parse_block)

MLPERF_MAX_IND_RANGE = 40_000_000


class CriteoError(ValueError):
    """A preprocessing failure with a message for the user (bad input, bad options)."""


class ModuloMap:
    """``id = value % table_rows[t]``."""

    def __init__(self, table_rows: Sequence[int]) -> None:
        if len(table_rows) != N_CAT or min(table_rows) <= 0:
            raise CriteoError(f"need {N_CAT} positive table sizes, got {list(table_rows)}")
        self.table_rows = tuple(int(r) for r in table_rows)
        self._rows = np.asarray(self.table_rows, dtype=np.uint64)

    def __call__(self, cats: np.ndarray) -> np.ndarray:
        return (cats % self._rows).astype(np.int32)


class DictionaryMap:
    """Per-feature dictionaries: value % max_ind_range -> contiguous id by first appearance.

    One dense uint32 table per feature holds ``id + 1`` (0 = unseen), indexed by the reduced value:
    lookups and updates are single gathers/scatters. ``np.zeros`` is lazily backed by the OS, so only
    the pages of values that occur cost memory (at most 26 x 160 MB for the 40 M range).
    """

    def __init__(self, max_ind_range: int = MLPERF_MAX_IND_RANGE) -> None:
        if not 0 < max_ind_range < 2 ** 32 - 1:
            raise CriteoError(f"--max-ind-range must be in 1 .. 2**32-2, got {max_ind_range}")
        self.max_ind_range = np.uint64(max_ind_range)
        self._tables = [np.zeros(max_ind_range, np.uint32) for _ in range(N_CAT)]
        self._sizes = [0] * N_CAT

    def observe(self, cats: np.ndarray) -> None:
        cats = (cats % self.max_ind_range).astype(np.int64)
        for t, table in enumerate(self._tables):
            uniq, first = np.unique(cats[:, t], return_index=True)
            fresh = table[uniq] == 0
            uniq, first = uniq[fresh], first[fresh]
            # New values get the next ids in order of their first appearance in this block.
            table[uniq[np.argsort(first, kind="stable")]] = np.arange(
                self._sizes[t] + 1, self._sizes[t] + 1 + len(uniq), dtype=np.uint32)
            self._sizes[t] += len(uniq)

    @property
    def table_rows(self) -> tuple[int, ...]:
        return tuple(max(1, n) for n in self._sizes)

    def __call__(self, cats: np.ndarray) -> np.ndarray:
        cats = (cats % self.max_ind_range).astype(np.int64)
        out = np.empty(cats.shape, np.int32)
        for t, table in enumerate(self._tables):
            ids = table[cats[:, t]]
            if not ids.all():
                r = int(np.argmin(ids))
                raise CriteoError(
                    f"categorical feature {t}: value {int(cats[r, t])} (pair {r} of its block) is "
                    "not in the dictionary; include this day in --dictionary-days"
                )
            out[:, t] = ids.astype(np.int32) - 1
        return out


def _bar(total: int, desc: str) -> tqdm:
    return progress(total, desc, unit="B")


@dataclass
class _Parsed:
    nbytes: int
    lines: int
    block: Block
    ids: np.ndarray | None
    dense: np.ndarray | None


def _parse_one(data: bytes, name: str, line: int, skip_bad: bool,
               mapper: ModuloMap | DictionaryMap | None) -> _Parsed:
    blk = parse_block(data, name, line, skip_bad)
    ids = mapper(blk.cats) if mapper is not None else None
    dense = dense_transform(blk.ints) if mapper is not None else None
    return _Parsed(len(data), data.count(b"\n"), blk, ids, dense)


def _parsed_blocks(files: Sequence[Path], mapper: ModuloMap | DictionaryMap | None, skip_bad: bool,
                   block_bytes: int, workers: int, desc: str) -> Generator[_Parsed, None, None]:
    """Blocks parsed (and mapped) by ``workers`` threads -- numpy releases the GIL in its array
    loops -- and yielded in file order, so output order and first-error reporting are unchanged."""
    with _bar(sum(p.stat().st_size for p in files), desc) as bar, \
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="criteo") as pool:
        pending: deque[Future[_Parsed]] = deque()
        try:
            for path in files:
                for data, line in iter_line_blocks(path, block_bytes, bar.update):
                    pending.append(pool.submit(_parse_one, data, str(path), line, skip_bad, mapper))
                    if len(pending) > 2 * workers:
                        yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


@dataclass
class PrepareResult:
    num_pairs: int = 0
    num_samples: int = 0
    lines: int = 0
    bad_lines: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    first_bad: list[str] = field(default_factory=list)


def build_dictionaries(files: Sequence[Path], max_ind_range: int, skip_bad: bool,
                       block_bytes: int = 8 << 20, workers: int = 1) -> DictionaryMap:
    dmap = DictionaryMap(max_ind_range)
    for parsed in _parsed_blocks(files, None, skip_bad, block_bytes, workers, "dictionaries"):
        dmap.observe(parsed.block.cats)   # in file order: ids follow first appearance
    return dmap


def preprocess(files: Sequence[Path], mapper: ModuloMap | DictionaryMap, out: Path | None,
               freq_out: Path | None = None, trace: Path | None = None, seed: int = 123,
               max_pairs: int | None = None, skip_bad: bool = False,
               block_bytes: int = 8 << 20, workers: int = 1) -> PrepareResult:
    """Parse ``files`` in order into a dataset at ``out`` (first ``max_pairs`` good lines) and/or
    count per-row accesses of all their lines into ``freq_out``. Raises CriteoFormatError,
    CriteoError, DatasetError, TraceError."""
    res = PrepareResult()
    table_rows = mapper.table_rows
    writer = DatasetWriter(out, table_rows, "criteo:" + ",".join(p.name for p in files)) if out else None
    counts = [np.zeros(r, np.int64) for r in table_rows] if freq_out else None
    limit = max_pairs if max_pairs is not None else np.iinfo(np.int64).max
    t0 = time.perf_counter()
    blocks: Generator[_Parsed, None, None] | None = None
    try:
        blocks = _parsed_blocks(files, mapper, skip_bad, block_bytes, workers, "criteo")
        for parsed in blocks:
            blk, ids, dense = parsed.block, parsed.ids, parsed.dense
            assert ids is not None and dense is not None
            res.input_bytes += parsed.nbytes
            res.lines += parsed.lines
            if blk.bad_lines:
                res.bad_lines += blk.bad_lines
                if blk.first_bad and len(res.first_bad) < 5:
                    res.first_bad.append(blk.first_bad)
            if counts is not None:
                _count_rows(counts, ids)
            if writer is not None and res.num_pairs < limit:
                n = int(min(len(ids), limit - res.num_pairs))
                writer.append(blk.labels[:n].astype(np.float32), dense[:n], ids[:n])
                res.num_pairs += n
            if counts is None and res.num_pairs >= limit:
                break
        blocks.close()   # stops the reader and cancels blocks parsed ahead (also in finally)
        if writer is not None:
            offsets = read_trace(trace) if trace else reference_sample_sizes(res.num_pairs, seed)
            if offsets[-1] != res.num_pairs:
                raise CriteoError(f"{trace}: covers {int(offsets[-1])} pairs, the data has "
                                  f"{res.num_pairs}")
            writer.finish(offsets)
            res.num_samples = len(offsets) - 1
            writer = None
        if counts is not None and freq_out is not None:
            write_row_frequencies(freq_out, [c.astype(np.float32) for c in counts])
    finally:
        if blocks is not None:
            blocks.close()
        if writer is not None:
            writer.abort()
    res.seconds = time.perf_counter() - t0
    return res


def _count_rows(counts: list[np.ndarray], ids: np.ndarray) -> None:
    for t, c in enumerate(counts):
        col = ids[:, t]
        if len(c) <= 4 * len(col):
            c += np.bincount(col, minlength=len(c))
        else:
            u, k = np.unique(col, return_counts=True)
            c[u] += k


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("files", nargs="+", type=Path, metavar="DAY_FILE",
                        help="Criteo TSV day files, plain or gzip, processed in the given order")
    parser.add_argument("--out", type=Path, help="dataset directory to write")
    ids = parser.add_mutually_exclusive_group(required=True)
    ids.add_argument("--model", type=Path, metavar="ARTIFACT",
                     help="take table sizes from this model artifact; id = int(hex,16) %% rows[t]")
    ids.add_argument("--table-rows", metavar="N[,N...]",
                     help="26 comma-separated table sizes (or one for all); id = int(hex,16) %% rows[t]")
    ids.add_argument("--dictionary-days", nargs="+", type=Path, metavar="DAY_FILE",
                     help="build per-feature dictionaries (reference rule) over these day files")
    parser.add_argument("--max-ind-range", type=int, default=MLPERF_MAX_IND_RANGE,
                        help="modulus applied before the dictionaries (default 40,000,000)")
    parser.add_argument("--trace", type=Path,
                        help="take the sample partition from this trace file (start, end, count)")
    parser.add_argument("--seed", type=int, default=123, help="numpy seed of the reference partition")
    parser.add_argument("--max-pairs", type=int, help="keep only the first N good lines")
    parser.add_argument("--first-half", action="store_true",
                        help="keep the first ceil(lines/2) lines (the MLPerf test set of day_23)")
    parser.add_argument("--count-frequencies-out", type=Path, metavar="row_frequencies.bin",
                        help="count row accesses over all lines of DAY_FILEs into this file "
                             "(with --out omitted, only counts)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="drop malformed lines (counted and reported) instead of stopping")
    parser.add_argument("--block-mb", type=int, default=8, help="read block size in MiB")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="parsing threads (default: CPUs, at most 8)")


def _mapper(args: argparse.Namespace) -> ModuloMap | DictionaryMap:
    block = args.block_mb << 20
    if args.dictionary_days:
        return build_dictionaries(args.dictionary_days, args.max_ind_range, args.skip_bad_lines, block,
                                  args.workers)
    if args.model:
        from formats.artifact import read_meta
        return ModuloMap([int(r) for r in read_meta(Path(args.model))["table_rows"]])
    try:
        rows = [int(r) for r in str(args.table_rows).split(",")]
    except ValueError as exc:
        raise CriteoError(f"--table-rows: {exc}") from exc
    return ModuloMap(rows * N_CAT if len(rows) == 1 else rows)


def run(args: argparse.Namespace) -> int:
    if args.out is None and args.count_frequencies_out is None:
        print("dlrm-prepare criteo: error: give --out and/or --count-frequencies-out", file=sys.stderr)
        return 2
    try:
        for p in [*args.files, *(args.dictionary_days or [])]:
            if not p.is_file():
                raise CriteoError(f"{p}: no such file")
        mapper = _mapper(args)
        max_pairs = args.max_pairs
        if args.first_half:
            half = -(-sum(count_lines(p) for p in args.files) // 2)
            max_pairs = half if max_pairs is None else min(max_pairs, half)
        res = preprocess(args.files, mapper, args.out, args.count_frequencies_out, args.trace,
                         args.seed, max_pairs, args.skip_bad_lines, args.block_mb << 20,
                         args.workers)
    except (CriteoFormatError, CriteoError, DatasetError, TraceError, OSError) as exc:
        print(f"dlrm-prepare criteo: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # ArtifactError and other typed input errors
        print(f"dlrm-prepare criteo: error: {exc}", file=sys.stderr)
        return 1
    mb = res.input_bytes / 1e6
    print(f"parsed {res.lines} lines ({mb:.1f} MB) in {res.seconds:.2f} s "
          f"({mb / max(res.seconds, 1e-9):.1f} MB/s)")
    if args.out:
        print(f"wrote {res.num_pairs} pairs in {res.num_samples} samples to {args.out}")
    if args.count_frequencies_out:
        print(f"wrote row frequencies to {args.count_frequencies_out}")
    if res.bad_lines:
        print(f"skipped {res.bad_lines} malformed lines; first: " + " | ".join(res.first_bad))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlrm-prepare criteo")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
