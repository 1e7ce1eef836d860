"""Fused int8 embedding gather: all 26 lookups of every pair in one launch, hot/cold tiers, dequantized.

For pair b and table t the global row is g = table_offsets[t] + sparse[b, t]; the remap gives its row
p = row_position[g] in the frequency-ordered file (REFERENCE "Quantization and placement"). Rows p < n_hot live
in device memory (`hot`), the rest in pinned host memory (`cold`, read zero-copy over PCIe: REFERENCE measured a
Triton kernel reading a `pin_memory()` tensor directly). Each 128-byte int8 row is read once (eight 16-byte
loads), multiplied by its table's scale and stored as fp16/bf16 into out[b, t, :] (any strides, so the
caller may point `out` at slots 1..26 of a [B, 27, 128] interaction buffer).

Optionally the kernel counts lookups served from the hot tier (one atomic per program), so a backend can
report hot/cold figures without a second pass over the positions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(
    sparse_ptr, stride_sb, stride_st,  # int32 [B, T] per-table ids
    offsets_ptr,  # int64 [T] table offsets into the global row space
    row_position_ptr,  # int32 [total_rows]: global row -> row in the frequency-ordered file
    scales_ptr,  # float32 [T]
    hot_ptr,  # int8 [n_hot, D] (device)
    cold_ptr,  # int8 [total - n_hot, D] (pinned host, zero-copy)
    out_ptr, stride_ob, stride_ot,  # [B, T, D] fp16/bf16, last dim contiguous
    hot_count_ptr,  # int64 [1], incremented by the number of hot lookups (if COUNT)
    count_limit_ptr,  # int64 [1]: count only lookups below this flat index (if LIMIT)
    n_lookups, n_hot,
    T: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, COUNT: tl.constexpr, LIMIT: tl.constexpr,
    REMAPPED: tl.constexpr,
):
    pid = tl.program_id(0)
    lk = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # flattened lookup b*T + t
    valid = lk < n_lookups
    b = lk // T
    t = lk - b * T
    ids = tl.load(sparse_ptr + b * stride_sb + t * stride_st, mask=valid, other=0)
    if REMAPPED:  # already file positions (kernels/pair_rows.remap_ids)
        pos = ids.to(tl.int64)
    else:
        g = tl.load(offsets_ptr + t, mask=valid, other=0) + ids.to(tl.int64)
        pos = tl.load(row_position_ptr + g, mask=valid, other=0).to(tl.int64)
    scale = tl.load(scales_ptr + t, mask=valid, other=0.0)
    is_hot = pos < n_hot
    cols = tl.arange(0, D)
    # 2-D [BLOCK, D] tiles of int8: rows start at multiples of D=128 bytes, so the compiler can use
    # 16-byte vector loads. Exactly one of the two masked loads issues per row.
    hot_rows = hot_ptr + (pos * D)[:, None] + cols[None, :]
    cold_rows = cold_ptr + ((pos - n_hot) * D)[:, None] + cols[None, :]
    m_hot = (valid & is_hot)[:, None]
    m_cold = (valid & (pos >= n_hot))[:, None]
    q = tl.load(hot_rows, mask=m_hot, other=0) + tl.load(cold_rows, mask=m_cold, other=0)
    val = q.to(tl.float32) * scale[:, None]
    dst = out_ptr + (b * stride_ob + t * stride_ot)[:, None] + cols[None, :]
    tl.store(dst, val.to(out_ptr.dtype.element_ty), mask=valid[:, None])
    if COUNT:
        counted = valid & is_hot
        if LIMIT:
            # A CUDA graph replays a padded batch: the real size lives in device memory.
            counted = counted & (lk < tl.load(count_limit_ptr))
        n = tl.sum(counted.to(tl.int64), axis=0)
        tl.atomic_add(hot_count_ptr, n)


def embedding_gather(
    sparse: torch.Tensor,
    table_offsets: torch.Tensor,
    row_position: torch.Tensor | None,
    scales: torch.Tensor,
    hot: torch.Tensor,
    cold: torch.Tensor | None,
    out: torch.Tensor,
    hot_count: torch.Tensor | None = None,
    count_limit: torch.Tensor | None = None,
    block: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Gather and dequantize sparse [B, T] into out [B, T, D]; returns `out`.

    `hot` holds file rows [0, n_hot) with n_hot = hot.shape[0]; `cold` the rest (None when all rows are
    hot). `hot_count` (int64 [1]) is incremented by the number of lookups served from `hot`; with
    `count_limit` (int64 [1], device), only among the first count_limit[0] flat lookups (b * T + t).
    With row_position None, `sparse` already holds file positions (kernels.pair_rows.remap_ids).
    """
    B, T = sparse.shape
    D = hot.shape[1]
    if out.shape != (B, T, D) or out.stride(2) != 1:
        raise ValueError(f"out must be [{B}, {T}, {D}] with a contiguous last dim, got {tuple(out.shape)} "
                         f"strides {out.stride()}")
    remapped = row_position is None
    rp_dtype = None if row_position is None else row_position.dtype
    if sparse.dtype != torch.int32 or (rp_dtype is not None and rp_dtype != torch.int32):
        raise TypeError(f"sparse and row_position must be int32, got {sparse.dtype}, {rp_dtype}")
    if table_offsets.dtype != torch.int64 or table_offsets.numel() < T:
        raise TypeError("table_offsets must be int64 with at least one entry per table")
    if hot.dtype != torch.int8 or (cold is not None and (cold.dtype != torch.int8 or cold.shape[1] != D)):
        raise TypeError("hot and cold rows must be int8 [rows, D]")
    if not (hot.is_contiguous() and (cold is None or cold.is_contiguous())):
        raise ValueError("hot and cold rows must be contiguous")
    n = B * T
    if n == 0:
        return out
    count = hot_count is not None
    grid = (triton.cdiv(n, block),)
    _gather_kernel[grid](
        sparse, sparse.stride(0), sparse.stride(1),
        table_offsets, table_offsets if remapped else row_position, scales, hot, hot if cold is None else cold,
        out, out.stride(0), out.stride(1),
        hot_count if count else table_offsets,
        count_limit if count_limit is not None else table_offsets,
        n, hot.shape[0],
        T=T, D=D, BLOCK=block, COUNT=count, LIMIT=count_limit is not None, REMAPPED=remapped,
        num_warps=num_warps,
    )
    return out


def embedding_gather_reference(
    sparse: torch.Tensor,
    table_offsets: torch.Tensor,
    row_position: torch.Tensor | None,
    scales: torch.Tensor,
    hot: torch.Tensor,
    cold: torch.Tensor | None,
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, int]:
    """Plain PyTorch: ([B, T, D] dequantized rows in `dtype`, number of hot lookups); row_position None:
    `sparse` holds file positions already."""
    T = sparse.shape[1]
    if row_position is None:
        pos = sparse.long()
    else:
        g = table_offsets[:T].to(sparse.device).long()[None, :] + sparse.long()
        pos = row_position.to(sparse.device).long()[g]
    n_hot = hot.shape[0]
    rows = torch.cat([hot.cpu(), cold.cpu()]) if cold is not None else hot.cpu()
    q = rows[pos.cpu()].float()
    deq = q * scales.float().cpu()[None, :T, None]
    return deq.to(dtype).to(sparse.device), int((pos < n_hot).sum())
