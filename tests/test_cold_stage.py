"""kernels/cold_stage.py: a batch's cold rows staged on the device before the fused gather + interaction.

The pass plus the unchanged fused kernel (with the stage counted as hot rows) must give the same output
bits and the same hot-lookup count as the fused kernel on the original positions, with the stage large
enough for every cold lookup and with a stage that fills (the rest read from host memory). Without CUDA
the kernels run in Triton's interpreter at small shapes; the `gpu` test at a full batch.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.cold_stage import stage_cold_rows, stage_cold_rows_reference  # noqa: E402
from kernels.gather_interaction import gather_interaction, new_counts, read_counts  # noqa: E402

D = 128


def _case(rows: list[int], n_hot: int, batch: int, capacity: int, device: str, seed: int,
          block: int = 128, sub: int = 32) -> None:
    gen = torch.Generator().manual_seed(seed)
    total = sum(rows)
    T = len(rows)
    q = torch.randint(-127, 128, (total, D), dtype=torch.int8, generator=gen)
    q[q == 0] = 1
    offsets = torch.zeros(T + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(rows), 0)
    # file positions as the engine holds them (remapped), skewed: most lookups hot, some cold
    positions = torch.stack([offsets[t] + torch.randint(0, r, (batch,), generator=gen) for t, r in enumerate(rows)],
                            1).to(torch.int32)
    scales = (torch.rand(T, generator=gen) * 0.05 + 0.005)
    bottom = torch.randn(batch, D, generator=gen).half()
    hot, cold = q[:n_hot].contiguous(), q[n_hot:].contiguous()
    real = batch - 2  # two trailing pairs as graph padding: computed, not counted
    width = D + (T + 1) * T // 2

    def fused(pos: torch.Tensor, hot_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.full((batch, width), float("nan"), dtype=torch.half, device=device)
        counts = new_counts(device)
        counts[0] = real * T
        gather_interaction(bottom.to(device), pos.to(device), offsets.to(device), None, scales.to(device),
                           hot_rows.to(device), cold_dev, out, counts)
        return out, counts

    cold_dev = cold.pin_memory() if device != "cpu" else cold
    want, want_counts = fused(positions, hot)
    # the engine's layout: the stage is `capacity` rows after the hot ones in one device tensor
    hot_staged = torch.cat([hot, torch.zeros(capacity, D, dtype=torch.int8)]).to(device)
    pos = positions.clone().to(device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    got_counts = new_counts(device)
    got_counts[0] = real * T
    stage_cold_rows(pos, n_hot, cold_dev, hot_staged[n_hot:], counter, got_counts, block=block, sub=sub)
    n_cold = int((positions >= n_hot).sum())
    assert int(counter.item()) == n_cold > 0
    # every rewritten position still reads its own row: the stage's copy, or the host row past the stage
    flat_old, flat_new = positions.flatten().long(), pos.cpu().flatten().long()
    staged = (flat_new >= n_hot) & (flat_new < n_hot + capacity)
    assert int(staged.sum()) == min(n_cold, capacity)
    assert torch.equal(hot_staged.cpu()[flat_new[staged]], cold[flat_old[staged] - n_hot])
    rest = flat_old >= n_hot
    assert torch.equal(flat_new[rest & ~staged], flat_old[rest & ~staged] + capacity)
    assert torch.equal(flat_new[~rest], flat_old[~rest])
    # the reference's assignment (lookup order) is equivalent
    ref_stage = torch.zeros(capacity, D, dtype=torch.int8)
    ref_pos = stage_cold_rows_reference(positions, n_hot, cold, ref_stage).long().flatten()
    ref_rows = torch.cat([hot, ref_stage, cold])
    got_rows = torch.cat([hot_staged.cpu(), cold])
    assert torch.equal(ref_rows[ref_pos], got_rows[flat_new])
    # then the unchanged fused kernel, the stage as hot rows: the same bits and the same hot count
    got_out = torch.full((batch, width), float("nan"), dtype=torch.half, device=device)
    gather_interaction(bottom.to(device), pos, offsets.to(device), None, scales.to(device), hot_staged, cold_dev,
                       got_out, got_counts)
    assert torch.equal(got_out, want)
    assert read_counts(got_counts) == read_counts(want_counts)


@pytest.mark.parametrize("capacity", [4096, 7])
def test_interpreter_staged_batch_is_the_same_batch(capacity: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _case([50, 200, 30, 400], n_hot=300, batch=45, capacity=capacity, device=device, seed=int(capacity))


def test_rejects_bad_operands() -> None:
    pos = torch.zeros(4, 3, dtype=torch.int32)
    rows = torch.zeros(8, D, dtype=torch.int8)
    counter = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TypeError):
        stage_cold_rows(pos.long(), 2, rows, rows, counter)
    with pytest.raises(TypeError):
        stage_cold_rows(pos, 2, rows, rows, counter.long())
    with pytest.raises(ValueError):
        stage_cold_rows(pos, 2, rows, rows, counter, block=100, sub=64)


@pytest.mark.gpu
def test_gpu_full_batch() -> None:
    _case([40000] * 26, n_hot=300000, batch=262144, capacity=1 << 20, device="cuda", seed=3, block=1024, sub=64)
