"""Reference forwards (pure PyTorch): the oracle every engine is tested against.

`Int8Reference` runs the served artifact: int8 rows read through the hot/cold placement and dequantized
as q.float() * scale[t], then the same MLP/interaction code as the fp32 DLRM module. `Fp32Reference`
runs the fp32 model straight from a checkpoint (memory-mapped).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from engines.model import DLRM, interaction, load_dlrm_state_dict, mlp_forward
from engines.placement import Placement
from formats.artifact import Artifact


class Int8Reference:
    def __init__(self, artifact: Artifact, gpu_part: float = 1.0) -> None:
        self.artifact = artifact
        self.config = artifact.config
        self.placement = Placement.from_artifact(artifact, gpu_part)
        n_hot = self.placement.n_hot
        # The two tiers as separate views, so a lookup really goes through the split.
        self.hot = artifact.embeddings[:n_hot]
        self.cold = artifact.embeddings[n_hot:]
        self.scales = torch.from_numpy(np.asarray(artifact.scales, dtype=np.float32))
        self.weights = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in artifact.mlp.items()}

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """int8 [n, T, dim] rows for file positions, hot rows from the hot tier, cold from the cold."""
        n_hot = self.placement.n_hot
        flat = positions.reshape(-1)
        out = np.empty((flat.size, self.config.embedding_dim), dtype=np.int8)
        is_hot = flat < n_hot
        out[is_hot] = self.hot[flat[is_hot]]
        out[~is_hot] = self.cold[flat[~is_hot] - n_hot]
        return out.reshape(*positions.shape, self.config.embedding_dim)

    def predict_positions(self, dense: np.ndarray, positions: np.ndarray) -> np.ndarray:
        emb = torch.from_numpy(self.gather(positions)).float() * self.scales[None, :, None]
        with torch.no_grad():
            out = mlp_forward(self.weights, self.config, torch.tensor(np.asarray(dense, dtype=np.float32)), emb)
        return out.numpy()

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """float32 [n] click probabilities for dense float32 [n, 13] and sparse int [n, 26]."""
        return self.predict_positions(dense, self.placement.positions(sparse))

    def top_input(self, dense: np.ndarray, sparse: np.ndarray) -> torch.Tensor:
        """float32 [n, interaction_width]: the top MLP's input (bottom MLP output + dot interaction)."""
        emb = torch.from_numpy(self.gather(self.placement.positions(sparse))).float() * self.scales[None, :, None]
        x = torch.tensor(np.asarray(dense, dtype=np.float32))
        with torch.no_grad():
            for i in range(len(self.config.bottom_mlp)):
                x = torch.relu(torch.nn.functional.linear(x, self.weights[f"bot_l.{2 * i}.weight"],
                                                          self.weights[f"bot_l.{2 * i}.bias"]))
            return interaction(x, emb)


class Int8MlpReference(Int8Reference):
    """int8 tables (as Int8Reference) + the int8 top MLP of kernels.quant_linear, through its reference
    chain: the top input rounded to fp16 (as the GPU engine stores it), layer 1 fp16, the rest int8 with
    the artifact's calibrated activation scales (or `calibration`, overriding them)."""

    def __init__(self, artifact: Artifact, gpu_part: float = 1.0, calibration: Any = None) -> None:
        super().__init__(artifact, gpu_part)
        from engines.int8_top_mlp import quantize_top_mlp

        cal = artifact.calibration if calibration is None else calibration
        if cal is None:
            raise ValueError(f"{artifact.path}: no calibration.json: run `dlrm-prepare calibrate --model "
                             f"{artifact.path} --dataset CALIBRATION_DATASET` first")
        self.quant = quantize_top_mlp(artifact.mlp, cal)

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        from engines.int8_top_mlp import top_mlp_int8_reference

        x = self.top_input(dense, sparse)
        x = torch.nn.functional.pad(x, (0, self.quant.in_width_padded - x.shape[1])).to(torch.float16)
        return top_mlp_int8_reference(self.quant, x).numpy()


class Fp8MlpReference(Int8Reference):
    """int8 tables (as Int8Reference) + the fp8 e4m3 top MLP of engines.fp8_top_mlp, through its plain
    PyTorch reference (the top input quantized with the calibrated scale, fp32 sums, bf16 last GEMM)."""

    def __init__(self, artifact: Artifact, gpu_part: float = 1.0, calibration: Any = None) -> None:
        super().__init__(artifact, gpu_part)
        from engines.fp8_top_mlp import quantize_fp8_top_mlp

        cal = artifact.calibration if calibration is None else calibration
        if cal is None:
            raise ValueError(f"{artifact.path}: no calibration.json: run `dlrm-prepare calibrate --model "
                             f"{artifact.path} --dataset CALIBRATION_DATASET` first")
        self.fp8 = quantize_fp8_top_mlp(artifact.mlp, cal)

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        from engines.fp8_top_mlp import fp8_top_mlp_reference, quantize_top_input

        x0 = quantize_top_input(self.fp8, self.top_input(dense, sparse))
        return fp8_top_mlp_reference(self.fp8, x0).numpy()


class Fp32Reference:
    """The fp32 model of a checkpoint (path, memory-mapped; or a loaded state dict)."""

    def __init__(self, checkpoint: str | Path | Mapping[str, Any]) -> None:
        self.model: DLRM = load_dlrm_state_dict(checkpoint)
        self.config = self.model.config

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model(torch.tensor(np.asarray(dense, dtype=np.float32)),
                             torch.tensor(np.asarray(sparse, dtype=np.int64)))
        return out.numpy()
