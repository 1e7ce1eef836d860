"""One fp8 layer of the top MLP as a persistent Triton kernel with TMA loads and stores: the same arithmetic
as kernels/fp8_linear.py (GEMM, then scale, bias, ReLU and the e4m3 cast in the epilogue), another schedule.

Why (issue 13): cuBLASLt and the one-program-per-tile kernel run the first top-MLP layer (K = 512 ->
N = 1024, 262,144 rows) at 660-700 TFLOP/s against 960-1,000 for the 1024 x 1024 layer (BENCHMARKS.md,
round 4): with K = 512 a tile has only four 128-deep steps, so its start (the first loads) and its
epilogue (bias, ReLU, cast, store) are a large share of it, and in a kernel of one program per tile
nothing overlaps them. Here one program per SM walks the tiles, and the K loop and the tile loop are
flattened into one software-pipelined loop (`tl.range(..., flatten=True)`): the next tile's first loads are
in flight while this tile's epilogue runs. Loads and the store go through tensor descriptors (TMA), which
also zero-fill rows past M and columns past K, so the loop needs no masks.

The arithmetic and its reference are kernels/fp8_linear.py's (`fp8_linear_relu_reference`), and so is the
launcher's contract: `fp8_linear_relu(..., persistent=1)` runs this kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.fp8_linear import _round_to_e4m3_grid


@triton.jit
def _fp8_linear_relu_persistent_kernel(
    x_desc, w_desc, out_desc, scales_ptr, b_ptr, M, K,
    N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROGRAMS: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # Tiles in row-block order, the N tiles of one row block consecutive: the programs working at one time
    # cover a few neighbouring row blocks, so x's rows come from device memory once and then from L2;
    # W (at most 1 MB here) stays in L2.
    n_tiles: tl.constexpr = N // BLOCK_N
    tiles = tl.cdiv(M, BLOCK_M) * n_tiles
    k_steps = tl.cdiv(K, BLOCK_K)
    acc_scale = tl.load(scales_ptr)
    out_scale = tl.load(scales_ptr + 1)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        off_m = (tile // n_tiles) * BLOCK_M
        off_n = (tile % n_tiles) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(k_steps):
            x = x_desc.load([off_m, ks * BLOCK_K])  # [BLOCK_M, BLOCK_K]; rows past M and K read as zeros
            w = w_desc.load([off_n, ks * BLOCK_K])  # [BLOCK_N, BLOCK_K], K-major
            if INTERPRETED:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc)
        cols = off_n + tl.arange(0, BLOCK_N)
        y = tl.maximum(acc * acc_scale + tl.load(b_ptr + cols).to(tl.float32)[None, :], 0.0)
        y = tl.minimum(y * out_scale, 448.0)
        if INTERPRETED:
            y = _round_to_e4m3_grid(y)  # exact in e4m3 now: the cast below cannot round differently
        out_desc.store([off_m, off_n], y.to(out_desc.dtype))  # rows past M are not written


def programs_for(device: torch.device) -> int:
    """One program per SM on a GPU; a few under the interpreter (enough to exercise the tile walk)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def launch_persistent(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                      out: torch.Tensor, block_m: int, block_n: int, block_k: int, num_warps: int,
                      num_stages: int) -> None:
    """The launch behind `fp8_linear_relu(..., persistent=1)`, which has checked the operands; out gets M rows.
    TMA wants 16-byte aligned bases and row strides: the engine's buffers are (widths multiples of 16)."""
    m, k = x.shape
    n = weight.shape[0]
    for name, t in (("x", x), ("weight", weight), ("out", out)):
        if t.data_ptr() % 16 or t.stride(0) % 16:
            raise ValueError(f"{name} needs a 16-byte aligned base and row stride for TMA")
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, block_k])
    w_desc = TensorDescriptor(weight, [n, k], [k, 1], [block_n, block_k])
    out_desc = TensorDescriptor(out, [m, n], [out.stride(0), 1], [block_m, block_n])
    programs = programs_for(x.device)
    tiles = triton.cdiv(m, block_m) * (n // block_n)
    grid = (min(programs, tiles),)
    _fp8_linear_relu_persistent_kernel[grid](
        x_desc, w_desc, out_desc, scales, bias, m, k, N=n, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PROGRAMS=grid[0], INTERPRETED=x.device.type == "cpu", num_warps=num_warps, num_stages=num_stages)
