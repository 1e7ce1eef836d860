"""A batch's cold embedding rows copied to the device before the fused gather + interaction kernel.

Why (issue 13, `embedding_weights_on_gpu_part = 0.3` on an H100, 2026-12-07): with 0.54% of the lookups
in pinned host memory the engine ran at 71% of its all-on-device rate. The fused kernel reads those rows
zero-copy, and each read stalls a program that holds a share of the SM for a PCIe round trip. Here a pass
of its own (no Gram tile, no interaction: only loads and stores in flight) copies every cold row of the
batch into a staging area of `capacity` rows placed right after the hot rows in device memory, and
rewrites the lookup's file position to point there. The fused kernel then runs unchanged with
`n_hot + capacity` hot rows: staged rows are hot rows to it. A lookup that finds the stage full keeps
reading host memory (its position is shifted by `capacity`, so that `position - (n_hot + capacity)` is
still its cold row). Opt-in (GpuBackend kernel_config `stage_cold_rows`): measured slower than the fused kernel
reading host memory itself on an H100 (BENCHMARKS.md, round 5: 92.7 against 112.6 M pairs/s pipelined).

One program takes BLOCK flat lookups in sub-blocks of SUB: it counts its cold lookups, reserves that many
slots with one atomic, then copies the rows and rewrites the positions. Staged lookups were counted as
hot by the fused kernel: the pass takes them off the hot count again (counts[2:]), for the pairs the
count covers (b * T < counts[0]), so the engine's hot-row statistics stay the placement's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gather_interaction import COUNT_SLOTS


@triton.jit
def _stage_cold_rows_kernel(pos_ptr, n_flat, n_hot, cold_ptr, stage_ptr, capacity, counter_ptr, counts_ptr,
                            T: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                            COUNT: tl.constexpr, SLOTS: tl.constexpr):
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * BLOCK
    sub = tl.arange(0, SUB)
    c = tl.arange(0, D)
    n_cold = tl.sum(sub * 0, axis=0)
    for j in range(0, BLOCK, SUB):
        f = first + j + sub
        p = tl.load(pos_ptr + f, mask=f < n_flat, other=0)
        n_cold += tl.sum(((f < n_flat) & (p >= n_hot)).to(tl.int32), axis=0)
    if n_cold > 0:
        base = tl.atomic_add(counter_ptr, n_cold)
        if COUNT:
            limit = tl.load(counts_ptr)
        run = n_cold * 0
        uncounted = n_cold * 0
        for j in range(0, BLOCK, SUB):
            f = first + j + sub
            live = f < n_flat
            p = tl.load(pos_ptr + f, mask=live, other=0).to(tl.int64)
            cold = live & (p >= n_hot)
            slot = base + run + tl.cumsum(cold.to(tl.int32), axis=0) - 1
            staged = cold & (slot < capacity)
            rows = tl.load(cold_ptr + ((p - n_hot) * D)[:, None] + c[None, :], mask=staged[:, None], other=0)
            tl.store(stage_ptr + (slot.to(tl.int64) * D)[:, None] + c[None, :], rows, mask=staged[:, None])
            new_p = tl.where(staged, n_hot + slot, p + capacity)
            tl.store(pos_ptr + f, new_p.to(tl.int32), mask=cold)
            if COUNT:
                uncounted += tl.sum((staged & ((f // T) * T < limit)).to(tl.int32), axis=0)
            run += tl.sum(cold.to(tl.int32), axis=0)
        if COUNT:
            tl.atomic_add(counts_ptr + 2 + pid % SLOTS, -uncounted.to(tl.int64))


def stage_cold_rows(positions: torch.Tensor, n_hot: int, cold: torch.Tensor, stage: torch.Tensor,
                    counter: torch.Tensor, counts: torch.Tensor | None = None, block: int = 1024, sub: int = 64,
                    num_warps: int = 4) -> None:
    """Copy the cold rows that `positions` (int32 [B, T] file positions, rewritten in place) look up into
    `stage` (int8 [capacity, D] on the device, right after the hot rows: hot[n_hot:]), as module doc.
    `counter` int32 [1], zero before the call, ends as the number of cold lookups (staged or not).
    `counts` (new_counts()) as gather_interaction's: staged lookups are taken off its hot count."""
    if positions.dtype != torch.int32 or not positions.is_contiguous() or positions.dim() != 2:
        raise TypeError("positions must be contiguous int32 [B, T] (file positions)")
    if cold.dtype != torch.int8 or stage.dtype != torch.int8 or not cold.is_contiguous() \
            or not stage.is_contiguous() or cold.shape[1] != stage.shape[1]:
        raise TypeError("cold and stage must be contiguous int8 [rows, D] of one D")
    if counter.dtype != torch.int32 or counter.numel() != 1:
        raise TypeError("counter must be int32 [1]")
    if counts is not None and (counts.dtype != torch.int64 or counts.numel() != 2 + COUNT_SLOTS):
        raise TypeError(f"counts must be int64 [{2 + COUNT_SLOTS}] (new_counts())")
    if block % sub:
        raise ValueError(f"block ({block}) must be a multiple of sub ({sub})")
    b, t = positions.shape
    if b == 0:
        return
    grid = (triton.cdiv(b * t, block),)
    _stage_cold_rows_kernel[grid](positions, b * t, n_hot, cold, stage, stage.shape[0], counter,
                                  counts if counts is not None else counter, T=t, D=stage.shape[1], BLOCK=block,
                                  SUB=sub, COUNT=counts is not None, SLOTS=COUNT_SLOTS, num_warps=num_warps)


def stage_cold_rows_reference(positions: torch.Tensor, n_hot: int, cold: torch.Tensor,
                              stage: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, in lookup order (the kernel's slot order depends on its programs' order; every slot
    assignment that keeps each lookup's row is equivalent): new positions int32 [B, T]; fills `stage`."""
    p = positions.to(torch.int64).flatten()
    capacity = stage.shape[0]
    cold_idx = torch.nonzero(p >= n_hot).flatten()
    new = p.clone()
    staged = cold_idx[:capacity]
    slots = torch.arange(len(staged), device=p.device)
    stage[: len(staged)] = cold[p[staged] - n_hot]
    new[staged] = n_hot + slots
    new[cold_idx[capacity:]] = p[cold_idx[capacity:]] + capacity
    return new.view(positions.shape).to(torch.int32)
