"""Per-pair input rows on the device: ids -> file positions once, and a batch's rows gathered in one launch.

Why (docs/GPU_NOTES.md, v6): in the pipelined engine a by-reference batch first gathers its pairs' rows
from the device dataset. `torch.index_select` took 0.16 ms of a 3.1 ms batch of 262,144 pairs for the
26 ids a pair (per-element indexing of 104-byte rows), and the fused gather spent a dependent random
load per lookup on the remap table (global row -> row in the frequency-ordered file). So:
  * `remap_ids` turns per-table ids into file positions (row_position[table_offsets[t] + id]), checks
    every id against its table and counts the bad ones (a bad id becomes position 0, a valid row). A
    by-reference dataset is remapped once, at registration; a by-value batch right after its copy.
  * `gather_pair_rows` copies, for each pair of a batch, its row of two device tables (dense and
    positions) into the forward's input buffers: one launch, each row read as whole 4-byte words.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# Sizes are not specialized (Triton would compile a variant for n == 1 and for n % 16 == 0): these
# kernels run outside the captured graphs with every batch size, and a compile inside a Server run
# costs hundreds of ms (a freshly started GPU demo saw p99 678 ms from it).
@triton.jit(do_not_specialize=["B"])
def _remap_kernel(ids_ptr, stride_i, offsets_ptr, row_position_ptr, out_ptr, stride_o, bad_ptr, B,
                  T: tl.constexpr, TP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    t = tl.arange(0, TP)
    live = (b < B)[:, None] & (t < T)[None, :]
    ids = tl.load(ids_ptr + b[:, None] * stride_i + t[None, :], mask=live, other=0).to(tl.int64)
    offs = tl.load(offsets_ptr + t, mask=t < T, other=0)
    rows = tl.load(offsets_ptr + t + 1, mask=t < T, other=0) - offs
    ok = live & (ids >= 0) & (ids < rows[None, :])
    pos = tl.load(row_position_ptr + offs[None, :] + ids, mask=ok, other=0)
    tl.store(out_ptr + b[:, None] * stride_o + t[None, :], pos, mask=live)
    bad = tl.sum(tl.sum((live & ~ok).to(tl.int64), axis=1), axis=0)
    if bad > 0:
        tl.atomic_add(bad_ptr, bad)


def remap_ids(ids: torch.Tensor, table_offsets: torch.Tensor, row_position: torch.Tensor, out: torch.Tensor,
              bad: torch.Tensor, block: int = 64) -> torch.Tensor:
    """out[b, t] = row_position[table_offsets[t] + ids[b, t]] (int32), or 0 where ids[b, t] is outside
    table t (bad[0] += how many); returns out. ids/out int32 [B, T] (out may alias ids), table_offsets
    int64 [T + 1], bad int64 [>= 1] on the same device."""
    B, T = ids.shape
    if out.shape != ids.shape or ids.dtype != torch.int32 or out.dtype != torch.int32:
        raise TypeError(f"ids and out must be int32 of one shape, got {ids.dtype}{tuple(ids.shape)}, "
                        f"{out.dtype}{tuple(out.shape)}")
    if ids.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("ids and out need a contiguous last dim")
    if table_offsets.dtype != torch.int64 or table_offsets.numel() < T + 1 or row_position.dtype != torch.int32:
        raise TypeError("table_offsets must be int64 [T + 1] and row_position int32")
    if bad.dtype != torch.int64:
        raise TypeError("bad must be int64")
    if B:
        _remap_kernel[(triton.cdiv(B, block),)](ids, ids.stride(0), table_offsets, row_position, out, out.stride(0),
                                                bad, B, T=T, TP=triton.next_power_of_2(T), BLOCK=block)
    return out


def remap_ids_reference(ids: torch.Tensor, table_offsets: torch.Tensor,
                        row_position: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Plain PyTorch: (int32 positions with 0 for bad ids, number of bad ids)."""
    T = ids.shape[1]
    offs = table_offsets.long().cpu()
    rows = offs[1 : T + 1] - offs[:T]
    i = ids.long().cpu()
    ok = (i >= 0) & (i < rows[None, :])
    g = torch.where(ok, offs[:T][None, :] + i, torch.zeros_like(i))
    pos = torch.where(ok, row_position.cpu().long()[g], torch.zeros_like(i))
    return pos.to(torch.int32), int((~ok).sum())


@triton.jit(do_not_specialize=["n"])
def _gather_rows_kernel(pairs_ptr, a_src, a_dst, b_src, b_dst, n,
                        WA: tl.constexpr, WAP: tl.constexpr, WB: tl.constexpr, WBP: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = r < n
    p = tl.load(pairs_ptr + r, mask=live, other=0)
    ca = tl.arange(0, WAP)
    ma = live[:, None] & (ca < WA)[None, :]
    tl.store(a_dst + r[:, None] * WA + ca[None, :], tl.load(a_src + p[:, None] * WA + ca[None, :], mask=ma), mask=ma)
    cb = tl.arange(0, WBP)
    mb = live[:, None] & (cb < WB)[None, :]
    tl.store(b_dst + r[:, None] * WB + cb[None, :], tl.load(b_src + p[:, None] * WB + cb[None, :], mask=mb), mask=mb)


def _words(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous() or (t.shape[-1] * t.element_size()) % 4:
        raise ValueError(f"rows must be contiguous and a whole number of 4-byte words, got {tuple(t.shape)} "
                         f"{t.dtype}")
    return t.view(torch.int32)


def gather_pair_rows(pairs: torch.Tensor, a_src: torch.Tensor, a_dst: torch.Tensor, b_src: torch.Tensor,
                     b_dst: torch.Tensor, block: int = 128, num_warps: int = 4) -> None:
    """a_dst[i] = a_src[pairs[i]] and b_dst[i] = b_src[pairs[i]] for i < len(pairs), in one launch.

    Sources and destinations are contiguous 2-D tensors whose rows are whole 4-byte words (dense fp16
    [N, 16], positions int32 [N, 26]); a_dst/b_dst have at least len(pairs) rows; pairs int64 on the device.
    """
    n = pairs.numel()
    if pairs.dtype != torch.int64:
        raise TypeError(f"pairs must be int64, got {pairs.dtype}")
    a_s, a_d, b_s, b_d = (_words(t) for t in (a_src, a_dst, b_src, b_dst))
    if a_s.shape[1] != a_d.shape[1] or b_s.shape[1] != b_d.shape[1] or a_d.shape[0] < n or b_d.shape[0] < n:
        raise ValueError(f"row widths or sizes differ: {tuple(a_src.shape)}->{tuple(a_dst.shape)}, "
                         f"{tuple(b_src.shape)}->{tuple(b_dst.shape)} for {n} pairs")
    if n == 0:
        return
    wa, wb = a_s.shape[1], b_s.shape[1]
    _gather_rows_kernel[(triton.cdiv(n, block),)](pairs, a_s, a_d, b_s, b_d, n, WA=wa,
                                                 WAP=triton.next_power_of_2(wa), WB=wb,
                                                 WBP=triton.next_power_of_2(wb), BLOCK=block, num_warps=num_warps)


def gather_pair_rows_reference(pairs: torch.Tensor, a_src: torch.Tensor,
                               b_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: (a_src[pairs], b_src[pairs])."""
    return a_src[pairs.long()], b_src[pairs.long()]
