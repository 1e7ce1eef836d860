"""The host-gathered cold rows (cold_row_gather "host") through the unchanged fused gather + interaction kernel.

The GPU engine's layout (engines/gpu_backend.py): the stage is `sets` x `capacity` rows after the hot rows
in one device tensor, every cold position shifted past it once (at remap), and a batch of set i has its
planned lookups (engines/cold_rows.py) rewritten to n_hot + i * capacity + slot after its rows were
copied there. The kernel must give the same bits as on the original positions with the rows in host
memory, and the same hot count plus the staged lookups (the engine takes them off again), with a stage
that holds every cold lookup and with one that fills (the rest read from host memory past the stage).
Without CUDA the kernel runs in Triton's interpreter at small shapes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engines.cold_rows import ColdLookups, gather_rows  # noqa: E402
from kernels.gather_interaction import gather_interaction, new_counts, read_counts  # noqa: E402

D = 128


@pytest.mark.parametrize("capacity,set_index", [(4096, 1), (9, 0)])
def test_interpreter_host_staged_batch_is_the_same_batch(capacity: int, set_index: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(capacity)
    rows, n_hot, sets = [50, 200, 30, 400], 300, 2
    T, total = len(rows), sum(rows)
    q = torch.randint(-127, 128, (total, D), dtype=torch.int8, generator=gen)
    offsets = torch.zeros(T + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(rows), 0)
    dataset = 60  # pairs of the registered dataset; the batch is ranges of them
    positions = torch.stack([offsets[t] + torch.randint(0, r, (dataset,), generator=gen)
                             for t, r in enumerate(rows)], 1).to(torch.int32)
    starts, counts = np.array([40, 3, 40, 17]), np.array([12, 9, 5, 11])  # a sample issued twice
    batch_pairs = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)])
    batch = batch_pairs.size
    scales = torch.rand(T, generator=gen) * 0.05 + 0.005
    bottom = torch.randn(batch, D, generator=gen).half()
    hot, cold = q[:n_hot].contiguous(), q[n_hot:].contiguous()
    width = D + (T + 1) * T // 2

    def run(pos: torch.Tensor, hot_rows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        out = torch.full((batch, width), float("nan"), dtype=torch.half, device=device)
        c = new_counts(device)
        c[0] = batch * T
        gather_interaction(bottom.to(device), pos.to(device), offsets.to(device), None, scales.to(device),
                           hot_rows.to(device), cold.to(device), out, c)
        return out, read_counts(c)

    want, (want_hot, _) = run(positions[torch.from_numpy(batch_pairs)].contiguous(), hot)
    # the engine's layout: the stage after the hot rows, cold positions shifted past it at remap
    shift = sets * capacity
    shifted = torch.where(positions >= n_hot, positions + shift, positions)
    hot_staged = torch.cat([hot, torch.zeros(shift, D, dtype=torch.int8)])
    first_cold = n_hot + shift
    index = ColdLookups.from_positions(shifted.numpy(), first_cold)
    plan = index.plan(starts, counts, capacity)
    n_cold = int((positions[torch.from_numpy(batch_pairs)] >= n_hot).sum())
    assert plan.total == n_cold > 0 and plan.staged == min(n_cold, capacity)
    base = n_hot + set_index * capacity
    staging = np.zeros((capacity, D), dtype=np.int8)
    hot_staged[base : base + plan.staged] = torch.from_numpy(gather_rows(cold.numpy(), plan, staging))
    pos = shifted[torch.from_numpy(batch_pairs)].contiguous()
    pos.view(-1).index_copy_(0, torch.from_numpy(plan.flat),
                             torch.arange(base, base + plan.staged, dtype=torch.int32))
    got, (got_hot, _) = run(pos, hot_staged)
    assert torch.equal(got, want)
    assert got_hot - plan.staged == want_hot
