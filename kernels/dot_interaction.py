"""DLRM "dot" interaction without self-interaction, written straight into the top-MLP input buffer.

Per pair the 27 vectors (bottom-MLP output, then the 26 embeddings) form X [27, 128]; Z = X X^T and the
strict lower triangle in row-major order (i > j; facebookresearch dlrm `interact_features` with
li, lj = tril_indices(offset=-1)) follows the bottom output: out[b] = [x0 (128), Z[1,0], Z[2,0], Z[2,1], ...]
(width 128 + 351 = 479). Z[i, j] lands in column 128 + i(i-1)/2 + j, so the triangle is written with a
masked scatter store from the 32x32 tile (27 rows padded to 32 for the matrix units), no gather.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _interaction_kernel(
    bottom_ptr, stride_bb,  # [B, D]
    emb_ptr, stride_eb, stride_et,  # [B, T, D]
    out_ptr, stride_ob,  # [B, >= D + (T+1)T/2]
    B,
    T: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, PAIRS: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, NP)  # vector index 0..NP-1 (0 = bottom, 1..T = tables, rest padding)
    c = tl.arange(0, D)
    ri = r[:, None]
    rj = r[None, :]
    tri_col = D + (ri * (ri - 1)) // 2 + rj
    tri_mask = (rj < ri) & (ri <= T)
    for k in range(PAIRS):
        b = pid.to(tl.int64) * PAIRS + k
        if b < B:
            e_rows = emb_ptr + b * stride_eb + ((r - 1) * stride_et)[:, None] + c[None, :]
            x_e = tl.load(e_rows, mask=((r >= 1) & (r <= T))[:, None], other=0.0)
            x_b = tl.load(bottom_ptr + b * stride_bb + c)
            x = tl.where((r == 0)[:, None], x_b[None, :], x_e)
            if UPCAST:
                x = x.to(tl.float32)
            z = tl.dot(x, tl.trans(x))  # fp32 accumulate
            out_row = out_ptr + b * stride_ob
            tl.store(out_row + c, x_b)
            tl.store(out_row + tri_col, z.to(out_ptr.dtype.element_ty), mask=tri_mask)


def dot_interaction(
    bottom: torch.Tensor, emb: torch.Tensor, out: torch.Tensor, pairs_per_program: int = 4, num_warps: int = 4
) -> torch.Tensor:
    """bottom [B, D], emb [B, T, D] (any strides, last dim contiguous) -> out[:, :D + T(T+1)/2]; returns out."""
    B, T, D = emb.shape
    width = D + (T + 1) * T // 2
    if bottom.shape != (B, D) or out.shape[0] != B or out.shape[1] < width:
        raise ValueError(f"shapes: bottom {tuple(bottom.shape)}, emb {tuple(emb.shape)}, out {tuple(out.shape)}; "
                         f"expected [B,{D}], [B,T,{D}], [B,>={width}]")
    if bottom.stride(1) != 1 or emb.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("bottom, emb and out need a contiguous last dim")
    if not (bottom.dtype == emb.dtype == out.dtype) or out.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"bottom/emb/out must share fp16 or bf16, got {bottom.dtype}, {emb.dtype}, {out.dtype}")
    if B == 0:
        return out
    np_ = max(16, triton.next_power_of_2(T + 1))
    grid = (triton.cdiv(B, pairs_per_program),)
    _interaction_kernel[grid](
        bottom, bottom.stride(0), emb, emb.stride(0), emb.stride(1), out, out.stride(0), B,
        T=T, D=D, NP=np_, PAIRS=pairs_per_program, num_warps=num_warps,
        # Triton's CPU interpreter multiplies bf16 as raw 16-bit integers; fp32 there is exact for bf16
        # values. Compiled kernels keep the half-precision dot (fp32 accumulate).
        UPCAST=(out.device.type == "cpu" and out.dtype == torch.bfloat16),
    )
    return out


def dot_interaction_reference(bottom: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in float32: [B, D + T(T+1)/2] (facebookresearch dlrm interact_features, "dot")."""
    x = torch.cat([bottom.float().unsqueeze(1), emb.float()], dim=1)
    z = torch.bmm(x, x.transpose(1, 2))
    n = x.shape[1]
    li, lj = torch.tril_indices(n, n, offset=-1, device=x.device)
    return torch.cat([bottom.float(), z[:, li, lj]], dim=1)
