"""`dlrm-prepare synthetic --full-size`: a full-size int8 artifact and LoadGen dataset, written directly.

No fp32 checkpoint exists in between (it would be 96 GB). Under `--out`:
  * `artifact/` (formats.artifact): the 26 tables streamed in chunks of uniformly random int8 rows
    (-127..127) with a random scale per table, random MLP weights (the planted-core layout of
    synthetic_gen.planted_mlp), and rows placed in the frequency order of a synthetic Zipf law;
  * `row_frequencies.bin`: that law's expected counts (REFERENCE format), the source of the order (hot
    rows are the low ids of each table, for write locality: see generate_full_size);
  * `dataset/` (formats.dataset): `--samples` LoadGen samples sized by the reference rule (seed 123),
    row ids drawn from the same per-table laws (so hot/cold placement matters), Criteo-like dense;
  * `manifest.json`.

Labels use a CHEAP PLANTED RULE, not the model: running the DLRM on 55 M pairs costs hours on a CPU.
logit = -1.1 + sum_t 1.0 * h_t(row_t) + sum_f c_f * dense_f, where h_t(row) = ((row * m_t + a_t) mod
2**16) / 2**16 - 0.5 is a fixed per-row hash value and c_f small random weights; label ~ Bernoulli.
The stored model is unrelated to this rule, so its AUC on this dataset is ~0.5: this mode is for
throughput, memory and hot/cold measurements; accuracy work uses the default (small) mode.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from formats.model_config import DLRMConfig
from formats.artifact import write_artifact
from formats.dataset import DatasetWriter
from formats.frequencies import frequency_order, write_row_frequencies
from formats.trace import reference_sample_sizes
from prepare import synthetic_gen as gen

TABLE_CHUNK_ROWS = 1 << 20  # 128 MiB of int8 rows per chunk handed to write_artifact
DATASET_CHUNK_PAIRS = 1 << 20
TRAINING_LOOKUPS = 4.2e9  # expected lookups per table over days 0..22 (Criteo Terabyte scale)
LABEL_MEAN, LABEL_ROW_WEIGHT, LABEL_DENSE_STD = -1.1, 1.0, 0.05


def _log(msg: str) -> None:
    print(f"[synthetic --full-size] {msg}", file=sys.stderr, flush=True)


def random_int8_rows(seed: np.random.SeedSequence, n: int, dim: int) -> np.ndarray:
    """int8 [n, dim] uniform over -127..127 (-128 is not a valid quantized value). Philox raw
    words are the fastest numpy source of random bytes here."""
    bits = np.random.Philox(seed)
    words = -(-(n * dim) // 8)
    raw = bits.random_raw(words).view(np.int8)[: n * dim].reshape(n, dim)
    np.maximum(raw, -127, out=raw)
    return raw


def _tables(config: DLRMConfig, root: np.random.SeedSequence) -> Iterator[tuple[int, int, np.ndarray]]:
    for t, (rows, ss) in enumerate(zip(config.table_rows, root.spawn(config.num_tables))):
        chunk_seeds = ss.spawn(-(-rows // TABLE_CHUNK_ROWS))
        for i, start in enumerate(range(0, rows, TABLE_CHUNK_ROWS)):
            n = min(TABLE_CHUNK_ROWS, rows - start)
            yield t, start, random_int8_rows(chunk_seeds[i], n, config.embedding_dim)


class LabelRule:
    """The cheap planted rule of the module docstring (parameters drawn once per seed)."""

    def __init__(self, rng: np.random.Generator, tables: int, dense: int) -> None:
        self.mult = rng.integers(1, 2**31, tables, dtype=np.int64) | 1
        self.add = rng.integers(0, 2**16, tables, dtype=np.int64)
        self.dense_w = rng.standard_normal(dense).astype(np.float32) * np.float32(LABEL_DENSE_STD)

    def logits(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        h = ((sparse.astype(np.int64) * self.mult + self.add) & 0xFFFF).astype(np.float32)
        h *= np.float32(1.0 / 65536)
        h -= np.float32(0.5)
        return LABEL_MEAN + LABEL_ROW_WEIGHT * h.sum(axis=1) + dense @ self.dense_w


def generate_full_size(out: Path, config: DLRMConfig, *, seed: int = 1, samples: int = 204_800,
                       alpha: float = 1.1, planted_width: int = 64) -> dict:
    """Write artifact/, dataset/, row_frequencies.bin and manifest.json under `out`; returns the
    manifest (with the seconds each phase took)."""
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model_ss, law_ss, label_ss, table_ss, data_ss = np.random.SeedSequence([seed, 1]).spawn(5)
    law_rng = np.random.default_rng(law_ss)
    # Hot rows are the low ids of each table (no scatter): write_artifact scatters each table's rows
    # to their frequency positions, and with rank == row consecutive rows of a table land at
    # increasing file positions, so the 24 GB file is written in sweeps rather than one random
    # 128-byte write per row (page-cache thrash once the file outgrows RAM). The frequency order
    # still interleaves the tables, so the remap table is far from the identity.
    skews = gen.table_skews(law_rng, config.table_rows, alpha, scatter=False)
    law = gen.FeatureLaw.draw(law_rng)
    model_rng = np.random.default_rng(model_ss)
    mlp = gen.planted_mlp(model_rng, config, planted_width)
    # Uniform int8 rows have maxabs 127, so with these scales the rows dequantize to std ~0.2-0.4,
    # the magnitude of the small mode's fp32 embeddings.
    scales = model_rng.uniform(0.003, 0.006, config.num_tables).astype(np.float32)

    counts = [sk.expected_counts(TRAINING_LOOKUPS) for sk in skews]
    write_row_frequencies(out / "row_frequencies.bin", counts)
    order = frequency_order(counts)
    del counts
    timings["row_order_s"] = time.perf_counter() - t0
    _log(f"row order of {config.total_rows:,} rows: {timings['row_order_s']:.1f} s")

    t1 = time.perf_counter()
    write_artifact(out / "artifact", config, _tables(config, table_ss), scales, mlp, row_order=order)
    del order
    timings["artifact_s"] = time.perf_counter() - t1
    _log(f"artifact ({config.total_rows * config.embedding_dim / 1e9:.2f} GB int8): "
         f"{timings['artifact_s']:.1f} s")

    t2 = time.perf_counter()
    # The reference rule cut to the first `samples` samples (each <= 700 pairs, so this many pairs
    # always yields enough; the rule draws sizes sequentially, so the prefix is the rule's own).
    offsets = reference_sample_sizes(samples * 700)[: samples + 1]
    num_pairs = int(offsets[-1])
    rule = LabelRule(np.random.default_rng(label_ss), config.num_tables, config.dense_features)
    starts = range(0, num_pairs, DATASET_CHUNK_PAIRS)
    positives = 0
    source = f"synthetic --full-size seed={seed} (labels: cheap planted rule, not the model)"
    def draw(start: int, ss: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = min(DATASET_CHUNK_PAIRS, num_pairs - start)
        rng = np.random.default_rng(ss)  # one stream per chunk: bytes do not depend on threads
        chunk = gen.draw_chunk(rng, n, law, skews, with_hex=False)
        z = rule.logits(chunk.dense, chunk.sparse)
        labels = (rng.random(n, dtype=np.float32) * (1 + np.exp(-z)) < 1).astype(np.float32)
        return labels, chunk.dense, chunk.sparse

    # numpy releases the GIL in the heavy draws, so chunks are drawn on threads and written in order;
    # at most 2 x workers chunks are held at once.
    workers = max(1, min(8, os.cpu_count() or 1))
    with DatasetWriter(out / "dataset", config.table_rows, source) as writer, \
            ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[tuple[np.ndarray, np.ndarray, np.ndarray]]] = deque()
        for start, ss in zip(starts, data_ss.spawn(len(starts))):
            pending.append(pool.submit(draw, start, ss))
            if len(pending) >= 2 * workers:
                labels, dense, sparse = pending.popleft().result()
                positives += int(labels.sum())
                writer.append(labels, dense, sparse)
        while pending:
            labels, dense, sparse = pending.popleft().result()
            positives += int(labels.sum())
            writer.append(labels, dense, sparse)
        writer.finish(offsets)
    timings["dataset_s"] = time.perf_counter() - t2
    _log(f"dataset ({num_pairs:,} pairs, {samples:,} samples): {timings['dataset_s']:.1f} s")

    manifest = {
        "format": "dlrm-synthetic",
        "version": 1,
        "mode": "full-size",
        "seed": seed,
        "artifact": "artifact",
        "dataset": "dataset",
        "row_frequencies": "row_frequencies.bin",
        "table_rows": list(config.table_rows),
        "total_rows": config.total_rows,
        "num_pairs": num_pairs,
        "num_samples": samples,
        "positive_rate": positives / max(num_pairs, 1),
        "zipf_alpha": alpha,
        "planted_width": planted_width,
        "labels": "cheap planted rule (prepare/synthetic_fullsize.py docstring); the model's AUC is ~0.5",
        **{k: round(v, 2) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
