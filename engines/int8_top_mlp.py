"""The DLRM top MLP on the int8 path: its quantization from the artifact and the calibration, and the
chain of kernels.quant_linear launches that runs it (plus the chain's reference).

Layer 1 fp16 (its K padded to a multiple of 16) -> int8 activations with static, calibrated per-tensor
scales (`dlrm-prepare calibrate`, the artifact's calibration.json) -> int8 layers with per-channel
weight scales -> the last int8 layer with the FINAL epilogue (the 1-wide output and sigmoid folded in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from kernels.quant_linear import QuantLinearError, quant_linear, quant_linear_reference, quantize_weight


@dataclass
class QuantTopMlp:
    """Top MLP for the int8 path: layer 1 fp16 (K padded to in_width_padded) -> int8 activations ->
    int8 layers -> last int8 layer with the FINAL epilogue (its 1-wide successor folded in).

    Per-channel symmetric int8 weights (w_scale = maxabs_row / 127) and static per-tensor activation
    scales act_scale[i] = amax[i] / 127 for the inputs of layers 2.. (calibration)."""
    in_width: int                     # 479
    w1: torch.Tensor                  # fp16 [N1, in_width_padded] (zero columns past in_width)
    b1: torch.Tensor                  # fp32 [N1]
    weights: list[torch.Tensor]       # int8 [N_i, K_i], layers 2..L-1
    w_scales: list[torch.Tensor]      # fp32 [N_i]
    biases: list[torch.Tensor]        # fp32 [N_i]
    x_scales: list[torch.Tensor]      # fp32 [1]: scale of each int8 layer's input
    inv_scales: list[torch.Tensor]    # fp32 [1]: 1 / scale of each int8 output (layers 1..L-2)
    final_weight: torch.Tensor        # fp32 [N_{L-1}]
    final_bias: torch.Tensor          # fp32 [1]

    @property
    def in_width_padded(self) -> int:
        return int(self.w1.shape[1])

    @property
    def widths(self) -> list[int]:
        return [int(self.w1.shape[0])] + [int(w.shape[0]) for w in self.weights]

    def to(self, device: torch.device | str) -> "QuantTopMlp":
        def mv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device) for t in ts]
        return QuantTopMlp(self.in_width, self.w1.to(device), self.b1.to(device), mv(self.weights),
                           mv(self.w_scales), mv(self.biases), mv(self.x_scales), mv(self.inv_scales),
                           self.final_weight.to(device), self.final_bias.to(device))


def activation_amax(calibration: Any, n: int) -> list[float]:
    """The n calibrated amax values (inputs of top layers 2..n+1) from a Calibration (formats.artifact),
    a {layer name: amax} mapping ("top_l.2", ...), or a plain sequence."""
    amax = getattr(calibration, "amax", calibration)
    if isinstance(amax, Mapping):
        keys = [f"top_l.{2 * (i + 1)}" for i in range(n)]
        missing = [k for k in keys if k not in amax]
        if missing:
            raise QuantLinearError(f"calibration has no amax for {missing}")
        values = [float(amax[k]) for k in keys]
    else:
        values = [float(a) for a in amax]
    if len(values) != n or not all(math.isfinite(a) and a > 0 for a in values):
        raise QuantLinearError(f"need {n} finite positive activation amax values, got {values}")
    return values


def quantize_top_mlp(weights: Mapping[str, Any], calibration: Any) -> QuantTopMlp:
    """QuantTopMlp (on the CPU) from the fp32 `top_l.{2i}.{weight,bias}` arrays and the calibration."""
    def get(key: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(weights[key], dtype=np.float32))

    layers = sum(1 for k in weights if k.startswith("top_l.") and k.endswith(".weight"))
    if layers < 3 or get(f"top_l.{2 * (layers - 1)}.weight").shape[0] != 1:
        raise QuantLinearError(f"need a top MLP of >= 3 layers ending 1 wide, got {layers} layers")
    amax = activation_amax(calibration, layers - 2)
    w1 = get("top_l.0.weight")
    in_width = int(w1.shape[1])
    padded = (in_width + 15) // 16 * 16
    w1 = torch.nn.functional.pad(w1, (0, padded - in_width)).to(torch.float16)
    act_scales = [torch.tensor([a / 127.0], dtype=torch.float32) for a in amax]
    qs, ws, bs = [], [], []
    for i in range(1, layers - 1):
        q, s = quantize_weight(get(f"top_l.{2 * i}.weight"))
        qs.append(q)
        ws.append(s)
        bs.append(get(f"top_l.{2 * i}.bias"))
    last = layers - 1
    return QuantTopMlp(
        in_width=in_width, w1=w1.contiguous(), b1=get("top_l.0.bias"), weights=qs, w_scales=ws, biases=bs,
        x_scales=act_scales, inv_scales=[(1.0 / s).to(torch.float32) for s in act_scales],
        final_weight=get(f"top_l.{2 * last}.weight").reshape(-1).contiguous(),
        final_bias=get(f"top_l.{2 * last}.bias").reshape(1),
    )


def _scratch_layout(widths: Sequence[int], m: int) -> tuple[list[int], int]:
    """Start offsets of the int8 activations [m, w] in one buffer, and its size: each activation goes to
    the front when it fits before its input, else right after it (an input never overlaps its output)."""
    starts = [0]
    for prev, w in zip(widths, widths[1:]):
        start = 0 if w * m <= starts[-1] else starts[-1] + prev * m
        starts.append(start)
    return starts, max(s + w * m for s, w in zip(starts, widths))


def alloc_scratch(q: QuantTopMlp, max_rows: int, device: torch.device | str) -> torch.Tensor:
    """One int8 buffer for the activations of top_mlp_int8 (allocate once, reuse in graphs)."""
    return torch.empty(_scratch_layout(q.widths[:-1], max_rows)[1], dtype=torch.int8, device=device)


def top_mlp_int8(q: QuantTopMlp, top_in: torch.Tensor, pred: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None,
                 configs: Sequence[dict[str, Any] | None] | None = None) -> torch.Tensor:
    """Predictions fp32 [M] for fp16 top-MLP inputs [M, in_width_padded] (zero padding columns): one
    quant_linear launch per layer, all scales on the device (graph-capturable with preallocated
    `pred` and `scratch` from alloc_scratch). `configs`: one launch config per layer (None: default)."""
    m = top_in.shape[0]
    if top_in.dtype != torch.float16 or top_in.dim() != 2 or top_in.shape[1] != q.in_width_padded:
        raise QuantLinearError(f"top_in must be fp16 [M, {q.in_width_padded}], got {top_in.dtype} "
                               f"{list(top_in.shape)}")
    dev = top_in.device
    if pred is None:
        pred = torch.empty(m, dtype=torch.float32, device=dev)
    if scratch is None:
        scratch = alloc_scratch(q, m, dev)
    n_layers = len(q.weights) + 1
    cfgs = list(configs) if configs is not None else [None] * n_layers
    if len(cfgs) != n_layers:
        raise QuantLinearError(f"configs: one per layer ({n_layers}), got {len(cfgs)}")
    starts, total = _scratch_layout(q.widths[:-1], m)
    if total > scratch.numel() or scratch.dtype != torch.int8:
        raise QuantLinearError(f"scratch must be int8 with >= {total} elements for {m} rows, got "
                               f"{scratch.dtype} [{scratch.numel()}]")
    acts = [scratch[s : s + w * m].view(m, w) for s, w in zip(starts, q.widths[:-1])]
    quant_linear(top_in, q.w1, q.b1, None, None, acts[0], relu=True, out_inv_scale=q.inv_scales[0],
                 config=cfgs[0])
    for i in range(len(q.weights) - 1):
        quant_linear(acts[i], q.weights[i], q.biases[i], q.w_scales[i], q.x_scales[i], acts[i + 1], relu=True,
                     out_inv_scale=q.inv_scales[i + 1], config=cfgs[i + 1])
    act = acts[-1]
    quant_linear(act, q.weights[-1], q.biases[-1], q.w_scales[-1], q.x_scales[-1], pred, relu=True,
                 final_weight=q.final_weight, final_bias=q.final_bias, config=cfgs[-1])
    return pred


def top_mlp_int8_reference(q: QuantTopMlp, top_in: torch.Tensor) -> torch.Tensor:
    """The same chain through quant_linear_reference (CPU, exact accumulation): fp32 [M]."""
    act = quant_linear_reference(top_in, q.w1, q.b1, None, None, relu=True, out_inv_scale=q.inv_scales[0])
    for i in range(len(q.weights) - 1):
        act = quant_linear_reference(act, q.weights[i], q.biases[i], q.w_scales[i], q.x_scales[i], relu=True,
                                     out_inv_scale=q.inv_scales[i + 1])
    return quant_linear_reference(act, q.weights[-1], q.biases[-1], q.w_scales[-1], q.x_scales[-1], relu=True,
                                  final_weight=q.final_weight, final_bias=q.final_bias)
