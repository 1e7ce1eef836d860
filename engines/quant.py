"""REFERENCE int8 embedding quantization (as NVIDIA's submission): one scale per table.

scale = maxabs / 127.5 and q = clip(rint(w / scale), -127, 127), all in float32 as NVIDIA computes it
(a float64 division would round a few values differently). Tables are processed in row chunks so a
memory-mapped 20 GB table never needs a full-size temporary.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

CHUNK_ROWS = 1 << 16


def table_scale(weight: Tensor, after_chunk: Callable[[Tensor], None] | None = None) -> float:
    """maxabs / 127.5 in float32 (0.0 for an all-zero table).

    `after_chunk` sees each row chunk once it is read (the converter drops its mapped pages there).
    """
    maxabs = torch.zeros((), dtype=torch.float32)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        chunk = weight[start : start + CHUNK_ROWS]
        maxabs = torch.maximum(maxabs, chunk.float().abs().max())
        if after_chunk is not None:
            after_chunk(chunk)
    return float(maxabs / torch.tensor(127.5, dtype=torch.float32))


def quantize_table(weight: Tensor, scale: float) -> Tensor:
    """int8 rows: clip(rint(w / scale), -127, 127); an all-zero table (scale 0) quantizes to zeros."""
    out = torch.empty(weight.shape, dtype=torch.int8)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        out[start : start + CHUNK_ROWS] = quantize_chunk(weight[start : start + CHUNK_ROWS], scale)
    return out


def quantize_chunk(weight: Tensor, scale: float) -> Tensor:
    """One block of rows; torch.round rounds half to even, like rint."""
    if scale == 0.0:
        return torch.zeros(weight.shape, dtype=torch.int8)
    s = torch.tensor(scale, dtype=torch.float32)
    return torch.round(weight.float() / s).clamp_(-127, 127).to(torch.int8)


def dequantize(q: np.ndarray | Tensor, scale: float | np.ndarray | Tensor) -> Tensor:
    """q.float() * scale, the dequantization every engine uses."""
    qt = torch.as_tensor(q)
    return qt.float() * torch.as_tensor(scale, dtype=torch.float32)
