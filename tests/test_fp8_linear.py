"""kernels/fp8_linear.py (one fp8 top-MLP layer with its epilogue) against its PyTorch reference.

Without CUDA the kernel runs in Triton's interpreter at small shapes; the `gpu` tests run it compiled at the
DLRM top MLP's fp8 layer widths (512 -> 1024 -> 1024 -> 512) and at several launch shapes. Fresh random
data each run, the output poisoned with NaN first.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.fp8_linear import E4M3, E4M3_MAX, fp8_linear_relu, fp8_linear_relu_reference  # noqa: E402


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values at |v|: 2^(exponent - 3) for normal values, 2^-9 below 2^-6."""
    exp = torch.floor(torch.log2(v.abs().clamp(min=2.0 ** -6)))
    return torch.pow(2.0, exp - 3)


def _check(rows: int, k: int, n: int, device: str, max_flip_share: float, **launch: int) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    # activations and weights spread over e4m3's range, as calibrated ones are (amax maps to 448)
    x = (torch.rand(rows, k, generator=gen) * 300).to(E4M3).to(device)
    w = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(E4M3).to(device)
    scale = 1.0 / (448 * k ** 0.5 * 40)
    bias = (torch.randn(n, generator=gen) * 0.5).to(torch.bfloat16).to(device)
    # the output scale as calibration sets it: the largest ReLU output maps to 448 (a few saturate)
    y = torch.relu((x.float() @ w.float().t()) * scale + bias.float())
    inv = E4M3_MAX / float(y.quantile(0.999) if y.numel() < 2**24 else y.max())
    out = torch.full((rows + 1, n), float("nan"), device=device).to(E4M3)
    fp8_linear_relu(x, w, torch.tensor([scale, inv], device=device), bias, out, **launch)
    ref = fp8_linear_relu_reference(x, w, scale, inv, bias).float()
    got = out[:rows].float()
    assert not torch.isnan(got).any() and torch.isnan(out[rows].float()).all()  # every row, none past the end
    # Exact in the interpreter (exact fp32 sums of e4m3 products, the same rounding). On Hopper the fp8
    # matrix units accumulate in limited precision (about 14 bits, as DeepSeek-V3's report measured), so
    # the fp32 value before the cast carries an absolute error that scales with the sum of |products|,
    # not with the output: bench/fp8_linear_check.py measured on an H100 (262,144 rows) a max of 0.49
    # output units at K = 512 and 0.82 at K = 1024, where sum |x w| x scale x inv was about 1,220 and
    # 2,440 units: 2^-11.3 of it (cuBLASLt's layer on that data: 0.23% of outputs a step off, this
    # kernel 0.39%). The cast of that value then rounds like torch's (checked there: identical bits).
    # So a value may differ by that error
    # plus one e4m3 step (where it crosses a rounding boundary); the bound takes 2^-9 of sum |x w| (4x
    # the measured). A lost bias moves values by about 40 units here, a lost ReLU or scale by far more.
    acc_err = (x.float().abs() @ w.float().abs().t()) * (scale * inv) * 2.0 ** -9 if device != "cpu" else 0.0
    diff = (got - ref).abs()
    bound = e4m3_step(torch.maximum(got.abs(), ref.abs())) + acc_err
    assert bool((diff <= bound).all()), float((diff - bound).max())
    flips = float((diff > 0).float().mean())
    assert flips <= max_flip_share, flips
    spread = ref[ref > 0]
    assert 0.3 < float((ref > 0).float().mean()) < 0.8 and float(spread.std()) > 20  # data that can fail a test


# persistent=1: kernels/fp8_linear_persistent.py (one program per SM over the tiles, TMA loads and stores).
# Under the interpreter it runs 3 programs, so 37 rows in blocks of 16 x 2 N tiles = 6 tiles walk twice.
@pytest.mark.parametrize("persistent", [0, 1])
def test_interpreter_small_shapes(persistent: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(37, 64, 64, device, 0.0 if device == "cpu" else 0.02, block_m=16, block_n=32, block_k=32,
           num_warps=4, num_stages=1, persistent=persistent)


@pytest.mark.parametrize("persistent", [0, 1])
def test_interpreter_k_not_a_multiple_of_block_k(persistent: int) -> None:
    """K = 80 in steps of 32: the last step reads zeros past K (the top input is 480 wide unpadded)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(21, 80, 32, device, 0.0 if device == "cpu" else 0.02, block_m=16, block_n=32, block_k=32,
           num_warps=4, num_stages=1, persistent=persistent)


def test_persistent_rejects_a_stride_tma_cannot_take() -> None:
    """TMA needs 16-byte row strides: a view 16 columns wide of a 40-wide buffer is refused, not misread."""
    x = torch.zeros(4, 40).to(E4M3)[:, :16]  # row stride 40 bytes
    w = torch.zeros(32, 16).to(E4M3)
    with pytest.raises(ValueError, match="TMA"):
        fp8_linear_relu(x, w, torch.ones(2), torch.zeros(32, dtype=torch.bfloat16), torch.zeros(4, 32).to(E4M3),
                        block_m=16, block_n=32, block_k=16, persistent=1)


def test_interpreter_subnormal_outputs_round_as_torch() -> None:
    """Small outputs land in e4m3's subnormal range (below 2^-6), which the interpreter path rounds on its
    own grid: every value equal to torch's cast."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter path")
    x = torch.eye(32).mul(64).to(E4M3)  # x @ w^T picks rows of w
    w = (torch.rand(32, 32) * 0.03).to(E4M3)  # 0 .. 0.03: subnormal and small normal values
    out = torch.empty(32, 32).to(E4M3)
    fp8_linear_relu(x, w.t().contiguous(), torch.tensor([1.0 / 64, 0.9]), torch.zeros(32, dtype=torch.bfloat16),
                    out, block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
    ref = fp8_linear_relu_reference(x, w.t().contiguous(), 1.0 / 64, 0.9, torch.zeros(32, dtype=torch.bfloat16))
    assert bool((out.float() == ref.float()).all())
    assert int((ref.float() < 2.0 ** -6).sum()) > 50  # the subnormal range was exercised


def test_rejects_bad_operands() -> None:
    x = torch.zeros(4, 64).to(E4M3)
    w = torch.zeros(32, 64).to(E4M3)
    s = torch.ones(2)
    b = torch.zeros(32, dtype=torch.bfloat16)
    out = torch.zeros(4, 32).to(E4M3)
    with pytest.raises(TypeError):
        fp8_linear_relu(x.float(), w, s, b, out)
    with pytest.raises(TypeError):  # one scale only
        fp8_linear_relu(x, w, s[:1], b, out, block_n=32, block_k=64)
    with pytest.raises(ValueError):
        fp8_linear_relu(x, w[:, :32], s, b, out)
    with pytest.raises(ValueError):  # N not a multiple of block_n
        fp8_linear_relu(x, w, s, b, out, block_n=64, block_k=64)
    with pytest.raises(ValueError):  # K not a multiple of 16
        fp8_linear_relu(x[:, :56], w[:, :56], s, b, out, block_n=32, block_k=64)


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [0, 1])
@pytest.mark.parametrize("k,n", [(512, 1024), (1024, 1024), (1024, 512)])
def test_gpu_dlrm_widths(k: int, n: int, persistent: int) -> None:
    _check(262144 + 40, k, n, "cuda", 0.02, persistent=persistent)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [dict(block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=4),
                                    dict(block_m=64, block_n=256, block_k=128, num_warps=4, num_stages=3),
                                    dict(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=4),
                                    dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4,
                                         persistent=1),
                                    dict(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3,
                                         persistent=1)])
def test_gpu_launch_shapes(launch: dict[str, int]) -> None:
    _check(4096 + 48, 512, 1024, "cuda", 0.02, **launch)
