"""DLRM module and checkpoint loading against an independent numpy implementation of SPEC's model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.model import (CheckpointError, DLRM, DLRMConfig, MLPERF_TABLE_ROWS, load_dlrm_checkpoint,
                           load_dlrm_state_dict, random_state_dict)

SMALL = DLRMConfig.mlperf().scaled(1e-4, cap=500)


def numpy_dlrm(state: dict[str, torch.Tensor], dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """SPEC written out with explicit loops over the interaction pairs (independent of engines.model)."""
    w = {k: v.double().numpy() for k, v in state.items()}
    x = dense.astype(np.float64)
    for i in (0, 2, 4):
        x = np.maximum(x @ w[f"bot_l.{i}.weight"].T + w[f"bot_l.{i}.bias"], 0)
    vecs = [x] + [w[f"emb_l.{t}.weight"][sparse[:, t]] for t in range(26)]
    feats = [x]
    for i in range(27):
        for j in range(i):
            feats.append((vecs[i] * vecs[j]).sum(axis=1, keepdims=True))
    z = np.concatenate(feats, axis=1)
    assert z.shape[1] == 479
    for n, i in enumerate((0, 2, 4, 6, 8)):
        z = z @ w[f"top_l.{i}.weight"].T + w[f"top_l.{i}.bias"]
        if n < 4:
            z = np.maximum(z, 0)
    return (1 / (1 + np.exp(-z))).reshape(-1)


def batch(config: DLRMConfig, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = np.log1p(rng.integers(0, 1000, size=(n, 13))).astype(np.float32)
    sparse = np.stack([rng.integers(0, r, size=n) for r in config.table_rows], axis=1).astype(np.int32)
    return dense, sparse


def test_mlperf_config_and_scaling() -> None:
    c = DLRMConfig.mlperf()
    assert c.table_rows == MLPERF_TABLE_ROWS and c.total_rows == 187_767_399
    assert c.interaction_width == 479
    s = c.scaled(0.001, cap=1000)
    assert s.table_rows[0] == 1000 and s.table_rows[5] == 1 and max(s.table_rows) == 1000
    assert s.bottom_mlp == (512, 256, 128) and s.top_mlp == (1024, 1024, 512, 256, 1)


def test_state_dict_keys_are_dlrm_net() -> None:
    keys = set(DLRM(SMALL).state_dict())
    expected = {f"emb_l.{t}.weight" for t in range(26)}
    expected |= {f"bot_l.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    expected |= {f"top_l.{i}.{p}" for i in (0, 2, 4, 6, 8) for p in ("weight", "bias")}
    assert keys == expected
    assert isinstance(DLRM(SMALL).emb_l[0], torch.nn.EmbeddingBag)


def test_forward_matches_numpy_reference_and_embeddingbag() -> None:
    state = random_state_dict(SMALL, seed=3)
    model = load_dlrm_state_dict(state)
    dense, sparse = batch(SMALL, 64)
    got = model(torch.from_numpy(dense), torch.from_numpy(sparse)).detach().numpy()
    np.testing.assert_allclose(got, numpy_dlrm(state, dense, sparse), rtol=0, atol=1e-5)
    # One index per table per pair: EmbeddingBag(mode="sum") over a bag of one is the row lookup.
    bag = model.emb_l[7]
    ids = torch.from_numpy(sparse[:, 7:8]).long()
    assert torch.equal(bag(ids), bag.weight[ids[:, 0]])


def test_load_bare_wrapped_and_file(tmp_path: Path) -> None:
    state = random_state_dict(SMALL)
    for obj in (state, {"state_dict": state, "epoch": 3}):
        config, loaded = load_dlrm_checkpoint(obj)
        assert config == SMALL and set(loaded) == set(state)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state}, path)
    config, loaded = load_dlrm_checkpoint(path)
    assert config == SMALL
    assert torch.equal(loaded["emb_l.3.weight"], state["emb_l.3.weight"])


def test_refuses_missing_unexpected_and_misshaped_keys() -> None:
    state = random_state_dict(SMALL)
    del state["top_l.4.bias"]
    del state["emb_l.25.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["bot_l.2.weight"] = torch.zeros(256, 500)
    with pytest.raises(CheckpointError) as err:
        load_dlrm_checkpoint(state)
    msg = str(err.value)
    for part in ("missing keys", "top_l.4.bias", "emb_l.25.weight", "unexpected keys", "extra.weight",
                 "bot_l.2.weight has shape (256, 500), expected (256, 512)"):
        assert part in msg


def test_refuses_non_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_dlrm_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_dlrm_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_dlrm_checkpoint([1, 2])  # type: ignore[arg-type]
