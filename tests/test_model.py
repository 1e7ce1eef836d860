"""DLRM module and checkpoint loading against an independent numpy implementation of REFERENCE's model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.model import CheckpointError, DLRM, load_dlrm_checkpoint, load_dlrm_state_dict, random_state_dict
from formats.model_config import DLRMConfig, MLPERF_TABLE_ROWS

SMALL = DLRMConfig.mlperf().scaled(1e-4, cap=500)


def numpy_dlrm(state: dict[str, torch.Tensor], dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """REFERENCE written out with explicit loops over the interaction pairs (independent of engines.model)."""
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


def _dlrm_script_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """What facebookresearch/dlrm's `dlrm_s_pytorch.py --save-model` writes (the script that wrote
    tb00_40M.pt): the state dict beside numpy-scalar metrics and the optimizer's state."""
    params = [torch.nn.Parameter(v.clone()) for v in list(state.values())[:2]]
    opt = torch.optim.SGD(params, lr=0.1)
    return {"epoch": 0, "nepochs": 1, "nbatches": 10, "nbatches_test": 2, "iter": 10, "state_dict": state,
            "train_acc": np.float64(0.79), "train_loss": np.float32(0.45), "test_acc": np.float64(0.8),
            "test_loss": np.float64(0.44), "total_loss": np.float64(4.5), "total_accu": np.int64(7),
            "opt_state_dict": opt.state_dict()}


def test_loads_dlrm_script_checkpoint_with_numpy_scalars(tmp_path: Path) -> None:
    import zipfile

    state = random_state_dict(SMALL, seed=4)
    path = tmp_path / "script.pt"
    torch.save(_dlrm_script_checkpoint(state), path)
    config, loaded = load_dlrm_checkpoint(path)
    assert config == SMALL and torch.equal(loaded["top_l.8.bias"], state["top_l.8.bias"])
    # numpy 1.x pickles the scalar constructor as numpy.core.multiarray.scalar (numpy 2: numpy._core):
    # the same file written by a numpy-1 training run loads too.
    old = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info.filename, data)
    assert load_dlrm_checkpoint(old)[0] == SMALL


class _Arbitrary:
    """Stands for any pickled object whose class would run code at load."""


def test_refuses_pickled_code_even_beside_numpy_scalars(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    # A global that is neither a tensor, a container nor a numpy scalar: weights_only must still refuse.
    torch.save({"state_dict": random_state_dict(SMALL), "acc": np.float64(1.0), "extra": _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_dlrm_checkpoint(path)


def test_legacy_checkpoint_is_named_with_the_rewrite_command(tmp_path: Path) -> None:
    from prepare.cli import main as prepare_main

    state = random_state_dict(SMALL, seed=6)
    legacy = tmp_path / "legacy.pt"
    torch.save(_dlrm_script_checkpoint(state), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .pre-1.6") as err:
        load_dlrm_checkpoint(legacy)
    assert f"dlrm-prepare rewrite-checkpoint {legacy} NEW.pt" in str(err.value)
    assert prepare_main(["rewrite-checkpoint", str(legacy), str(tmp_path / "new.pt")]) == 0
    config, loaded = load_dlrm_checkpoint(tmp_path / "new.pt")
    assert config == SMALL and torch.equal(loaded["emb_l.0.weight"], state["emb_l.0.weight"])
