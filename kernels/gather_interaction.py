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


COUNT_SLOTS = 64  # hot counts are spread over this many words: one address took ~0.1 ms of atomics


def new_counts(device: torch.device | str) -> torch.Tensor:
    """The `counts` buffer: int64 [2 + COUNT_SLOTS] = [count limit, bad ids, hot-count slots...]."""
    return torch.zeros(2 + COUNT_SLOTS, dtype=torch.int64, device=device)


def read_counts(counts: torch.Tensor) -> tuple[int, int]:
    """(hot lookups, bad ids) from a `counts` buffer (synchronizes if it is on the device)."""
    c = counts.cpu()
    return int(c[2:].sum()), int(c[1])


@triton.jit
def _add_counts(counts_ptr, pid, hot, bad, SLOTS: tl.constexpr):
    # Nearly every batch has no bad ids: skip that atomic; spread the hot counts over SLOTS words so
    # tens of thousands of programs do not serialize on one address.
    if bad > 0:
        tl.atomic_add(counts_ptr + 1, bad)
    tl.atomic_add(counts_ptr + 2 + pid % SLOTS, hot)


@triton.jit
def _pair_tile_layout(offsets_ptr, scales_ptr, T: tl.constexpr, D: tl.constexpr, NP: tl.constexpr):
    """A pair's tile: rows r (0 = bottom output, 1..T = lookups), columns c; each lookup row's table t,
    its table's first file row and row count, its scale; where Z[i, j] (j < i) goes in the output row."""
    r = tl.arange(0, NP)
    c = tl.arange(0, D)
    is_emb = (r >= 1) & (r <= T)
    t = tl.where(is_emb, r - 1, 0)
    offs = tl.load(offsets_ptr + t, mask=is_emb, other=0)
    rows = tl.load(offsets_ptr + t + 1, mask=is_emb, other=1) - offs
    scale = tl.load(scales_ptr + t, mask=is_emb, other=0.0)
    ri = r[:, None]
    rj = r[None, :]
    tri_col = D + (ri * (ri - 1)) // 2 + rj
    tri_mask = (rj < ri) & (ri <= T)
    return r, c, is_emb, t, offs, rows, scale, rj, tri_col, tri_mask


@triton.jit
def _gather_interaction_pair_kernel(
    bottom_ptr, stride_bb, sparse_ptr, stride_sb,
    offsets_ptr, row_position_ptr, scales_ptr, hot_ptr, cold_ptr,
    out_ptr, stride_ob, counts_ptr, out_scale_ptr,
    B, n_hot,
    T: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, PAIRS: tl.constexpr,
    COUNT: tl.constexpr, UPCAST: tl.constexpr, SLOTS: tl.constexpr, REMAPPED: tl.constexpr,
    SCALED: tl.constexpr, OUT_MAX: tl.constexpr,
):
    # One pair per loop step on plain 2-D tiles: measured faster than the [PB, NP, D] kernel below at
    # PB = 1 (whose reshapes cost layout conversions); same arguments and semantics.
    pid = tl.program_id(0)
    r, c, is_emb, t, offs, rows, scale, rj, tri_col, tri_mask = _pair_tile_layout(offsets_ptr, scales_ptr, T, D, NP)
    hot_total = tl.zeros((NP,), dtype=tl.int64)
    bad_total = tl.zeros((NP,), dtype=tl.int64)
    if COUNT:
        limit = tl.load(counts_ptr)
    if SCALED:
        inv_scale = tl.load(out_scale_ptr)
    for k in range(PAIRS):
        b = pid.to(tl.int64) * PAIRS + k
        if b < B:
            ids = tl.load(sparse_ptr + b * stride_sb + t, mask=is_emb, other=0).to(tl.int64)
            if REMAPPED:  # already file positions, checked when they were remapped (kernels/pair_rows.py)
                ok = is_emb
                pos = ids
            else:
                ok = is_emb & (ids >= 0) & (ids < rows)
                bad_total += (is_emb & ~ok).to(tl.int64)
                pos = tl.load(row_position_ptr + offs + ids, mask=ok, other=0).to(tl.int64)
            hot = ok & (pos < n_hot)
            cold = ok & (pos >= n_hot)
            q = tl.load(hot_ptr + (pos * D)[:, None] + c[None, :], mask=hot[:, None], other=0) + tl.load(
                cold_ptr + ((pos - n_hot) * D)[:, None] + c[None, :], mask=cold[:, None], other=0)
            x_b = tl.load(bottom_ptr + b * stride_bb + c)
            x_e = (q.to(tl.float32) * scale[:, None]).to(x_b.dtype)
            x = tl.where((r == 0)[:, None], x_b[None, :], x_e)
            if UPCAST:
                x = x.to(tl.float32)
            z = tl.dot(x, tl.trans(x))
            out_row = out_ptr + b * stride_ob
            if SCALED:  # a narrow output type (fp8): scaled into its range, saturated, then rounded
                xb_s = tl.minimum(tl.maximum(x_b.to(tl.float32) * inv_scale, -OUT_MAX), OUT_MAX)
                z_s = tl.minimum(tl.maximum(z.to(tl.float32) * inv_scale, -OUT_MAX), OUT_MAX)
                tl.store(out_row + c, xb_s.to(out_ptr.dtype.element_ty))
                tl.store(out_row + tri_col, z_s.to(out_ptr.dtype.element_ty), mask=tri_mask)
            else:
                tl.store(out_row + c, x_b)
                tl.store(out_row + tri_col, z.to(out_ptr.dtype.element_ty), mask=tri_mask)
            if COUNT:
                hot_total += (hot & (b * T < limit)).to(tl.int64)
    if COUNT:
        _add_counts(counts_ptr, pid, tl.sum(hot_total, axis=0), tl.sum(bad_total, axis=0), SLOTS)


@triton.jit
def _gather_interaction_kernel(
    bottom_ptr, stride_bb,  # [B, D] fp16/bf16
    sparse_ptr, stride_sb,  # int32 [B, T]
    offsets_ptr, row_position_ptr, scales_ptr, hot_ptr, cold_ptr,
    out_ptr, stride_ob,  # [B, >= D + (T+1)T/2]
    counts_ptr,  # int64 [3]: [count limit (flat lookups), hot lookups (+=), bad ids (+=)]
    B, n_hot,
    T: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, PAIRS: tl.constexpr, PB: tl.constexpr,
    COUNT: tl.constexpr, UPCAST: tl.constexpr, SLOTS: tl.constexpr, REMAPPED: tl.constexpr,
):
    # PAIRS loop iterations per program, each over a [PB, NP, D] tile of PB > 1 pairs (more loads in
    # flight per program, one batched dot). Measured slower than the pair kernel above on an H200.
    pid = tl.program_id(0)
    p = tl.arange(0, PB)
    r = tl.arange(0, NP)
    c = tl.arange(0, D)
    is_emb = (r >= 1) & (r <= T)
    t = tl.where(is_emb, r - 1, 0)
    offs = tl.load(offsets_ptr + t, mask=is_emb, other=0)
    rows = tl.load(offsets_ptr + t + 1, mask=is_emb, other=1) - offs
    scale = tl.load(scales_ptr + t, mask=is_emb, other=0.0)
    ri = r[:, None]
    rj = r[None, :]
    tri_col = D + (ri * (ri - 1)) // 2 + rj
    tri_mask = (rj < ri) & (ri <= T)
    hot_total = tl.zeros((PB, NP), dtype=tl.int64)
    bad_total = tl.zeros((PB, NP), dtype=tl.int64)
    if COUNT:
        limit = tl.load(counts_ptr)
    for k in range(PAIRS):
        b = (pid.to(tl.int64) * PAIRS + k) * PB + p  # [PB]
        live = b < B
        m = live[:, None] & is_emb[None, :]  # [PB, NP]
        ids = tl.load(sparse_ptr + b[:, None] * stride_sb + t[None, :], mask=m, other=0).to(tl.int64)
        if REMAPPED:
            ok = m
            pos = ids
        else:
            # Ids outside their table read nothing and are counted: the caller raises, the device never faults.
            ok = m & (ids >= 0) & (ids < rows[None, :])
            bad_total += (m & ~ok).to(tl.int64)
            pos = tl.load(row_position_ptr + offs[None, :] + ids, mask=ok, other=0).to(tl.int64)
        hot = ok & (pos < n_hot)
        cold = ok & (pos >= n_hot)
        c3 = c[None, None, :]
        q = tl.load(hot_ptr + (pos * D)[:, :, None] + c3, mask=hot[:, :, None], other=0) + tl.load(
            cold_ptr + ((pos - n_hot) * D)[:, :, None] + c3, mask=cold[:, :, None], other=0)
        x_b = tl.load(bottom_ptr + b[:, None] * stride_bb + c[None, :], mask=live[:, None], other=0.0)  # [PB, D]
        # Round each dequantized value to the half type first, as the unfused path stores it.
        x_e = (q.to(tl.float32) * scale[None, :, None]).to(x_b.dtype)
        x = tl.where((r == 0)[None, :, None], x_b[:, None, :], x_e)
        if UPCAST:
            x = x.to(tl.float32)
        z = tl.dot(x, tl.trans(x, (0, 2, 1)))
        out_rows = out_ptr + b * stride_ob  # [PB]
        tl.store(out_rows[:, None] + c[None, :], x_b, mask=live[:, None])
        tl.store(out_rows[:, None, None] + tri_col[None, :, :], z.to(out_ptr.dtype.element_ty),
                 mask=live[:, None, None] & tri_mask[None, :, :])
        if COUNT:
            hot_total += (hot & (b * T < limit)[:, None]).to(tl.int64)
    if COUNT:
        _add_counts(counts_ptr, pid, tl.sum(tl.sum(hot_total, axis=1), axis=0),
                    tl.sum(tl.sum(bad_total, axis=1), axis=0), SLOTS)



@triton.jit
def _load_pair_rows(sparse_ptr, stride_sb, row_position_ptr, offs, rows, hot_ptr, cold_ptr, b, end, n_hot,
                    is_emb, t, c, D: tl.constexpr, REMAPPED: tl.constexpr, HAS_COLD: tl.constexpr):
    """Pair b's 26 int8 rows as an [NP, D] tile (rows 1..T; other rows 0; none unless b < end), its hot
    mask and bad-id mask."""
    m = is_emb & (t * 0 + b < end)  # a block-shaped test: Triton's interpreter rejects block & scalar masks
    ids = tl.load(sparse_ptr + b * stride_sb + t, mask=m, other=0).to(tl.int64)
    if REMAPPED:  # already file positions, checked when they were remapped (kernels/pair_rows.py)
        ok = m
        pos = ids
    else:
        ok = m & (ids >= 0) & (ids < rows)
        pos = tl.load(row_position_ptr + offs + ids, mask=ok, other=0).to(tl.int64)
    hot = ok & (pos < n_hot)
    q = tl.load(hot_ptr + (pos * D)[:, None] + c[None, :], mask=hot[:, None], other=0)
    if HAS_COLD:
        cold = ok & (pos >= n_hot)
        q += tl.load(cold_ptr + ((pos - n_hot) * D)[:, None] + c[None, :], mask=cold[:, None], other=0)
    return q, hot, m & ~ok


@triton.jit
def _gather_interaction_int8_kernel(
    bottom_ptr, stride_bb, sparse_ptr, stride_sb,
    offsets_ptr, row_position_ptr, scales_ptr, hot_ptr, cold_ptr,
    out_ptr, stride_ob, counts_ptr, out_scale_ptr,
    B, n_hot,
    T: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, PAIRS: tl.constexpr,
    COUNT: tl.constexpr, SLOTS: tl.constexpr, REMAPPED: tl.constexpr, HAS_COLD: tl.constexpr,
    SCALED: tl.constexpr, OUT_MAX: tl.constexpr, PREFETCH: tl.constexpr,
):
    # The Gram tile in exact integer arithmetic on the int8 matrix units: the 26 rows stay int8 (no
    # dequantization pass over 3,328 values a pair), the bottom-MLP output enters as three int8 rows
    # (x = s_hi hi + s_lo lo + s_lo2 lo2 with s_lo = s_hi / 254, s_lo2 = s_lo / 254: 23 bits relative to
    # the row's largest value, so values four decades smaller still keep fp16's precision), and
    # Z[i, j] = s_i s_j (Q Q^T)[i, j] in fp32, the bottom column the sum of its three parts. Row 0 is
    # hi, rows NP-1 and NP-2 lo and lo2, rows 1..T the lookups, the rest zero.
    pid = tl.program_id(0)
    LO: tl.constexpr = NP - 1
    r, c, is_emb, t, offs, rows, scale, rj, tri_col, tri_mask = _pair_tile_layout(offsets_ptr, scales_ptr, T, D, NP)
    hot_total = tl.zeros((NP,), dtype=tl.int64)
    bad_total = tl.zeros((NP,), dtype=tl.int64)
    if COUNT:
        limit = tl.load(counts_ptr)
    if SCALED:
        inv_scale = tl.load(out_scale_ptr)
    b0 = pid.to(tl.int64) * PAIRS
    end = tl.minimum(b0 + PAIRS, B)  # this program's pairs are [b0, end)
    if PREFETCH:  # the next pair's rows are loaded while this pair's tile is multiplied and stored
        q_next, hot_next, bad_next = _load_pair_rows(sparse_ptr, stride_sb, row_position_ptr, offs, rows, hot_ptr,
                                                     cold_ptr, b0, end, n_hot, is_emb, t, c, D, REMAPPED, HAS_COLD)
    for k in range(PAIRS):
        b = b0 + k
        if PREFETCH:
            q, hot, bad = q_next, hot_next, bad_next
            q_next, hot_next, bad_next = _load_pair_rows(sparse_ptr, stride_sb, row_position_ptr, offs, rows,
                                                         hot_ptr, cold_ptr, b + 1, end, n_hot, is_emb, t, c, D,
                                                         REMAPPED, HAS_COLD)
        else:
            q, hot, bad = _load_pair_rows(sparse_ptr, stride_sb, row_position_ptr, offs, rows, hot_ptr, cold_ptr,
                                          b, end, n_hot, is_emb, t, c, D, REMAPPED, HAS_COLD)
        live_c = c * 0 + b < end
        x_b = tl.load(bottom_ptr + b * stride_bb + c, mask=live_c, other=0.0)
        xf = x_b.to(tl.float32)
        s_hi = tl.maximum(tl.max(tl.abs(xf), axis=0), 1e-30) / 127.0
        hi = tl.floor(xf / s_hi + 0.5)
        s_lo = s_hi / 254.0
        res = xf - hi * s_hi
        lo = tl.minimum(tl.maximum(tl.floor(res / s_lo + 0.5), -127.0), 127.0)
        s_lo2 = s_lo / 254.0
        lo2 = tl.minimum(tl.maximum(tl.floor((res - lo * s_lo) / s_lo2 + 0.5), -127.0), 127.0)
        q = tl.where((r == 0)[:, None], hi.to(tl.int8)[None, :],
                     tl.where((r == LO)[:, None], lo.to(tl.int8)[None, :],
                              tl.where((r == LO - 1)[:, None], lo2.to(tl.int8)[None, :], q)))
        z = tl.dot(q, tl.trans(q), out_dtype=tl.int32)
        sv = tl.where(r == 0, s_hi, tl.where(r == LO, s_lo, tl.where(r == LO - 1, s_lo2, scale)))
        zs = z.to(tl.float32) * sv[:, None] * sv[None, :]
        # row i . (lo + lo2), added to the bottom column
        with_lo = tl.sum(tl.where(rj >= LO - 1, zs, 0.0), axis=1)
        zs = tl.where(rj == 0, zs + with_lo[:, None], zs)
        out_row = out_ptr + b * stride_ob
        if SCALED:  # a narrow output type (fp8): scaled into its range, saturated, then rounded
            xb_s = tl.minimum(tl.maximum(xf * inv_scale, -OUT_MAX), OUT_MAX)
            z_s = tl.minimum(tl.maximum(zs * inv_scale, -OUT_MAX), OUT_MAX)
            tl.store(out_row + c, xb_s.to(out_ptr.dtype.element_ty), mask=live_c)
            tl.store(out_row + tri_col, z_s.to(out_ptr.dtype.element_ty), mask=tri_mask & (tri_col * 0 + b < end))
        else:
            tl.store(out_row + c, x_b, mask=live_c)
            tl.store(out_row + tri_col, zs.to(out_ptr.dtype.element_ty), mask=tri_mask & (tri_col * 0 + b < end))
        bad_total += bad.to(tl.int64)
        if COUNT:
            hot_total += (hot & (b * T < limit)).to(tl.int64)
    if COUNT:
        _add_counts(counts_ptr, pid, tl.sum(hot_total, axis=0), tl.sum(bad_total, axis=0), SLOTS)


E4M3_MAX = 448.0  # largest finite float8 e4m3 (fn) value


def gather_interaction(
    bottom: torch.Tensor,
    sparse: torch.Tensor,
    table_offsets: torch.Tensor,
    row_position: torch.Tensor | None,
    scales: torch.Tensor,
    hot: torch.Tensor,
    cold: torch.Tensor | None,
    out: torch.Tensor,
    counts: torch.Tensor | None = None,
    pairs_per_program: int | None = None,
    pairs_per_tile: int = 1,
    num_warps: int = 1,
    out_scale: torch.Tensor | None = None,
    gram: str = "int8",
    prefetch: bool = False,
) -> torch.Tensor:
    """out[:, :D + T(T+1)/2] = interaction(bottom, dequantized rows of sparse); returns out.

    Tables as kernels.embedding_gather (table_offsets int64 [T+1], hot rows [0, n_hot) on the device, cold
    rows in pinned host memory or None); bottom [B, D] and out [B, >= width] share fp16 or bf16.
    `counts` (new_counts(); on the device): counts[0] limits hot counting to the first counts[0] flat
    lookups (b * T + t; a replayed graph pads its batch), counts[1] += ids outside their table (those
    read nothing; the caller must treat the batch as failed), counts[2:] += hot lookups (read_counts).
    With row_position None, `sparse` already holds file positions (kernels.pair_rows.remap_ids, which
    checked them): the kernel skips the remap load and the table bounds check (counts[1] stays as is).
    Defaults: the fastest variant measured (docs/GPU_NOTES.md): the int8 Gram kernel with one pair per
    program and one warp (0.526 ms for 262,144 pairs on an H100, against 0.704 ms with two pairs per
    program: bench/stage_probe.py, 2026-12-07); the "half" kernel with two pairs per program.
    `out_scale` (fp32 [1] on the device, 1 / the output's scale) writes `out` in float8 e4m3 (the fp8 top
    MLP's input): every value is multiplied by it and saturated at +-448 before rounding.
    `gram`: "int8" takes the Gram tile on the int8 matrix units in exact integer arithmetic (rows never
    dequantized; the bottom row as two int8 rows), "half" dequantizes the rows to the half type first
    (the unfused path's rounding); `prefetch` loads the next pair's rows before this pair's product.
    """
    B, T = sparse.shape
    D = hot.shape[1]
    width = D + (T + 1) * T // 2
    if bottom.shape != (B, D) or out.shape[0] != B or out.shape[1] < width:
        raise ValueError(f"shapes: bottom {tuple(bottom.shape)}, sparse {tuple(sparse.shape)}, out "
                         f"{tuple(out.shape)}; expected [B,{D}], [B,T], [B,>={width}]")
    if bottom.stride(1) != 1 or out.stride(1) != 1 or sparse.stride(1) != 1:
        raise ValueError("bottom, sparse and out need a contiguous last dim")
    remapped = row_position is None
    if sparse.dtype != torch.int32 or (row_position is not None and row_position.dtype != torch.int32) \
            or table_offsets.dtype != torch.int64:
        raise TypeError("sparse and row_position must be int32, table_offsets int64")
    if table_offsets.numel() < T + 1:
        raise ValueError(f"table_offsets needs {T + 1} entries (exclusive prefix sum and total)")
    scaled = out_scale is not None
    if out_scale is not None:
        if out.dtype != torch.float8_e4m3fn or bottom.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"with out_scale, out must be float8_e4m3fn and bottom fp16 or bf16, got {out.dtype}, "
                            f"{bottom.dtype}")
        if out_scale.dtype != torch.float32 or out_scale.numel() != 1 or pairs_per_tile != 1:
            raise TypeError("out_scale must be fp32 [1]; the scaled output has the one-pair kernel only")
    elif bottom.dtype != out.dtype or out.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"bottom/out must share fp16 or bf16, got {bottom.dtype}, {out.dtype}")
    if hot.dtype != torch.int8 or not hot.is_contiguous() or (cold is not None and not cold.is_contiguous()):
        raise TypeError("hot and cold rows must be contiguous int8 [rows, D]")
    if counts is not None and (counts.dtype != torch.int64 or counts.numel() != 2 + COUNT_SLOTS):
        raise TypeError(f"counts must be int64 [{2 + COUNT_SLOTS}] (new_counts())")
    if pairs_per_program is None:
        pairs_per_program = 1 if gram == "int8" else 2
    if B == 0:
        return out
    np_ = max(16, triton.next_power_of_2(T + 1))
    grid = (triton.cdiv(B, pairs_per_program * pairs_per_tile),)
    args = (bottom, bottom.stride(0), sparse, sparse.stride(0),
            table_offsets, table_offsets if remapped else row_position, scales, hot, hot if cold is None else cold,
            out, out.stride(0), counts if counts is not None else table_offsets, B, hot.shape[0])
    # Triton's CPU interpreter multiplies bf16 as raw integers: see kernels/dot_interaction.py.
    upcast = out.device.type == "cpu" and out.dtype == torch.bfloat16
    if gram not in ("int8", "half"):
        raise ValueError(f"gram must be 'int8' or 'half', got {gram!r}")
    if gram == "int8":
        if pairs_per_tile != 1:
            raise ValueError("the int8 Gram kernel takes one pair per tile")
        _gather_interaction_int8_kernel[grid](*args[:-2], out_scale if scaled else scales, *args[-2:], T=T, D=D,
                                              NP=max(32, triton.next_power_of_2(T + 3)), PAIRS=pairs_per_program,
                                              COUNT=counts is not None, SLOTS=COUNT_SLOTS, REMAPPED=remapped,
                                              HAS_COLD=cold is not None, SCALED=scaled, OUT_MAX=E4M3_MAX,
                                              PREFETCH=prefetch, num_warps=num_warps)
    elif pairs_per_tile == 1:
        _gather_interaction_pair_kernel[grid](*args[:-2], out_scale if scaled else scales, *args[-2:], T=T, D=D,
                                              NP=np_, PAIRS=pairs_per_program, COUNT=counts is not None,
                                              UPCAST=upcast, SLOTS=COUNT_SLOTS, REMAPPED=remapped, SCALED=scaled,
                                              OUT_MAX=E4M3_MAX, num_warps=num_warps)
    else:
        _gather_interaction_kernel[grid](*args, T=T, D=D, NP=np_, PAIRS=pairs_per_program, PB=pairs_per_tile,
                                         COUNT=counts is not None, UPCAST=upcast, SLOTS=COUNT_SLOTS,
                                         REMAPPED=remapped, num_warps=num_warps)
    return out


def gather_interaction_reference(
    bottom: torch.Tensor,
    sparse: torch.Tensor,
    table_offsets: torch.Tensor,
    row_position: torch.Tensor | None,
    scales: torch.Tensor,
    hot: torch.Tensor,
    cold: torch.Tensor | None,
    gram: str = "int8",
) -> tuple[torch.Tensor, int]:
    """Plain PyTorch: (float32 [B, width], hot lookups). For the "int8" Gram kernel the exact result (rows
    dequantized and multiplied in float64; the kernel's integer products are exact), for "half" the
    separate references' arithmetic (rows rounded to the half type, fp32 products)."""
    if gram == "half":
        emb, n_hot = embedding_gather_reference(sparse, table_offsets, row_position, scales, hot, cold, bottom.dtype)
        return dot_interaction_reference(bottom.cpu(), emb.cpu()).to(bottom.device), n_hot
    emb, n_hot = embedding_gather_reference(sparse, table_offsets, row_position, scales.double(), hot, cold,
                                            torch.float64)
    x = torch.cat([bottom.double().cpu().unsqueeze(1), emb.cpu()], dim=1)
    z = torch.bmm(x, x.transpose(1, 2))
    li, lj = torch.tril_indices(x.shape[1], x.shape[1], offset=-1)
    return torch.cat([bottom.double().cpu(), z[:, li, lj]], dim=1).float().to(bottom.device), n_hot
