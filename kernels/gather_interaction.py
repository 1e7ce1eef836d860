"""Fused int8 gather + dot interaction: the 26 rows of a pair go from the tables straight into its Gram tile.

The separate kernels (kernels/embedding_gather.py then kernels/dot_interaction.py) write the dequantized
rows as fp16 [B, 26, 128] and read them back: 13 KB a pair through device memory against the 3.3 KB of
int8 rows themselves (docs/GPU_NOTES.md). Here each program builds the 32x128 tile of a pair in
registers (row 0 = bottom-MLP output, rows 1..26 = dequantized lookups, hot from device memory, cold
from pinned host memory zero-copy), takes Z = X X^T on the matrix units and writes
[bottom (128), strict lower triangle of Z (351)] into the top-MLP input buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dot_interaction import dot_interaction_reference
from kernels.embedding_gather import embedding_gather_reference


@triton.jit
def _gather_interaction_kernel(
    bottom_ptr, stride_bb,  # [B, D] fp16/bf16
    sparse_ptr, stride_sb,  # int32 [B, T]
    offsets_ptr, row_position_ptr, scales_ptr, hot_ptr, cold_ptr,
    out_ptr, stride_ob,  # [B, >= D + (T+1)T/2]
    hot_count_ptr, count_limit_ptr,
    B, n_hot,
    T: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, PAIRS: tl.constexpr,
    COUNT: tl.constexpr, LIMIT: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, NP)
    c = tl.arange(0, D)
    is_emb = (r >= 1) & (r <= T)
    t = tl.where(is_emb, r - 1, 0)
    offs = tl.load(offsets_ptr + t, mask=is_emb, other=0)
    scale = tl.load(scales_ptr + t, mask=is_emb, other=0.0)
    ri = r[:, None]
    rj = r[None, :]
    tri_col = D + (ri * (ri - 1)) // 2 + rj
    tri_mask = (rj < ri) & (ri <= T)
    hot_total = tl.zeros((NP,), dtype=tl.int64)
    if LIMIT:
        limit = tl.load(count_limit_ptr)
    for k in range(PAIRS):
        b = pid.to(tl.int64) * PAIRS + k
        if b < B:
            ids = tl.load(sparse_ptr + b * stride_sb + t, mask=is_emb, other=0)
            pos = tl.load(row_position_ptr + offs + ids.to(tl.int64), mask=is_emb, other=0).to(tl.int64)
            hot = is_emb & (pos < n_hot)
            cold = is_emb & (pos >= n_hot)
            q = tl.load(hot_ptr + (pos * D)[:, None] + c[None, :], mask=hot[:, None], other=0) + tl.load(
                cold_ptr + ((pos - n_hot) * D)[:, None] + c[None, :], mask=cold[:, None], other=0)
            x_b = tl.load(bottom_ptr + b * stride_bb + c)
            # Round each dequantized value to the half type first, as the unfused path stores it.
            x_e = (q.to(tl.float32) * scale[:, None]).to(x_b.dtype)
            x = tl.where((r == 0)[:, None], x_b[None, :], x_e)
            if UPCAST:
                x = x.to(tl.float32)
            z = tl.dot(x, tl.trans(x))
            out_row = out_ptr + b * stride_ob
            tl.store(out_row + c, x_b)
            tl.store(out_row + tri_col, z.to(out_ptr.dtype.element_ty), mask=tri_mask)
            if COUNT:
                if LIMIT:
                    hot = hot & (b * T < limit)
                hot_total += hot.to(tl.int64)
    if COUNT:
        tl.atomic_add(hot_count_ptr, tl.sum(hot_total, axis=0))


def gather_interaction(
    bottom: torch.Tensor,
    sparse: torch.Tensor,
    table_offsets: torch.Tensor,
    row_position: torch.Tensor,
    scales: torch.Tensor,
    hot: torch.Tensor,
    cold: torch.Tensor | None,
    out: torch.Tensor,
    hot_count: torch.Tensor | None = None,
    count_limit: torch.Tensor | None = None,
    pairs_per_program: int = 4,
    num_warps: int = 4,
) -> torch.Tensor:
    """out[:, :D + T(T+1)/2] = interaction(bottom, dequantized rows of sparse); returns out.

    Arguments as kernels.embedding_gather (hot/cold tiers, hot_count, count_limit in flat lookups b*T+t)
    and kernels.dot_interaction (bottom [B, D], out [B, >= width], fp16 or bf16).
    """
    B, T = sparse.shape
    D = hot.shape[1]
    width = D + (T + 1) * T // 2
    if bottom.shape != (B, D) or out.shape[0] != B or out.shape[1] < width:
        raise ValueError(f"shapes: bottom {tuple(bottom.shape)}, sparse {tuple(sparse.shape)}, out "
                         f"{tuple(out.shape)}; expected [B,{D}], [B,T], [B,>={width}]")
    if bottom.stride(1) != 1 or out.stride(1) != 1 or sparse.stride(1) != 1:
        raise ValueError("bottom, sparse and out need a contiguous last dim")
    if sparse.dtype != torch.int32 or row_position.dtype != torch.int32 or table_offsets.dtype != torch.int64:
        raise TypeError("sparse and row_position must be int32, table_offsets int64")
    if bottom.dtype != out.dtype or out.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"bottom/out must share fp16 or bf16, got {bottom.dtype}, {out.dtype}")
    if hot.dtype != torch.int8 or not hot.is_contiguous() or (cold is not None and not cold.is_contiguous()):
        raise TypeError("hot and cold rows must be contiguous int8 [rows, D]")
    if B == 0:
        return out
    count = hot_count is not None
    np_ = max(16, triton.next_power_of_2(T + 1))
    grid = (triton.cdiv(B, pairs_per_program),)
    _gather_interaction_kernel[grid](
        bottom, bottom.stride(0), sparse, sparse.stride(0),
        table_offsets, row_position, scales, hot, hot if cold is None else cold,
        out, out.stride(0),
        hot_count if count else table_offsets, count_limit if count_limit is not None else table_offsets,
        B, hot.shape[0],
        T=T, D=D, NP=np_, PAIRS=pairs_per_program, COUNT=count, LIMIT=count_limit is not None,
        UPCAST=(out.device.type == "cpu" and out.dtype == torch.bfloat16),  # see kernels/dot_interaction.py
        num_warps=num_warps,
    )
    return out


def gather_interaction_reference(
    bottom: torch.Tensor,
    sparse: torch.Tensor,
    table_offsets: torch.Tensor,
    row_position: torch.Tensor,
    scales: torch.Tensor,
    hot: torch.Tensor,
    cold: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """Plain PyTorch: (float32 [B, width], hot lookups), from the two separate references."""
    emb, n_hot = embedding_gather_reference(sparse, table_offsets, row_position, scales, hot, cold, bottom.dtype)
    return dot_interaction_reference(bottom.cpu(), emb.cpu()).to(bottom.device), n_hot
