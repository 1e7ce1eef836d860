"""DLRM v1 (MLPerf Inference, REFERENCE "The model") as a PyTorch module and its checkpoint loader.

The state-dict keys are exactly those of facebookresearch/dlrm `DLRM_Net`, so the real checkpoint
`tb00_40M.pt` loads without renaming. The MLP / interaction math lives in functions shared with the int8
reference (engines/reference.py), so both paths compute the same graph.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from formats.model_config import NUM_TABLES, DLRMConfig

class CheckpointError(ValueError):
    """A checkpoint that is not a DLRM v1 state dict (names missing/unexpected keys and bad shapes)."""


def interaction(bottom: Tensor, emb: Tensor) -> Tensor:
    """REFERENCE dot interaction: [N,d] bottom output and [N,T,d] embeddings -> [N, d + (T+1)T/2].

    Strict lower triangle in row-major order (i > j), as DLRM_Net's li/lj lists.
    """
    t = torch.cat([bottom.unsqueeze(1), emb], dim=1)
    z = torch.bmm(t, t.transpose(1, 2))
    n = t.shape[1]
    li, lj = torch.tril_indices(n, n, offset=-1, device=t.device)
    return torch.cat([bottom, z[:, li, lj]], dim=1)


def mlp_forward(weights: Mapping[str, Tensor], config: DLRMConfig, dense: Tensor, emb: Tensor) -> Tensor:
    """Bottom MLP (ReLU after every layer), interaction, top MLP (ReLU between, sigmoid) -> [N]."""
    x = dense
    for i in range(len(config.bottom_mlp)):
        x = torch.relu(torch.nn.functional.linear(x, weights[f"bot_l.{2 * i}.weight"], weights[f"bot_l.{2 * i}.bias"]))
    x = interaction(x, emb)
    last = len(config.top_mlp) - 1
    for i in range(len(config.top_mlp)):
        x = torch.nn.functional.linear(x, weights[f"top_l.{2 * i}.weight"], weights[f"top_l.{2 * i}.bias"])
        if i < last:
            x = torch.relu(x)
    return torch.sigmoid(x).reshape(-1)


class DLRM(torch.nn.Module):
    """DLRM v1 with DLRM_Net's state-dict layout (nn.Sequential indices: Linear at even positions)."""

    def __init__(self, config: DLRMConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.emb_l = torch.nn.ModuleList(
            torch.nn.EmbeddingBag(int(r), config.embedding_dim, mode="sum", device=device)
            for r in config.table_rows
        )
        self.bot_l = _mlp(config.dense_features, config.bottom_mlp, device)
        self.top_l = _mlp(config.interaction_width, config.top_mlp, device)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        """[N, 13] float32, [N, 26] int -> [N] click probabilities."""
        # One index per table per pair: an EmbeddingBag sum over one row is that row.
        sparse = sparse.long()
        tables = [bag.weight for bag in self.emb_l if isinstance(bag, torch.nn.EmbeddingBag)]
        emb = torch.stack([w[sparse[:, t]] for t, w in enumerate(tables)], dim=1)
        weights = {k: v for k, v in self.named_parameters() if not k.startswith("emb_l.")}
        return mlp_forward(weights, self.config, dense, emb)


def _mlp(fan_in: int, widths: tuple[int, ...], device: torch.device | str | None) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for out in widths:
        layers += [torch.nn.Linear(fan_in, out, device=device), torch.nn.ReLU()]
        fan_in = out
    return torch.nn.Sequential(*layers)


def _state_dict_of(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return obj["state_dict"]
    if isinstance(obj, Mapping):
        return obj
    raise CheckpointError(f"checkpoint is a {type(obj).__name__}, not a state dict")


def _max_index(keys: list[str], prefix: str) -> int:
    idx = [int(k.split(".")[1]) for k in keys if k.startswith(prefix + ".") and k.split(".")[1].isdigit()]
    return max(idx) if idx else -1


def infer_config(state: Mapping[str, Any]) -> DLRMConfig:
    """Config from the shapes of a DLRM_Net state dict; CheckpointError naming every problem."""
    keys = [str(k) for k in state]
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    not_tensors = sorted(k for k in keys if k not in tensors)

    def rows_of(key: str, dim: int) -> int | None:
        v = tensors.get(key)
        return int(v.shape[dim]) if v is not None and v.dim() > dim else None

    table_rows = [rows_of(f"emb_l.{t}.weight", 0) or 1 for t in range(NUM_TABLES)]
    dim = rows_of("emb_l.0.weight", 1) or 128
    n_bot = _max_index(keys, "bot_l") // 2 + 1
    n_top = _max_index(keys, "top_l") // 2 + 1
    problems: list[str] = []
    if n_bot < 1 or n_top < 1:
        problems.append(f"no bottom/top MLP layers (bot_l.*: {n_bot}, top_l.*: {n_top})")
    bottom = tuple(rows_of(f"bot_l.{2 * i}.weight", 0) or 0 for i in range(max(n_bot, 0)))
    top = tuple(rows_of(f"top_l.{2 * i}.weight", 0) or 0 for i in range(max(n_top, 0)))
    dense = rows_of("bot_l.0.weight", 1) or 13
    config: DLRMConfig | None = None
    if not problems:
        try:
            config = DLRMConfig(tuple(table_rows), dim, dense, bottom, top)
        except ValueError as exc:
            problems.append(str(exc))
    if config is not None:
        expected = config.expected_shapes()
        missing = sorted(set(expected) - set(keys))
        unexpected = sorted(set(keys) - set(expected))
        if missing:
            problems.append("missing keys: " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        bad = [
            f"{k} has shape {tuple(tensors[k].shape)}, expected {shape}"
            for k, shape in expected.items()
            if k in tensors and tuple(tensors[k].shape) != shape
        ]
        if bad:
            problems.append("mismatched shapes: " + "; ".join(bad))
        bad_dtype = [k for k in expected if k in tensors and not tensors[k].is_floating_point()]
        if bad_dtype:
            problems.append("not floating point: " + ", ".join(bad_dtype))
    if not_tensors:
        problems.append("not tensors: " + ", ".join(not_tensors))
    if problems:
        raise CheckpointError("not a DLRM v1 checkpoint: " + " | ".join(problems))
    assert config is not None
    return config


def _numpy_safe_globals() -> list[Any]:
    """The numpy globals a facebookresearch/dlrm `--save-model` checkpoint pickles beside its state dict:
    numpy scalars (train_loss, test_acc, ...) and their dtypes, under numpy 2's `numpy._core` and numpy 1's
    `numpy.core` names. Nothing else is allowed: arrays, objects and code stay refused."""
    import numpy as np
    import numpy.dtypes

    scalar = np._core.multiarray.scalar  # type: ignore[attr-defined]
    numeric = [getattr(numpy.dtypes, name) for name in numpy.dtypes.__all__
               if name.endswith("DType") and name[:-5] in _NUMPY_SCALAR_DTYPES]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *numeric]


_NUMPY_SCALAR_DTYPES = frozenset(("Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64",
                                  "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128"))
REWRITE_HINT = "dlrm-prepare rewrite-checkpoint {path} NEW.pt"


# torch.save's format before 1.6 starts with a pickled magic number (protocol 2, a 10-byte long).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def load_checkpoint_file(path: Path, mmap: bool = True) -> Any:
    """torch.load a checkpoint safely: weights only (tensors, containers, numbers) plus numpy scalars.

    A zip file (torch >= 1.6) is memory-mapped, never read whole (the real one is 90 GB). A legacy
    (pre-1.6, non-zip) file cannot be mapped: CheckpointError says how to rewrite it once."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if mmap and not zipfile.is_zipfile(path) and _is_legacy_torch_file(path):
        raise CheckpointError(
            f"{path}: a legacy (pre-1.6, non-zip) torch file, which cannot be memory-mapped; rewrite it "
            f"once in the zip format (needs RAM for the whole file): {REWRITE_HINT.format(path=path)}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled-code files
        raise CheckpointError(f"{path}: cannot load as a weights-only torch checkpoint: {exc}") from exc


def load_dlrm_checkpoint(path_or_obj: str | Path | Mapping[str, Any]) -> tuple[DLRMConfig, dict[str, Tensor]]:
    """(config, state dict) from a path (memory-mapped, never read whole) or an already loaded object."""
    obj = load_checkpoint_file(Path(path_or_obj)) if isinstance(path_or_obj, (str, Path)) else path_or_obj
    state = _state_dict_of(obj)
    config = infer_config(state)
    return config, {k: state[k] for k in config.expected_shapes()}


def load_dlrm_state_dict(obj: str | Path | Mapping[str, Any]) -> DLRM:
    """A DLRM module sharing the checkpoint's tensors (no copy: built on the meta device)."""
    config, state = load_dlrm_checkpoint(obj)
    model = DLRM(config, device="meta")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval()


def random_state_dict(config: DLRMConfig, seed: int = 0) -> dict[str, Tensor]:
    """A DLRM_Net-shaped state dict with DLRM_Net-like random init (for synthetic models and tests)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, shape in config.expected_shapes().items():
        if key.startswith("emb_l."):
            # DLRM_Net initialises tables uniform in +-sqrt(1/rows).
            bound = math.sqrt(1.0 / shape[0])
            state[key] = (torch.rand(shape, generator=g) * 2 - 1) * bound
        elif key.endswith(".weight"):
            std = math.sqrt(2.0 / (shape[0] + shape[1]))
            state[key] = torch.randn(shape, generator=g) * std
        else:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / shape[0])
    return state
