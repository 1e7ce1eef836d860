"""The DLRM bottom MLP (16 -> 512 -> 256 -> 128, ReLU after each layer) in one Triton kernel.

Three cuBLAS GEMMs with the bias+ReLU epilogue took 0.30 ms for 262,144 pairs on an H200: each layer's
output (fp16, 512 then 256 wide) goes to device memory and comes back, ~0.7 GB a batch for 90 GFLOP of
work. Here a program takes BLOCK_M rows through all three layers on the matrix units: the first layer's
output is made CHUNK columns at a time and multiplied straight into the second layer's fp32 accumulator,
the second layer's output stays on chip for the third, and only the 128-wide result is written. The
weights (336 KB in fp16) are read from L2 by every program.

Arithmetic: fp16 (or bf16) operands, fp32 accumulation, bias added in fp32, ReLU, rounded to the half type
between layers, as the cuBLAS chain (`bottom_mlp_reference`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bottom_mlp_kernel(
    x_ptr, stride_x, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, stride_o, M,
    K0: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = rows < M
    k0 = tl.arange(0, K0)
    n1 = tl.arange(0, N1)
    n2 = tl.arange(0, N2)
    ch = tl.arange(0, CHUNK)
    x = tl.load(x_ptr + rows[:, None] * stride_x + k0[None, :], mask=live[:, None], other=0.0)
    half = x.dtype
    if UPCAST:  # Triton's CPU interpreter multiplies bf16 as raw integers (kernels/dot_interaction.py)
        x = x.to(tl.float32)
    acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
    for c0 in range(0, N0, CHUNK):
        # W0 is [N0, K0] row-major: its transposed chunk [K0, CHUNK]; W1 is [N1, N0]: [CHUNK, N1]
        w0t = tl.load(w0_ptr + (c0 + ch)[None, :] * K0 + k0[:, None])
        if UPCAST:
            w0t = w0t.to(tl.float32)
        h0 = tl.dot(x, w0t) + tl.load(b0_ptr + c0 + ch).to(tl.float32)[None, :]
        h0 = tl.maximum(h0, 0.0).to(half)
        w1t = tl.load(w1_ptr + n1[None, :] * N0 + (c0 + ch)[:, None])
        if UPCAST:
            h0, w1t = h0.to(tl.float32), w1t.to(tl.float32)
        acc1 = tl.dot(h0, w1t, acc1)
    h1 = tl.maximum(acc1 + tl.load(b1_ptr + n1).to(tl.float32)[None, :], 0.0).to(half)
    w2t = tl.load(w2_ptr + n2[None, :] * N1 + n1[:, None])  # [N1, N2]
    if UPCAST:
        h1, w2t = h1.to(tl.float32), w2t.to(tl.float32)
    acc2 = tl.dot(h1, w2t)
    y = tl.maximum(acc2 + tl.load(b2_ptr + n2).to(tl.float32)[None, :], 0.0)
    tl.store(out_ptr + rows[:, None] * stride_o + n2[None, :], y.to(out_ptr.dtype.element_ty), mask=live[:, None])


def fits(layers: list[tuple[torch.Tensor, torch.Tensor]], chunk: int = 64) -> bool:
    """Whether `bottom_mlp` takes these layers (three; K0 a multiple of 16, N0 of chunk, K0/N1/N2 powers of two)."""
    if len(layers) != 3:
        return False
    k0, n0, n1, n2 = layers[0][0].shape[1], layers[0][0].shape[0], layers[1][0].shape[0], layers[2][0].shape[0]
    return (k0 % 16 == 0 and n0 % chunk == 0 and layers[1][0].shape[1] == n0 and layers[2][0].shape[1] == n1
            and all(v == triton.next_power_of_2(v) for v in (k0, n1, n2)))


def bottom_mlp(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor,
               block_m: int = 64, chunk: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """out = relu(L2(relu(L1(relu(L0(x)))))) for the three (weight [N, K], bias [N]) layers; returns out.

    x [M, K0] and out [M, N2] in fp16 or bf16 with a contiguous last dim; weights and biases contiguous in
    the same dtype; K0 a multiple of 16, N0 a multiple of `chunk`, every width a power of two."""
    if len(layers) != 3:
        raise ValueError(f"the fused bottom MLP has three layers, got {len(layers)}")
    (w0, b0), (w1, b1), (w2, b2) = layers
    m, k0 = x.shape
    n0, n1, n2 = w0.shape[0], w1.shape[0], w2.shape[0]
    if w0.shape[1] != k0 or w1.shape[1] != n0 or w2.shape[1] != n1 or out.shape != (m, n2):
        raise ValueError(f"shapes: x {tuple(x.shape)}, weights {[tuple(w.shape) for w, _ in layers]}, "
                         f"out {tuple(out.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16) or any(t.dtype != x.dtype for t in (w0, b0, w1, b1, w2, b2, out)):
        raise TypeError("x, weights, biases and out must share fp16 or bf16")
    if x.stride(1) != 1 or out.stride(1) != 1 or not all(t.is_contiguous() for t in (w0, b0, w1, b1, w2, b2)):
        raise ValueError("x and out need a contiguous last dim, weights and biases contiguous")
    pow2 = all(v == triton.next_power_of_2(v) for v in (k0, n1, n2, chunk, block_m))
    if k0 % 16 or n0 % chunk or not pow2:
        raise ValueError(f"K0 ({k0}) a multiple of 16, N0 ({n0}) of chunk ({chunk}); K0, N1, N2, chunk and "
                         "block_m powers of two")
    if m == 0:
        return out
    _bottom_mlp_kernel[(triton.cdiv(m, block_m),)](
        x, x.stride(0), w0, b0, w1, b1, w2, b2, out, out.stride(0), m, K0=k0, N0=n0, N1=n1, N2=n2,
        BLOCK_M=block_m, CHUNK=chunk, UPCAST=x.device.type == "cpu" and x.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages)
    return out


def bottom_mlp_reference(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Plain PyTorch: fp32 products of the half-type values, rounded to the half type after each layer."""
    y = x
    for w, b in layers:
        y = torch.relu(y.float() @ w.float().t() + b.float()).to(x.dtype)
    return y
