"""The served model artifact (docs/ARCHITECTURE.md "Model artifact"): int8 tables in frequency order.

Writing streams: tables arrive one (chunk) at a time and are scattered into a pre-sized memory-mapped
`embeddings.int8` at their frequency-order positions; written pages are flushed and dropped from this
process after every table so resident memory stays near one table. Opening checks the format, the
version, every file's size and a sampled SHA-256 (64 blocks of 1 MiB), so even a 24 GB artifact opens in
well under a second; `verify_full` checks the full SHA-256 (`dlrm-prepare verify`).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from formats.model_config import DLRMConfig

FORMAT = "dlrm-artifact"
VERSION = 1
EMBEDDINGS = "embeddings.int8"
ROW_POSITION = "row_position.npy"
ROW_ORDER = "row_order.npy"
SCALES = "scales.npy"
MLP = "mlp.npz"
META = "meta.json"
CALIBRATION = "calibration.json"  # optional, not in meta.json's files: written after the artifact
CALIBRATION_FORMAT = "dlrm-calibration"
CALIBRATION_VERSION = 1
DATA_FILES = (EMBEDDINGS, ROW_POSITION, ROW_ORDER, SCALES, MLP)
SAMPLE_BLOCKS = 64
BLOCK = 1 << 20
RELEASE_ROWS = 1 << 16  # rows scattered into embeddings.int8 between page releases


class ArtifactError(ValueError):
    """A missing, truncated, corrupt or wrong-version artifact; the message names the file."""


def table_offsets(table_rows: Iterable[int]) -> np.ndarray:
    """int64 [T+1]: exclusive prefix sum of the table sizes (global row = offset[t] + id)."""
    rows = np.asarray(list(table_rows), dtype=np.int64)
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(rows)])


def sampled_sha256(path: Path) -> str:
    """SHA-256 over 64 blocks of 1 MiB spread evenly over the file (the whole file if smaller)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * BLOCK:
            h.update(f.read())
        else:
            for off in np.linspace(0, size - BLOCK, SAMPLE_BLOCKS).astype(np.int64):
                f.seek(int(off))
                h.update(f.read(BLOCK))
    return h.hexdigest()


def full_sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * BLOCK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


@dataclass
class Artifact:
    path: Path
    config: DLRMConfig
    table_offsets: np.ndarray
    embeddings: np.memmap
    row_position: np.ndarray
    row_order: np.ndarray
    scales: np.ndarray
    mlp: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return int(self.table_offsets[-1])

    @classmethod
    def open(cls, path: Path | str) -> "Artifact":
        path = Path(path)
        meta = read_meta(path)
        config = _config_of(meta, path)
        files = meta.get("files")
        if not isinstance(files, dict):
            raise ArtifactError(f"{path / META}: no 'files' table")
        for name in DATA_FILES:
            _check_file(path, name, files.get(name))
        offsets = table_offsets(config.table_rows)
        total = int(offsets[-1])
        if int(meta.get("total_rows", -1)) != total:
            raise ArtifactError(f"{path / META}: total_rows {meta.get('total_rows')} != sum(table_rows) {total}")
        expected_bytes = total * config.embedding_dim
        if files[EMBEDDINGS]["bytes"] != expected_bytes:
            raise ArtifactError(
                f"{path / EMBEDDINGS}: {files[EMBEDDINGS]['bytes']} bytes recorded, expected {expected_bytes}"
            )
        embeddings = np.memmap(path / EMBEDDINGS, dtype=np.int8, mode="r", shape=(total, config.embedding_dim))
        row_position = _load_npy(path, ROW_POSITION, np.int32, (total,))
        row_order = _load_npy(path, ROW_ORDER, np.int32, (total,))
        scales = _load_npy(path, SCALES, np.float32, (config.num_tables,), mmap=False)
        mlp = _load_mlp(path, config)
        return cls(path, config, offsets, embeddings, row_position, row_order, scales, mlp, meta)

    def verify_full(self, on_bytes: Callable[[int], None] | None = None) -> None:
        """Full SHA-256 of every file against meta.json; ArtifactError naming the first bad file."""
        for name in DATA_FILES:
            want = self.meta["files"][name]["sha256"]
            got = full_sha256(self.path / name, on_bytes)
            if got != want:
                raise ArtifactError(f"{self.path / name}: bad checksum (sha256 {got}, meta.json says {want})")

    @property
    def calibration(self) -> "Calibration | None":
        """The optional int8 activation calibration (calibration.json), None when absent."""
        return read_calibration(self.path, self.meta)

    def data_bytes(self) -> int:
        return int(sum(self.meta["files"][n]["bytes"] for n in DATA_FILES))


def read_model_config(path: Path | str) -> DLRMConfig:
    """The model described by an artifact's meta.json (format, version and shape checked; the data
    files are not opened): what the dispatcher needs to check ids, without torch or the 24 GB tables."""
    path = Path(path)
    return _config_of(read_meta(path), path)


def write_model_description(path: Path | str, config: DLRMConfig) -> Path:
    """A meta.json describing a model with no weights: for daemons whose engines are all 'null'
    (benchmarks, tests), which need the table sizes and nothing else. Artifact.open refuses it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, **_config_meta(config), "total_rows": config.total_rows,
            "description_only": True}
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    if not meta_path.is_file():
        raise ArtifactError(f"{meta_path}: missing file (incomplete or not an artifact)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{meta_path}: unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{meta_path}: wrong version {meta.get('version')!r}, this build reads version {VERSION}")
    return meta


def _config_meta(config: DLRMConfig) -> dict[str, Any]:
    return {"table_rows": list(config.table_rows), "embedding_dim": config.embedding_dim,
            "dense_features": config.dense_features, "bottom_mlp": list(config.bottom_mlp),
            "top_mlp": list(config.top_mlp)}


def _config_of(meta: dict[str, Any], path: Path) -> DLRMConfig:
    try:
        return DLRMConfig(
            table_rows=tuple(int(r) for r in meta["table_rows"]),
            embedding_dim=int(meta["embedding_dim"]),
            dense_features=int(meta["dense_features"]),
            bottom_mlp=tuple(int(w) for w in meta["bottom_mlp"]),
            top_mlp=tuple(int(w) for w in meta["top_mlp"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path / META}: bad model description: {exc}") from exc


def _check_file(path: Path, name: str, entry: Any) -> None:
    file = path / name
    if not isinstance(entry, dict) or not {"bytes", "sha256", "sampled_sha256"} <= entry.keys():
        raise ArtifactError(f"{path / META}: no size/checksum entry for {name}")
    if not file.is_file():
        raise ArtifactError(f"{file}: missing file")
    size = file.stat().st_size
    if size < entry["bytes"]:
        raise ArtifactError(f"{file}: truncated ({size} bytes, expected {entry['bytes']})")
    if size != entry["bytes"]:
        raise ArtifactError(f"{file}: wrong size ({size} bytes, expected {entry['bytes']})")
    if sampled_sha256(file) != entry["sampled_sha256"]:
        raise ArtifactError(f"{file}: bad checksum (sampled sha256 differs from meta.json)")


def _load_npy(path: Path, name: str, dtype: type, shape: tuple[int, ...], mmap: bool = True) -> np.ndarray:
    try:
        arr = np.load(path / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / name}: unreadable: {exc}") from exc
    if arr.dtype != dtype or arr.shape != shape:
        raise ArtifactError(f"{path / name}: {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}{list(shape)}")
    return arr


def _load_mlp(path: Path, config: DLRMConfig) -> dict[str, np.ndarray]:
    try:
        with np.load(path / MLP, allow_pickle=False) as npz:
            mlp = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / MLP}: unreadable: {exc}") from exc
    expected = {k: s for k, s in config.expected_shapes().items() if not k.startswith("emb_l.")}
    if set(mlp) != set(expected):
        raise ArtifactError(f"{path / MLP}: keys {sorted(mlp)}, expected {sorted(expected)}")
    for k, shape in expected.items():
        if mlp[k].shape != shape or mlp[k].dtype != np.float32:
            raise ArtifactError(f"{path / MLP}: {k} is {mlp[k].dtype}{list(mlp[k].shape)}, expected float32{list(shape)}")
    return mlp


@dataclass(frozen=True)
class Calibration:
    """Static activation ranges for the int8 top MLP (prepare/calibrate.py writes it).

    amax: {layer name: max of that layer's input} for the int8 inputs ("top_l.2", "top_l.4", ...);
    observed: every statistic measured ({"max": {...}, "p99.99": {...}}) so a method can be switched
    without re-running; mlp_sha256 ties it to the artifact's mlp.npz (a rewritten model makes it stale).
    accuracy: what each GPU MLP precision kept, measured on the calibration set by its CPU reference
    (AccuracyRecord); None in a calibration written before it was measured.
    """
    method: str
    amax: dict[str, float]
    dataset: str
    pairs: int
    mlp_sha256: str
    observed: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: "AccuracyRecord | None" = None

    def to_json(self) -> dict[str, Any]:
        out = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "method": self.method,
               "amax": self.amax, "dataset": self.dataset, "pairs": self.pairs,
               "mlp_sha256": self.mlp_sha256, "observed": self.observed}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy.to_json()
        return out


@dataclass(frozen=True)
class AccuracyRecord:
    """AUC of each GPU MLP precision ("fp16", "int8", "fp8") over `pairs` pairs of the calibration set,
    and of the baseline they are a share of: "fp32" (the checkpoint's model) or, without a checkpoint,
    "int8-tables" (the artifact's int8 tables with an fp32 MLP)."""

    baseline: str
    baseline_auc: float
    auc: dict[str, float]
    pairs: int

    def ratio(self, precision: str) -> float | None:
        """AUC share of the baseline kept by `precision`; None if it was not measured."""
        got = self.auc.get(precision)
        return None if got is None or not self.baseline_auc > 0 else got / self.baseline_auc

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "baseline_auc": self.baseline_auc, "auc": self.auc, "pairs": self.pairs}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "AccuracyRecord":
        return cls(baseline=str(raw["baseline"]), baseline_auc=float(raw["baseline_auc"]),
                   auc={str(k): float(v) for k, v in raw["auc"].items()}, pairs=int(raw["pairs"]))


def write_calibration(path: Path | str, calibration: Calibration) -> None:
    """Write calibration.json into an artifact directory (atomically)."""
    path = Path(path)
    tmp = path / (CALIBRATION + ".tmp")
    tmp.write_text(json.dumps(calibration.to_json(), indent=1))
    os.replace(tmp, path / CALIBRATION)


def read_calibration(path: Path | str, meta: dict[str, Any] | None = None) -> Calibration | None:
    """The artifact's calibration, None when it has none; ArtifactError if unreadable or stale."""
    path = Path(path)
    file = path / CALIBRATION
    if not file.is_file():
        return None
    meta = read_meta(path) if meta is None else meta
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict) or raw.get("format") != CALIBRATION_FORMAT:
            raise ArtifactError(f"{file}: format is not {CALIBRATION_FORMAT!r}")
        if raw.get("version") != CALIBRATION_VERSION:
            raise ArtifactError(f"{file}: wrong version {raw.get('version')!r}, this build reads "
                                f"version {CALIBRATION_VERSION}")
        cal = Calibration(
            method=str(raw["method"]), amax={str(k): float(v) for k, v in raw["amax"].items()},
            dataset=str(raw["dataset"]), pairs=int(raw["pairs"]), mlp_sha256=str(raw["mlp_sha256"]),
            observed={str(m): {str(k): float(v) for k, v in d.items()} for m, d in raw.get("observed", {}).items()},
            accuracy=AccuracyRecord.from_json(raw["accuracy"]) if raw.get("accuracy") is not None else None,
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        raise ArtifactError(f"{file}: unreadable: {exc}") from exc
    want = meta.get("files", {}).get(MLP, {}).get("sha256")
    if cal.mlp_sha256 != want:
        raise ArtifactError(f"{file}: stale: made for mlp.npz sha256 {cal.mlp_sha256}, the artifact has {want} "
                            f"(re-run dlrm-prepare calibrate)")
    bad = {k: v for k, v in cal.amax.items() if not (np.isfinite(v) and v > 0)}
    if bad:
        raise ArtifactError(f"{file}: amax must be finite and positive, got {bad}")
    return cal


def write_artifact(
    path: Path | str,
    config: DLRMConfig,
    tables: Iterable[tuple[int, np.ndarray] | tuple[int, int, np.ndarray]],
    scales: np.ndarray,
    mlp: dict[str, np.ndarray],
    row_order: np.ndarray | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> None:
    """Write an artifact directory.

    `tables` yields (t, int8 rows of table t) in table order, or (t, first_row, int8 rows) chunks so a
    producer may stream. `scales` is read only after `tables` is exhausted, so a streaming producer may
    fill it in as it goes. `row_order` (global rows, most frequent first) defaults to the natural order.
    meta.json is written last: a partial artifact is refused as "missing meta.json".
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / META).unlink(missing_ok=True)
    offsets = table_offsets(config.table_rows)
    total, dim = int(offsets[-1]), config.embedding_dim
    if total >= 2**31:
        raise ValueError(f"{total} rows do not fit the int32 remap table")
    order = np.arange(total, dtype=np.int32) if row_order is None else np.asarray(row_order, dtype=np.int32)
    position = np.full(total, -1, dtype=np.int32)
    if order.shape != (total,) or order.min(initial=0) < 0 or order.max(initial=0) >= total:
        raise ValueError(f"row_order must be a permutation of {total} rows, got shape {order.shape}")
    position[order] = np.arange(total, dtype=np.int32)
    if (position < 0).any():
        raise ValueError("row_order is not a permutation (repeated rows)")
    np.save(path / ROW_ORDER, order)
    np.save(path / ROW_POSITION, position)
    del order

    written = np.zeros(config.num_tables, dtype=np.int64)
    with open(path / EMBEDDINGS, "w+b") as f:
        f.truncate(total * dim)
        mm = mmap.mmap(f.fileno(), total * dim) if total else None
        try:
            emb = np.frombuffer(mm, dtype=np.int8).reshape(total, dim) if mm is not None else None
            for item in tables:
                t, start, rows = (item[0], 0, item[1]) if len(item) == 2 else item
                rows = np.asarray(rows)
                if rows.dtype != np.int8 or rows.ndim != 2 or rows.shape[1] != dim:
                    raise ValueError(f"table {t}: rows must be int8 [n, {dim}], got {rows.dtype}{list(rows.shape)}")
                if start + rows.shape[0] > config.table_rows[t]:
                    raise ValueError(f"table {t}: rows {start}..{start + rows.shape[0]} beyond {config.table_rows[t]}")
                g0 = int(offsets[t]) + int(start)
                assert emb is not None and mm is not None
                for s in range(0, rows.shape[0], RELEASE_ROWS):
                    part = rows[s : s + RELEASE_ROWS]
                    emb[position[g0 + s : g0 + s + part.shape[0]]] = part
                    # Frequency order scatters a table over the whole file: drop our mappings of the
                    # touched pages after every block so RSS stays bounded (they stay in the page cache).
                    _release(mm)
                written[t] += rows.shape[0]
                if on_rows is not None:
                    on_rows(int(rows.shape[0]))
            del emb
        finally:
            if mm is not None:
                mm.flush()
                mm.close()
    missing = [t for t in range(config.num_tables) if written[t] != config.table_rows[t]]
    if missing:
        raise ValueError(f"tables {missing} were not written completely: {written[missing].tolist()} rows")
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (config.num_tables,):
        raise ValueError(f"scales must be float32 [{config.num_tables}], got {list(scales.shape)}")
    np.save(path / SCALES, scales)
    expected = {k: s for k, s in config.expected_shapes().items() if not k.startswith("emb_l.")}
    if set(mlp) != set(expected):
        raise ValueError(f"mlp keys {sorted(mlp)} differ from {sorted(expected)}")
    arrays = {k: np.ascontiguousarray(mlp[k], dtype=np.float32) for k in sorted(expected)}
    np.savez(path / MLP, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle

    files = {}
    for name in DATA_FILES:
        p = path / name
        files[name] = {"bytes": p.stat().st_size, "sha256": full_sha256(p), "sampled_sha256": sampled_sha256(p)}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        **_config_meta(config),
        "total_rows": total,
        "frequency_ordered": row_order is not None,
        "files": files,
    }
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path / META)


def _release(mm: mmap.mmap) -> None:
    """Unmap the written pages from this process. Safe without msync: on a shared file mapping the
    kernel keeps dirty pages in the page cache and writes them back later; only our RSS drops."""
    mm.madvise(mmap.MADV_DONTNEED)
