"""kernels/bottom_mlp.py (the fused three-layer bottom MLP) against its PyTorch reference.

Without CUDA the kernel runs in Triton's interpreter at small shapes; the `gpu` test runs it compiled at
the full DLRM widths and a full batch. Fresh random data each run, outputs poisoned with NaN first.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.bottom_mlp import bottom_mlp, bottom_mlp_reference  # noqa: E402

DIMS = [16, 512, 256, 128]  # dense input padded to 16, then the REFERENCE bottom MLP 512-256-128


def _layers(gen: torch.Generator, dtype: torch.dtype, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [((torch.randn(DIMS[i + 1], DIMS[i], generator=gen) / DIMS[i] ** 0.5).to(dtype).to(device),
             (torch.randn(DIMS[i + 1], generator=gen) * 0.1).to(dtype).to(device)) for i in range(3)]


def _check(rows: int, dtype: torch.dtype, device: str, block_m: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    layers = _layers(gen, dtype, device)
    x = torch.randn(rows, DIMS[0], generator=gen).to(dtype).to(device)
    out = torch.full((rows + 1, DIMS[-1]), float("nan"), dtype=dtype, device=device)
    bottom_mlp(x, layers, out[:rows], block_m=block_m, chunk=chunk)
    ref = bottom_mlp_reference(x, layers).float()
    got = out[:rows].float()
    assert not torch.isnan(got).any() and torch.isnan(out[rows]).all()  # every row written, none past the end
    err = float(((got - ref).norm() / ref.norm()).item())
    # Both round each layer to the half type; the fused kernel sums in another order: a few half-type steps
    # on the odd value (fp16 2^-11, bf16 2^-8), far less in the norm.
    assert err < (2e-2 if dtype == torch.bfloat16 else 2e-3), err
    assert bool((got >= 0).all())  # ReLU after the last layer too


@pytest.mark.parametrize("dtype,rows,block_m,chunk", [(torch.float16, 37, 16, 64), (torch.bfloat16, 16, 16, 128)])
def test_bottom_mlp_matches_reference_cpu(dtype: torch.dtype, rows: int, block_m: int, chunk: int) -> None:
    _check(rows, dtype, "cpu", block_m, chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4097, 262_144])
def test_bottom_mlp_full_shapes_gpu(rows: int) -> None:
    _check(rows, torch.float16, "cuda", 64, 64)


def test_bottom_mlp_rejects_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    layers = _layers(gen, torch.float16, "cpu")
    x = torch.randn(4, 16).half()
    with pytest.raises(ValueError, match="three layers"):
        bottom_mlp(x, layers[:2], torch.empty(4, 128).half())
    with pytest.raises(ValueError, match="shapes"):
        bottom_mlp(x, layers, torch.empty(4, 64).half())
    with pytest.raises(TypeError, match="share fp16 or bf16"):
        bottom_mlp(x.float(), layers, torch.empty(4, 128))
