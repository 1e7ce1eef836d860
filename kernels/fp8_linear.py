"""One fp8 layer of the top MLP in Triton: e4m3 GEMM, then scale, bias, ReLU and the cast to e4m3 for the
next layer, all in the GEMM's epilogue.

Why (issue 13, stage probe of 2026-12-07 on an H200, 262,144 pairs): cuBLASLt (through nvmath-python)
runs the top MLP's first layer (K = 512 -> N = 1024) at 660 TFLOP/s against 956 for the 1024 x 1024
layer: with K = 512 a tile has only four 128-deep steps, so each tile's start and epilogue weigh more.
This kernel is the candidate beside it; `bench/stage_probe.py` times both per layer at several launch
shapes, and `engines/fp8_top_mlp.py` uses it for the layers where it measured faster. It also lets the
fp8 top MLP run where nvmath-python is not installed.

Arithmetic (`fp8_linear_relu_reference`; the same step as one layer of
engines.fp8_top_mlp.fp8_top_mlp_reference):
    y   = relu((x @ W^T) * scales[0] + b)        x e4m3 [M, K], W e4m3 [N, K], fp32 accumulation
    out = e4m3(min(y * scales[1], 448))           the next layer's input (scales[1] = 1 / its scale)
Under Triton's CPU interpreter the e4m3 operands are widened to fp32 first (exact), and the cast to e4m3
is done by rounding the fp32 bits to e4m3's 3 mantissa bits (to nearest even) in integer arithmetic, so
that the interpreter and the GPU round alike.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@triton.jit
def _round_to_e4m3_grid(y):
    # y >= 0, finite, <= 448: round the fp32 value to the nearest e4m3 value (ties to even) in integer
    # arithmetic. Normal e4m3 keeps 3 mantissa bits (drop 20 of fp32's 23); below 2^-6 e4m3 is subnormal
    # with a fixed step of 2^-9, so those values round on that grid instead.
    bits = y.to(tl.uint32, bitcast=True)
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    step = 0.001953125  # 2^-9
    q = y / step  # exact (a power of two)
    fl = tl.floor(q)
    frac = q - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    sub = (fl + tl.where(up, 1.0, 0.0)) * step
    return tl.where(y < 0.015625, sub, normal.to(tl.float32, bitcast=True))


@triton.jit
def _fp8_linear_relu_kernel(
    x_ptr, stride_x, w_ptr, scales_ptr, b_ptr, out_ptr, stride_o, M, K,
    N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # The N tiles of one row block are neighbouring programs, so its x rows are read from device memory
    # once and then from L2; W (at most 1 MB here) stays in L2.
    pid = tl.program_id(0)
    n_tiles: tl.constexpr = N // BLOCK_N
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + kk)[None, :], mask=live[:, None], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * K + (k0 + kk)[None, :])  # [BLOCK_N, BLOCK_K], K-major
        else:  # the last K step reads zeros past K
            in_k = (k0 + kk) < K
            x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + kk)[None, :], mask=live[:, None] & in_k[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cols[:, None] * K + (k0 + kk)[None, :], mask=in_k[None, :], other=0.0)
        if INTERPRETED:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
    y = tl.maximum(acc * tl.load(scales_ptr) + tl.load(b_ptr + cols).to(tl.float32)[None, :], 0.0)
    y = tl.minimum(y * tl.load(scales_ptr + 1), 448.0)
    if INTERPRETED:
        y = _round_to_e4m3_grid(y)  # exact in e4m3 now: the cast below cannot round differently
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=live[:, None])


def fp8_linear_relu(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                    out: torch.Tensor, block_m: int = 128, block_n: int = 256, block_k: int = 128,
                    num_warps: int = 8, num_stages: int = 3, persistent: int = 0) -> torch.Tensor:
    """out[:M] = e4m3(min(relu((x @ weight^T) * scales[0] + bias) * scales[1], 448)); returns out[:M].

    persistent=1 runs the same arithmetic as one program per SM walking the tiles with TMA loads and stores
    (kernels/fp8_linear_persistent.py: the next tile's loads overlap this tile's epilogue).

    x e4m3 [M, K] (last dim contiguous), weight e4m3 [N, K] contiguous, scales fp32 [2] on the device
    (x's scale times weight's; 1 / the output's scale: a tensor, so a captured graph sees new values),
    bias bf16 [N], out e4m3 [>= M, N] (last dim contiguous). N a multiple of block_n, K of 16."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape != (n, k) or bias.shape != (n,) or out.dim() != 2 or out.shape[1] != n or out.shape[0] < m:
        raise ValueError(f"shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                         f"out {tuple(out.shape)}")
    if x.dtype != E4M3 or weight.dtype != E4M3 or out.dtype != E4M3 or bias.dtype != torch.bfloat16 \
            or scales.dtype != torch.float32 or scales.numel() != 2:
        raise TypeError("x, weight and out e4m3, bias bf16, scales fp32 [2]")
    if x.stride(1) != 1 or out.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x and out need a contiguous last dim, weight contiguous")
    if n % block_n or k % 16:
        raise ValueError(f"N ({n}) must be a multiple of block_n ({block_n}) and K ({k}) of 16")
    if m == 0:
        return out[:0]
    if persistent:
        from kernels.fp8_linear_persistent import launch_persistent
        launch_persistent(x, weight, scales, bias, out[:m], block_m, block_n, block_k, num_warps, num_stages)
        return out[:m]
    grid = (triton.cdiv(m, block_m) * (n // block_n),)
    _fp8_linear_relu_kernel[grid](
        x, x.stride(0), weight, scales, bias, out, out.stride(0), m, k, N=n, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, INTERPRETED=x.device.type == "cpu", num_warps=num_warps,
        num_stages=num_stages)
    return out[:m]


def fp8_linear_relu_reference(x: torch.Tensor, weight: torch.Tensor, scale: float, out_scale_inv: float,
                              bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, e4m3 [M, N]: the same arithmetic with exact fp32 products of the e4m3 values."""
    y = torch.relu((x.float() @ weight.float().t()) * scale + bias.float())
    return (y * out_scale_inv).clamp(max=E4M3_MAX).to(E4M3)
