"""The last two layers of the fp8 top MLP (512 -> 256 -> 1 in DLRM v1) in one Triton kernel.

Why (issue 13, stage probe of 2026-12-07 on an H100, 262,144 pairs): in the cuBLASLt chain the 512 -> 256
layer took 0.149 ms and the 1-wide last layer 0.102 ms, both bound by memory: the first writes its
[M, 256] bf16 output (134 MB) and the second reads it back, to make 1 MB of predictions. Here a program
takes BLOCK_M rows through the GEMM on the fp8 matrix units (the whole 256-wide output in one tile), then
applies the epilogue on chip: scale, bias, ReLU, rounding to bf16 (as the chain's bf16 output), the dot
with the last layer's weights, its bias and the sigmoid. Only the predictions are written.

Arithmetic (`fp8_mlp_tail_reference`, the last two steps of engines.fp8_top_mlp.fp8_top_mlp_reference):
    y    = bf16(relu((x @ W^T) * scale + b))       x e4m3 [M, K], W e4m3 [N, K], fp32 accumulation
    pred = sigmoid(y @ w_last + b_last)             fp32
Under Triton's CPU interpreter the e4m3 operands are widened to fp32 first (exact: every e4m3 value is
an fp32 value), so only the accumulation order differs from the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3 = torch.float8_e4m3fn


@triton.jit
def _fp8_mlp_tail_kernel(
    x_ptr, stride_x, w_ptr, scale_ptr, b_ptr, wl_ptr, bl, out_ptr, M, K,
    N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < M
    n = tl.arange(0, N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + kk)[None, :], mask=live[:, None], other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + (k0 + kk)[None, :])  # [N, BLOCK_K], K-major as wgmma wants
        if WIDEN:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
    y = acc * tl.load(scale_ptr) + tl.load(b_ptr + n).to(tl.float32)[None, :]
    # bf16 rounding (to nearest even) in integer arithmetic: Triton's CPU interpreter truncates a cast to
    # bf16, and the bits are the same either way (y >= 0 and finite here)
    bits = tl.maximum(y, 0.0).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    y = bits.to(tl.float32, bitcast=True)
    z = tl.sum(y * tl.load(wl_ptr + n)[None, :], axis=1) + bl
    tl.store(out_ptr + rows, tl.sigmoid(z), mask=live)


def fp8_mlp_tail(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 last_weight: torch.Tensor, last_bias: float, out: torch.Tensor, block_m: int = 128,
                 block_k: int = 128, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """out[:M] = sigmoid(bf16(relu((x @ weight^T) * scale + bias)) @ last_weight + last_bias); returns out.

    x e4m3 [M, K] (last dim contiguous), weight e4m3 [N, K] contiguous, scale fp32 [1] on the device (the
    product of x's and weight's scales: a tensor, so a captured graph sees a new value), bias bf16 [N],
    last_weight fp32 [N], out fp32 [>= M]. N a power of two, K a multiple of block_k."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape != (n, k) or bias.shape != (n,) or last_weight.shape != (n,) or out.dim() != 1 \
            or out.shape[0] < m:
        raise ValueError(f"shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                         f"last_weight {tuple(last_weight.shape)}, out {tuple(out.shape)}")
    if x.dtype != E4M3 or weight.dtype != E4M3 or bias.dtype != torch.bfloat16 \
            or last_weight.dtype != torch.float32 or out.dtype != torch.float32 \
            or scale.dtype != torch.float32 or scale.numel() != 1:
        raise TypeError("x and weight e4m3, bias bf16, last_weight, out and scale ([1]) fp32")
    if x.stride(1) != 1 or not weight.is_contiguous() or not last_weight.is_contiguous():
        raise ValueError("x needs a contiguous last dim, weight and last_weight contiguous")
    if n != triton.next_power_of_2(n) or k % block_k:
        raise ValueError(f"N ({n}) must be a power of two and K ({k}) a multiple of block_k ({block_k})")
    if m == 0:
        return out
    _fp8_mlp_tail_kernel[(triton.cdiv(m, block_m),)](
        x, x.stride(0), weight, scale, bias, last_weight, float(last_bias), out, m, k, N=n, BLOCK_M=block_m,
        BLOCK_K=block_k, WIDEN=x.device.type == "cpu", num_warps=num_warps, num_stages=num_stages)
    return out


def fp8_mlp_tail_reference(x: torch.Tensor, weight: torch.Tensor, scale: float, bias: torch.Tensor,
                           last_weight: torch.Tensor, last_bias: float) -> torch.Tensor:
    """Plain PyTorch, fp32 [M]: the same arithmetic with fp32 products of the e4m3 values."""
    y = torch.relu((x.float() @ weight.float().t()) * scale + bias.float()).to(torch.bfloat16).float()
    return torch.sigmoid(y @ last_weight.float() + last_bias)
