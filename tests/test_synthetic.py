"""`dlrm-prepare synthetic`: determinism, skew, checkpoint layout, TSV round trip, planted labels,
and the full-size path at a tiny scale."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from formats.model_config import DLRMConfig
from engines.model import load_dlrm_checkpoint, load_dlrm_state_dict
from prepare import synthetic
from prepare import synthetic_gen as gen

SMALL = DLRMConfig.mlperf().scaled(1.0, 1500)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    synthetic.generate(out, SMALL, seed=7, days=2, pairs_per_day=3000)
    return out


def parse_criteo(path: Path, table_rows: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent reader (plain str.split): labels, log-dense, ids by the int(hex,16) % rows rule."""
    labels, dense, sparse = [], [], []
    for line in path.read_text().splitlines():
        f = line.split("\t")
        assert len(f) == 40, line
        assert f[0] in ("0", "1")
        labels.append(int(f[0]))
        dense.append([math.log(max(0, int(x)) + 1) if x else 0.0 for x in f[1:14]])
        row = []
        for t, h in enumerate(f[14:]):
            assert h == "" or (len(h) == 8 and h == h.lower()), h
            row.append(int(h, 16) % table_rows[t] if h else 0)
        sparse.append(row)
    return (np.array(labels, np.float32), np.array(dense, np.float32), np.array(sparse, np.int32))


def test_layout_and_manifest(small_run: Path) -> None:
    m = json.loads((small_run / "manifest.json").read_text())
    assert m["train_days"] == ["day_0"] and m["test_day"] == "day_1"
    assert m["table_rows"] == list(SMALL.table_rows)
    for d in m["days"]:
        assert (small_run / d["file"]).is_file() and d["pairs"] == 3000
        assert 0.1 < d["positive_rate"] < 0.5


def test_deterministic_for_a_seed(small_run: Path, tmp_path: Path) -> None:
    synthetic.generate(tmp_path / "a", SMALL, seed=7, days=2, pairs_per_day=3000)
    for name in ("day_0", "day_1", "model.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (small_run / name).read_bytes(), name
    synthetic.generate(tmp_path / "b", SMALL, seed=8, days=2, pairs_per_day=3000)
    assert (tmp_path / "b" / "day_1").read_bytes() != (small_run / "day_1").read_bytes()


def test_checkpoint_loads_with_full_mlperf_widths(small_run: Path) -> None:
    config, state = load_dlrm_checkpoint(small_run / "model.pt")
    assert config == SMALL  # full-width MLPs: 13-512-256-128, 479-1024-1024-512-256-1
    raw = torch.load(small_run / "model.pt", weights_only=True)
    assert set(raw) == set(SMALL.expected_shapes())  # a bare DLRM_Net state dict
    for k, shape in SMALL.expected_shapes().items():
        assert tuple(state[k].shape) == shape and state[k].dtype == torch.float32


def test_tsv_round_trip_and_planted_labels(small_run: Path) -> None:
    labels, dense, sparse = parse_criteo(small_run / "day_1", SMALL.table_rows)
    assert len(labels) == 3000
    assert (sparse == 0).mean() > 0.01 and (dense == 0).mean() > 0.05  # some empty fields
    model = load_dlrm_state_dict(small_run / "model.pt")
    with torch.inference_mode():
        p = model(torch.from_numpy(dense), torch.from_numpy(sparse)).double().numpy()
    auc = roc_auc_score(labels, p)
    assert auc > 0.7, auc  # labels were drawn from these very probabilities
    logit = np.log(p / (1 - p))
    assert 1.0 < logit.std() < 1.8, logit.std()  # spread-out predictions, not all ~0.5
    # int8 embeddings (REFERENCE quantization) move the predictions measurably but keep the ranking.
    from engines.quant import quantize_table, table_scale

    q_state = dict(torch.load(small_run / "model.pt", weights_only=True))
    for t in range(26):
        w = q_state[f"emb_l.{t}.weight"]
        s = table_scale(w)
        q_state[f"emb_l.{t}.weight"] = quantize_table(w, s).float() * s
    with torch.inference_mode():
        p8 = load_dlrm_state_dict(q_state)(torch.from_numpy(dense), torch.from_numpy(sparse)).double().numpy()
    assert 1e-3 < np.abs(p8 - p).mean() < 0.03
    assert roc_auc_score(labels, p8) > 0.99 * auc
    # Shuffling the categorical ids destroys the signal: the embeddings matter, not just dense.
    perm = np.random.default_rng(0).permutation(len(sparse))
    with torch.inference_mode():
        p2 = model(torch.from_numpy(dense), torch.from_numpy(sparse[perm])).double().numpy()
    assert roc_auc_score(labels, p2) < auc - 0.05


def test_hex_maps_back_to_the_row() -> None:
    rng = np.random.default_rng(3)
    skews = gen.table_skews(rng, SMALL.table_rows, 1.1)
    chunk = gen.draw_chunk(rng, 2000, gen.FeatureLaw.draw(rng), skews)
    rows = np.array(SMALL.table_rows, dtype=np.int64)
    assert (chunk.hex_values < 2**32).all() and (chunk.hex_values >= 0).all()
    present = ~chunk.cat_missing
    assert ((chunk.hex_values % rows == chunk.sparse)[present]).all()
    assert (chunk.sparse[~present] == 0).all()
    assert (chunk.hex_values >= 2 * rows).mean() > 0.9  # not just the row id: random multiples
    text = gen.encode_tsv(np.zeros(2000, bool), chunk).decode()
    line0 = text.split("\n")[0].split("\t")
    for t in range(26):
        h = line0[14 + t]
        assert (h == "") == bool(chunk.cat_missing[0, t])
        if h:
            assert int(h, 16) == chunk.hex_values[0, t]
    for f in range(13):
        x = line0[1 + f]
        assert (x == "") == bool(chunk.dense_missing[0, f])
        if x:
            assert int(x) == chunk.dense_int[0, f]


def test_skew_top_tenth_serves_most_lookups() -> None:
    sk = gen.table_skews(np.random.default_rng(1), (20000,), 1.1)[0]
    ids = sk.sample(np.random.default_rng(2), 200_000)
    counts = np.bincount(ids, minlength=20000)
    top = np.sort(counts)[::-1]
    assert top[:2000].sum() / counts.sum() > 0.5
    assert (counts > 0).sum() > 5000  # the tail is still used
    expected = sk.expected_counts(200_000)
    assert abs(expected.sum() - 200_000) < 1
    hot = np.argsort(-expected)[:2000]
    assert counts[hot].sum() / counts.sum() > 0.5  # the sampler follows the stated law


def test_planted_core_equals_full_width_model() -> None:
    cfg = DLRMConfig.mlperf().scaled(1.0, 300)
    rng = np.random.default_rng(5)
    mlp = gen.planted_mlp(rng, cfg, 16)
    narrow = gen.narrow_config(cfg, 16)
    emb = [gen.embedding_table(rng, r, 128, 0.3) for r in cfg.table_rows]
    full_state = {f"emb_l.{t}.weight": torch.from_numpy(w) for t, w in enumerate(emb)}
    full_state.update({k: torch.from_numpy(v) for k, v in mlp.items()})
    full = load_dlrm_state_dict(full_state)
    core = synthetic.planted_model(emb, gen.narrow_view(mlp, narrow))
    dense = torch.rand(500, 13) * 5
    sparse = torch.from_numpy(np.stack([rng.integers(0, r, 500) for r in cfg.table_rows], 1).astype(np.int32))
    with torch.inference_mode():
        torch.testing.assert_close(core(dense, sparse), full(dense, sparse), rtol=1e-4, atol=1e-6)
    # the hidden units beyond the core are alive (nonzero incoming weights), only their output is cut
    assert np.abs(mlp["top_l.0.weight"][16:]).sum() > 0 and not mlp["top_l.2.weight"][:, 16:].any()


def test_cli_contract(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    assert synthetic.run(parser.parse_args(["--out", str(tmp_path / "x"), "--days", "1"])) == 2
    args = parser.parse_args(["--out", str(tmp_path / "y"), "--days", "2", "--pairs-per-day", "300",
                              "--max-rows", "100"])
    assert synthetic.run(args) == 0
    m = json.loads((tmp_path / "y" / "manifest.json").read_text())
    assert max(m["table_rows"]) == 100


def test_full_size_path_at_tiny_scale(tmp_path: Path) -> None:
    from formats.artifact import Artifact
    from formats.dataset import Dataset
    from formats.trace import reference_sample_sizes

    cfg = DLRMConfig.mlperf().scaled(1e-4, 3000)
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "fs"), "--full-size", "--samples", "120",
                              "--scale", "1e-4", "--max-rows", "3000", "--seed", "3"])
    assert synthetic.run(args) == 0
    art = Artifact.open(tmp_path / "fs" / "artifact")
    ds = Dataset.open(tmp_path / "fs" / "dataset")
    assert art.config == cfg and ds.table_rows == cfg.table_rows
    assert ds.num_samples == 120
    np.testing.assert_array_equal(ds.sample_offsets, reference_sample_sizes(120 * 700)[:121])
    emb = np.asarray(art.embeddings)
    assert emb.min() >= -127 and emb.std() > 60  # uniform random int8 rows
    assert set(np.unique(ds.labels)) <= {0.0, 1.0} and 0.05 < ds.labels.mean() < 0.95
    # Frequency order: the dataset's lookups land mostly in the first tenth of the file (hot part).
    pos = art.row_position[np.asarray(ds.sparse, np.int64) + art.table_offsets[:-1]]
    assert (pos < 0.1 * art.total_rows).mean() > 0.5
    assert not np.array_equal(art.row_order, np.arange(art.total_rows))
    # Same seed, same bytes.
    synthetic.run(parser.parse_args(["--out", str(tmp_path / "fs2"), "--full-size", "--samples", "120",
                                     "--scale", "1e-4", "--max-rows", "3000", "--seed", "3"]))
    for name in ("artifact/embeddings.int8", "artifact/row_order.npy", "dataset/sparse.npy",
                 "dataset/labels.npy", "dataset/dense.npy"):
        assert (tmp_path / "fs" / name).read_bytes() == (tmp_path / "fs2" / name).read_bytes(), name
