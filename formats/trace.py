"""LoadGen sample partition: the reference size rule and the ``start, end, count`` trace file.

The rule matches the MLCommons reference, mlcommons/inference
``recommendation/dlrm/pytorch/python/criteo.py`` (class ``Criteo``, variable query size with
``--samples-to-aggregate-quantile-file``; ``main.py`` calls ``np.random.seed(args.numpy_rand_seed)``,
default 123, before the dataset is built). Its loop is::

    qo = 0
    while not done:
        offsets.append(qo)
        qs = quantile[np.random.randint(low=0, high=len(quantile))]
        qo = min(qo + qs, num_individual_samples)
        done = qo >= num_individual_samples
    offsets.append(qo)

so the last sample is truncated to the pairs that remain (it may be shorter than 100), and the
trace file gets one line per sample: ``f"{s}, {e}, {e - s}"``. Sequential scalar ``randint`` calls
on the legacy global RandomState yield the same stream as one vectorised draw (tests check it), so
we draw an upper bound of sizes at once and cut at the first cumulative sum reaching the total.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# tools/dist_quantile.txt of the reference (REFERENCE): mean 270 pairs per sample.
REFERENCE_QUANTILES = np.array([100, 100] + [200] * 12 + [300, 300, 400, 500, 600, 700],
                               dtype=np.int64)


class TraceError(ValueError):
    """A trace file is malformed or inconsistent; the message names the file and line."""


def reference_sample_sizes(num_pairs: int, seed: int = 123,
                           quantiles: np.ndarray = REFERENCE_QUANTILES) -> np.ndarray:
    """Sample offsets ``[S+1]`` (int64, 0 .. num_pairs) drawn with the reference rule.

    Deviation: for ``num_pairs == 0`` the reference emits one empty sample; we emit none.
    """
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    if num_pairs == 0:
        return np.zeros(1, dtype=np.int64)
    q = np.asarray(quantiles, dtype=np.int64)
    # Every draw is >= q.min(), so this many draws always cover num_pairs.
    bound = -(-num_pairs // int(q.min())) + 1
    rs = np.random.RandomState(seed)
    sizes = q[rs.randint(low=0, high=len(q), size=bound)]
    ends = np.cumsum(sizes)
    last = int(np.searchsorted(ends, num_pairs, side="left"))  # first end >= num_pairs
    offsets = np.empty(last + 2, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = ends[: last + 1]
    offsets[-1] = num_pairs
    return offsets


def write_trace(path: Path | str, offsets: np.ndarray) -> None:
    """Write ``start, end, count`` lines (the reference's dlrm_trace_of_aggregated_samples.txt)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    starts, ends = offsets[:-1], offsets[1:]
    table = np.stack([starts, ends, ends - starts], axis=1)
    with open(path, "w") as f:
        if len(table):
            np.savetxt(f, table, fmt="%d", delimiter=", ")


def read_trace(path: Path | str) -> np.ndarray:
    """Read a trace file into offsets ``[S+1]``; checks the samples are contiguous from 0."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: unreadable ({exc})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return np.zeros(1, dtype=np.int64)
    fields = [ln.split(",") for ln in lines]
    bad = next((i for i, f in enumerate(fields) if len(f) != 3), None)
    if bad is not None:
        raise TraceError(f"{path}:{bad + 1}: expected 'start, end, count', got {lines[bad]!r}")
    try:
        table = np.array(fields, dtype=np.int64)
    except ValueError:
        for i, f in enumerate(fields):
            try:
                [int(x) for x in f]
            except ValueError:
                raise TraceError(f"{path}:{i + 1}: non-integer field in {lines[i]!r}") from None
        raise
    starts, ends, counts = table[:, 0], table[:, 1], table[:, 2]
    expected_starts = np.concatenate([[0], ends[:-1]])
    problems = (starts != expected_starts) | (counts != ends - starts) | (ends < starts)
    if problems.any():
        i = int(np.argmax(problems))
        raise TraceError(
            f"{path}:{i + 1}: {lines[i]!r} is not contiguous with the previous sample "
            f"(expected start {int(expected_starts[i])}, count = end - start >= 0)"
        )
    return np.concatenate([[0], ends]).astype(np.int64)
