"""Vectorized building blocks of `dlrm-prepare synthetic`: skewed row ids, Criteo-like feature values,
the Criteo TSV encoding, and the planted model's weights.

Everything draws from a numpy Generator handed in by the caller, so one seed gives the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from formats.model_config import DLRMConfig

DENSE = 13
TABLES = 26
HEX_DIGITS = 8  # Criteo categoricals are 32-bit values written as 8 lowercase hex digits
DENSE_WIDTH = 11  # sign + 10 decimal digits (int32 range)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_POW10 = 10 ** np.arange(DENSE_WIDTH - 2, -1, -1, dtype=np.int64)  # 1e9 .. 1


# ----------------------------------------------------------------------------------------------
# Skewed row ids


@dataclass(frozen=True)
class TableSkew:
    """Per-table Zipf-like law: rank r is drawn with weight ~ (r+1)^-alpha, and rank r is stored at
    row (mult * r + add) % rows, so hot rows are scattered over the table as in real hashed data."""

    rows: int
    alpha: float
    mult: int
    add: int

    def rank_to_row(self, rank: np.ndarray) -> np.ndarray:
        # mult < rows <= 2**31 and rank < rows, so the product fits int64.
        return (rank.astype(np.int64) * self.mult + self.add) % self.rows

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """int64 row ids. Inverse CDF of the continuous power law on [1, rows+1) (O(1) memory, so it
        works for 40 M-row tables), floored to a rank."""
        u = rng.random(n)
        a = self.alpha
        top = float(self.rows + 1)
        if abs(a - 1.0) < 1e-9:
            x = np.exp(u * math.log(top))
        else:
            e = 1.0 - a
            x = (1.0 + u * (top**e - 1.0)) ** (1.0 / e)
        rank = np.minimum(np.floor(x).astype(np.int64) - 1, self.rows - 1)
        np.maximum(rank, 0, out=rank)
        return self.rank_to_row(rank)

    def expected_counts(self, total: float) -> np.ndarray:
        """float32 [rows]: expected lookups of each row when `total` ids are drawn (same law)."""
        a = self.alpha
        edges = np.arange(1, self.rows + 2, dtype=np.float64)
        if abs(a - 1.0) < 1e-9:
            cdf = np.log(edges) / math.log(self.rows + 1.0)
        else:
            e = 1.0 - a
            cdf = (edges**e - 1.0) / ((self.rows + 1.0) ** e - 1.0)
        by_rank = np.diff(cdf) * total
        counts = np.empty(self.rows, dtype=np.float32)
        counts[self.rank_to_row(np.arange(self.rows, dtype=np.int64))] = by_rank
        return counts


def table_skews(rng: np.random.Generator, table_rows: tuple[int, ...], alpha: float,
                scatter: bool = True) -> list[TableSkew]:
    """`scatter=False`: rank r is row r (hot rows first), for writers that need locality."""
    skews = []
    for rows in table_rows:
        mult = int(rng.integers(1, rows)) if rows > 1 else 1
        while math.gcd(mult, rows) != 1:  # coprime multiplier -> the map is a permutation
            mult += 1
        add = int(rng.integers(0, rows))
        if not scatter:
            mult, add = 1, 0
        skews.append(TableSkew(int(rows), float(alpha), mult, add))
    return skews


# ----------------------------------------------------------------------------------------------
# Feature values


@dataclass(frozen=True)
class FeatureLaw:
    """Per-feature shapes of the raw Criteo-like values (drawn once per seed)."""

    dense_mu: np.ndarray  # [13] log-normal location of (x + 1)
    dense_sigma: np.ndarray  # [13]
    dense_missing: np.ndarray  # [13] probability of an empty field
    cat_missing: np.ndarray  # [26] probability of an empty field

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "FeatureLaw":
        dense_missing = rng.uniform(0.0, 0.45, DENSE)
        dense_missing[rng.random(DENSE) < 0.3] = 0.0
        dense_missing[1] = 0.0  # like Criteo's I2: always present, sometimes negative
        cat_missing = np.where(rng.random(TABLES) < 0.3, rng.uniform(0.02, 0.4, TABLES), 0.0)
        return cls(rng.uniform(0.0, 4.0, DENSE), rng.uniform(0.7, 2.0, DENSE), dense_missing, cat_missing)


@dataclass
class RawChunk:
    """One chunk of pairs as the TSV holds them, plus what the criteo pipeline will read back."""

    dense_int: np.ndarray  # int64 [n, 13] raw integer values (meaningless where missing)
    dense_missing: np.ndarray  # bool [n, 13]
    hex_values: np.ndarray  # int64 [n, 26] 32-bit categorical values (meaningless where missing;
    #                       [0, 26] when drawn without hex)
    cat_missing: np.ndarray  # bool [n, 26]
    sparse: np.ndarray  # int32 [n, 26] row ids the model sees: hex % rows, 0 where missing
    dense: np.ndarray  # float32 [n, 13] log(max(0, x) + 1), 0 where missing


def draw_chunk(rng: np.random.Generator, n: int, law: FeatureLaw, skews: list[TableSkew],
               with_hex: bool = True) -> RawChunk:
    """`with_hex=False` skips the hex values (the full-size dataset stores row ids only)."""
    z = rng.standard_normal((n, DENSE), dtype=np.float32)
    z *= law.dense_sigma.astype(np.float32)
    z += law.dense_mu.astype(np.float32)
    dense_int = np.floor(np.exp(z)).astype(np.int64) - 1
    np.clip(dense_int, 0, 2**31 - 1, out=dense_int)
    neg = rng.random(n) < 0.03  # Criteo's I2 has small negative values
    dense_int[neg, 1] = -rng.integers(1, 4, int(neg.sum()))
    dense_missing = rng.random((n, DENSE), dtype=np.float32) < law.dense_missing.astype(np.float32)
    cat_missing = rng.random((n, TABLES), dtype=np.float32) < law.cat_missing.astype(np.float32)

    rows_t = np.empty((TABLES, n), dtype=np.int32)  # table-major: contiguous writes per table
    hex_values = np.empty((n, TABLES) if with_hex else (0, TABLES), dtype=np.int64)
    for t, sk in enumerate(skews):
        r = sk.sample(rng, n)
        rows_t[t] = r
        if not with_hex:
            continue
        # Any value = row + k*rows maps back to `row` under the criteo rule int(hex,16) % rows.
        kmax = (2**32 - 1 - r) // sk.rows
        hex_values[:, t] = r + np.floor(rng.random(n) * (kmax + 1)).astype(np.int64) * sk.rows
    rows_t[cat_missing.T] = 0  # an empty field reads as 0, i.e. row 0 of the table
    rows = np.ascontiguousarray(rows_t.T)

    dense = np.log(np.maximum(dense_int, 0) + 1.0).astype(np.float32)
    dense[dense_missing] = 0.0
    return RawChunk(dense_int, dense_missing, hex_values, cat_missing, rows, dense)


# ----------------------------------------------------------------------------------------------
# TSV encoding (no per-line Python: fixed-width byte matrix + keep-mask, flattened)


def encode_tsv(labels: np.ndarray, chunk: RawChunk) -> bytes:
    """Criteo day-file lines: label, 13 decimal ints, 26 hex values; tab separated; empty = missing."""
    n = len(labels)
    lab = np.empty((n, 2), dtype=np.uint8)
    lab[:, 0] = ord("0") + labels.astype(np.uint8)
    lab[:, 1] = ord("\t")
    lab_keep = np.ones((n, 2), dtype=bool)

    v = chunk.dense_int
    mag = np.abs(v)
    dig = np.empty((n, DENSE, DENSE_WIDTH + 1), dtype=np.uint8)
    dig[:, :, 0] = ord("-")
    dig[:, :, 1:DENSE_WIDTH] = ord("0") + (mag[:, :, None] // _POW10) % 10
    dig[:, :, DENSE_WIDTH] = ord("\t")
    ndig = 1 + (mag[:, :, None] >= _POW10[:-1]).sum(axis=2)  # decimal digits of |v|
    pos = np.arange(1, DENSE_WIDTH)
    dkeep = np.empty(dig.shape, dtype=bool)
    dkeep[:, :, 0] = v < 0
    dkeep[:, :, 1:DENSE_WIDTH] = pos >= (DENSE_WIDTH - ndig)[:, :, None]
    dkeep[:, :, :DENSE_WIDTH] &= ~chunk.dense_missing[:, :, None]
    dkeep[:, :, DENSE_WIDTH] = True

    shifts = np.arange(4 * (HEX_DIGITS - 1), -1, -4, dtype=np.int64)
    hx = np.empty((n, TABLES, HEX_DIGITS + 1), dtype=np.uint8)
    hx[:, :, :HEX_DIGITS] = _HEX[(chunk.hex_values[:, :, None] >> shifts) & 15]
    hx[:, :, HEX_DIGITS] = ord("\t")
    hx[:, -1, HEX_DIGITS] = ord("\n")
    hkeep = np.empty(hx.shape, dtype=bool)
    hkeep[:, :, :HEX_DIGITS] = ~chunk.cat_missing[:, :, None]
    hkeep[:, :, HEX_DIGITS] = True

    body = np.concatenate([lab, dig.reshape(n, -1), hx.reshape(n, -1)], axis=1)
    keep = np.concatenate([lab_keep, dkeep.reshape(n, -1), hkeep.reshape(n, -1)], axis=1)
    return body[keep].tobytes()


# ----------------------------------------------------------------------------------------------
# Planted model weights


def narrow_config(config: DLRMConfig, width: int) -> DLRMConfig:
    """The planted core: same tables and layer count, hidden widths cut to `width` (0 = full)."""
    if width <= 0:
        return config
    bottom = tuple(min(width, w) for w in config.bottom_mlp[:-1]) + (config.bottom_mlp[-1],)
    top = tuple(min(width, w) for w in config.top_mlp[:-1]) + (config.top_mlp[-1],)
    return DLRMConfig(config.table_rows, config.embedding_dim, config.dense_features, bottom, top)


def planted_mlp(rng: np.random.Generator, config: DLRMConfig, width: int) -> dict[str, np.ndarray]:
    """Full-width MLP weights whose output depends only on the first `width` units of each hidden
    layer: the other units get random incoming weights (realistic activations) but zero outgoing
    weights. So the full model equals its narrow core exactly, and labels can be planted with the
    narrow core at a small fraction of the cost on a CPU (`width` 0: every unit is live)."""
    out: dict[str, np.ndarray] = {}
    for prefix, widths, fan_in in (
        ("bot_l", config.bottom_mlp, config.dense_features),
        ("top_l", config.top_mlp, config.interaction_width),
    ):
        live_in = fan_in  # inputs of the first layer are all live
        for i, n_out in enumerate(widths):
            last = i == len(widths) - 1
            live_out = n_out if (last or width <= 0) else min(width, n_out)
            w = np.zeros((n_out, fan_in), dtype=np.float32)
            # He init over the live inputs keeps activations O(1) through the ReLUs.
            he = np.float32(math.sqrt(2.0 / live_in))
            w[:, :live_in] = rng.standard_normal((n_out, live_in), dtype=np.float32) * he
            b = (rng.standard_normal(n_out, dtype=np.float32) * 0.05).astype(np.float32)
            out[f"{prefix}.{2 * i}.weight"] = w
            out[f"{prefix}.{2 * i}.bias"] = b
            fan_in, live_in = n_out, live_out
    return out


def narrow_view(mlp: dict[str, np.ndarray], narrow: DLRMConfig) -> dict[str, np.ndarray]:
    """The planted core's weights: the top-left block of every full-width layer."""
    shapes = narrow.expected_shapes()
    return {k: np.ascontiguousarray(v[tuple(slice(0, s) for s in shapes[k])]) for k, v in mlp.items()}


def embedding_table(rng: np.random.Generator, rows: int, dim: int, std: float,
                    tail_df: float = 0.0) -> np.ndarray:
    """float32 [rows, dim] with standard deviation `std`: Student-t entries with `tail_df` degrees of
    freedom (> 2), or Gaussian for 0. Heavier tails raise each table's maxabs, hence the int8 step
    (scale = maxabs / 127.5) relative to typical values, as outliers do in trained tables."""
    if tail_df <= 0:
        return rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(std)
    if tail_df <= 2:
        raise ValueError(f"tail_df must be > 2 (finite variance) or 0, got {tail_df}")
    x = rng.standard_t(tail_df, (rows, dim)).astype(np.float32)
    x *= np.float32(std / math.sqrt(tail_df / (tail_df - 2.0)))
    return x
