"""`dlrm-prepare model`: DLRM_Net checkpoint (+ row frequencies) -> int8 served artifact.

Streaming: the checkpoint is memory-mapped (torch.load(mmap=True)); each table is read twice in
row chunks (maxabs, then quantize) and its pages are dropped from this process afterwards, so
resident memory stays near one table even for the 90 GB real checkpoint.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import resource
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from torch import Tensor

from formats.model_config import DLRMConfig
from engines.model import load_dlrm_checkpoint
from engines.quant import CHUNK_ROWS, quantize_chunk, table_scale
from formats.artifact import write_artifact
from formats.frequencies import frequency_order, read_row_frequencies
from prepare.progress import progress

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Convert a DLRM v1 checkpoint into the int8 served artifact."
    parser.add_argument("--checkpoint", type=Path, required=True, help="DLRM_Net state dict (.pt)")
    parser.add_argument("--row-frequencies", type=Path, default=None,
                        help="row_frequencies.bin: store rows most-accessed first (hot/cold split)")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    config = convert(args.checkpoint, args.out, args.row_frequencies)
    peak = peak_rss_bytes()
    print(
        f"wrote {args.out}: {len(config.table_rows)} tables, {config.total_rows} rows, "
        f"{time.monotonic() - t0:.1f} s, peak RSS {peak / 2**20:.0f} MiB",
        file=sys.stderr,
    )
    return 0


def convert(checkpoint: Path, out: Path, row_frequencies: Path | None = None) -> DLRMConfig:
    config, state = load_dlrm_checkpoint(checkpoint)
    order = None
    if row_frequencies is not None:
        counts = read_row_frequencies(row_frequencies)
        got = tuple(len(c) for c in counts)
        if got != config.table_rows:
            raise ValueError(
                f"{row_frequencies}: table sizes {got} do not match the checkpoint's {config.table_rows}"
            )
        order = frequency_order(counts)
        del counts
    scales = np.zeros(config.num_tables, dtype=np.float32)
    mlp = {k: state[k].float().numpy().copy() for k in config.mlp_keys()}
    bar = progress(total=config.total_rows, desc="quantize", unit="rows")
    try:
        write_artifact(out, config, _quantized_chunks(state, config, scales, checkpoint), scales, mlp, order,
                       on_rows=bar.update)
    finally:
        bar.close()
    return config


def _quantized_chunks(state: dict[str, Tensor], config: DLRMConfig, scales: np.ndarray, file: Path
                      ) -> Iterator[tuple[int, int, np.ndarray]]:
    release = _Releaser(file)
    for t in range(config.num_tables):
        weight = state[f"emb_l.{t}.weight"]
        scales[t] = table_scale(weight, release)
        for start in range(0, weight.shape[0], CHUNK_ROWS):
            chunk = weight[start : start + CHUNK_ROWS]
            yield t, start, quantize_chunk(chunk, float(scales[t])).numpy()
            release(chunk)


class _Releaser:
    """release_pages with the checkpoint's mappings looked up once."""

    def __init__(self, file: Path) -> None:
        self.spans = _file_mappings(file)

    def __call__(self, tensor: Tensor) -> None:
        release_pages(tensor, self.spans)


def release_pages(tensor: Tensor, spans: list[tuple[int, int]]) -> None:
    """Drop a memory-mapped tensor's pages from this process (they are clean: re-read on touch).

    Only inside `spans`, the checkpoint file's mappings (/proc/self/maps): MADV_DONTNEED on anonymous
    memory would zero it, so a tensor that was not memory-mapped is left alone.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    lo = start - start % page
    hi = -(-(start + nbytes) // page) * page
    if any(m_lo <= lo and hi <= m_hi for m_lo, m_hi in spans):
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _file_mappings(file: Path) -> list[tuple[int, int]]:
    target = str(Path(file).resolve())
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = parts[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans


def peak_rss_bytes() -> int:
    """Peak resident set of this process (Linux ru_maxrss is in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
