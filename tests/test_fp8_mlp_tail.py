"""kernels/fp8_mlp_tail.py (the fp8 top MLP's last two layers in one kernel) against its PyTorch reference.

Without CUDA the kernel runs in Triton's interpreter at small shapes; the `gpu` tests run it compiled at the
DLRM widths (512 -> 256 -> 1) and inside the engine's fp8 chain. Fresh random data each run, the output
poisoned with NaN first.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.fp8_mlp_tail import E4M3, fp8_mlp_tail, fp8_mlp_tail_reference  # noqa: E402


def _check(rows: int, k: int, n: int, device: str, **launch: int) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    # activations and weights spread over e4m3's range, as calibrated ones are (amax maps to 448)
    x = (torch.rand(rows, k, generator=gen) * 300).to(E4M3).to(device)
    w = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(E4M3).to(device)
    scale = 1.0 / (448 * k ** 0.5 * 40)
    bias = (torch.randn(n, generator=gen) * 0.5).to(torch.bfloat16).to(device)
    w_last = torch.randn(n, generator=gen).to(device) / n ** 0.5
    b_last = 0.25
    out = torch.full((rows + 1,), float("nan"), device=device)
    fp8_mlp_tail(x, w, torch.tensor([scale], device=device), bias, w_last, b_last, out[:rows], **launch)
    ref = fp8_mlp_tail_reference(x, w, scale, bias, w_last, b_last)
    assert not torch.isnan(out[:rows]).any() and torch.isnan(out[rows])  # every row written, none past the end
    # The reference sums exact fp32 products; Hopper's fp8 matrix units accumulate the products of each MMA
    # step in limited precision before adding them to the fp32 accumulator (about 14 bits, as DeepSeek-V3's
    # report measured), so a hidden value differs in its last bits and, where it lies near a bf16 rounding
    # boundary, rounds one bf16 step (2^-8 relative) the other way: a flip. A flip moves a prediction by at
    # most sigmoid' (1/4) x max|w_last| x one step of the largest hidden value (`one_flip`). Measured: max
    # 1.26e-3 over 262,144 rows on an H200 (one_flip ~8e-4); a first bound of mean < 1e-5 (exact
    # accumulation assumed) failed on an H100 at every size. A lost bias, ReLU or scale moves predictions by
    # tenths: far beyond these bounds.
    hidden_max = float(torch.relu((x.float() @ w.float().t()) * scale + bias.float()).max())
    one_flip = 0.25 * float(w_last.abs().max()) * hidden_max * 2.0 ** -8
    diff = (out[:rows] - ref).abs()
    assert float(diff.max()) <= 8 * one_flip, (float(diff.max()), one_flip)
    assert float(diff.mean()) <= one_flip, (float(diff.mean()), one_flip)
    assert 0.02 < ref.std().item()  # the data makes predictions that differ (a test that can fail)


def test_interpreter_small_shapes() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(37, 64, 32, device, block_m=16, block_k=32, num_warps=4, num_stages=1)


def test_rejects_bad_operands() -> None:
    x = torch.zeros(4, 64).to(E4M3)
    w = torch.zeros(32, 64).to(E4M3)
    s = torch.ones(1)
    b = torch.zeros(32, dtype=torch.bfloat16)
    wl = torch.zeros(32)
    with pytest.raises(TypeError):
        fp8_mlp_tail(x.float(), w, s, b, wl, 0.0, torch.empty(4))
    with pytest.raises(ValueError):
        fp8_mlp_tail(x, w[:, :32], s, b, wl, 0.0, torch.empty(4))
    with pytest.raises(ValueError):  # N not a power of two
        fp8_mlp_tail(x, w[:24], s, b[:24], wl[:24], 0.0, torch.empty(4))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [16, 4096 + 48, 262144])
def test_gpu_dlrm_widths(rows: int) -> None:
    _check(rows, 512, 256, "cuda")
