"""REFERENCE quantization: scale = maxabs/127.5 (float32), q = clip(rint(w/scale), -127, 127)."""
from __future__ import annotations

import numpy as np
import torch

from engines import quant


def test_known_values_scale_one() -> None:
    # maxabs 127.5 -> scale exactly 1.0; rint rounds half to even; +-127.5 clip to +-127.
    w = torch.tensor([[127.5, -127.5, 2.5, 3.5, -0.5, 0.49, 126.6, -1.5]])
    scale = quant.table_scale(w)
    assert scale == 1.0
    q = quant.quantize_table(w, scale)
    assert q.dtype == torch.int8
    assert q.tolist() == [[127, -127, 2, 4, 0, 0, 127, -2]]


def test_known_values_fractional_scale() -> None:
    w = torch.tensor([[2.55, 0.01, -0.03, 1.0], [0.0, -2.55, 0.05, 0.5]])
    scale = quant.table_scale(w)
    assert scale == float(np.float32(2.55) / np.float32(127.5))  # float32 division, not float64
    q = quant.quantize_table(w, scale)
    # 2.55/0.02=127.5 -> 128 -> clip 127; 0.01/0.02 = 0.5 (f32: 0.49999997) -> 0; -0.03/0.02 -> -1.5 -> -2
    assert q.tolist() == [[127, 0, -2, 50], [0, -127, 2, 25]]


def test_matches_float32_numpy_rule_on_random_tables() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3000, 128)).astype(np.float32) * 0.03
    scale = quant.table_scale(torch.from_numpy(w))
    ref_scale = np.float32(np.abs(w).max()) / np.float32(127.5)
    assert np.float32(scale) == ref_scale
    ref = np.clip(np.rint(w / ref_scale), -127, 127).astype(np.int8)  # w/ref_scale stays float32
    np.testing.assert_array_equal(quant.quantize_table(torch.from_numpy(w), scale).numpy(), ref)


def test_chunked_equals_whole(monkeypatch) -> None:
    w = torch.randn(1000, 16)
    whole = quant.quantize_table(w, quant.table_scale(w))
    monkeypatch.setattr(quant, "CHUNK_ROWS", 7)
    assert quant.table_scale(w) == float(w.abs().max() / torch.tensor(127.5))
    assert torch.equal(quant.quantize_table(w, quant.table_scale(w)), whole)


def test_zero_table_and_dequantize() -> None:
    w = torch.zeros(4, 8)
    assert quant.table_scale(w) == 0.0
    assert not quant.quantize_table(w, 0.0).any()
    q = np.array([[-127, 0, 5]], dtype=np.int8)
    assert quant.dequantize(q, 0.5).tolist() == [[-63.5, 0.0, 2.5]]
