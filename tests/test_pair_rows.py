"""kernels/pair_rows.py (id remap with checks, per-pair row gather) vs their PyTorch references.

On a machine without CUDA the kernels run in Triton's interpreter at small shapes; the `gpu` test runs
them compiled at the engine's shapes (262,144 pairs of a 1 M-pair dataset)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.pair_rows import (gather_pair_rows, gather_pair_rows_reference, remap_ids,  # noqa: E402
                               remap_ids_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(rows: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(rows, dtype=torch.int64), 0)
    # positions 1.. (never 0), so a bad id's 0 cannot pass for a remapped one
    row_position = (torch.randperm(int(offsets[-1]), generator=gen) + 1).to(torch.int32)
    return offsets.to(DEV), row_position.to(DEV)


@pytest.mark.parametrize("batch", [1, 37, 200])
def test_remap_ids_matches_reference_and_counts_bad_ids(batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    rows = [int(r) for r in torch.randint(1, 50, (26,), generator=gen)]
    offsets, row_position = _tables(rows, gen)
    ids = torch.stack([torch.randint(0, r, (batch,), generator=gen) for r in rows], 1).to(torch.int32)
    ids[batch // 2, 3] = rows[3]  # one past the table's end
    ids[0, 25] = -1
    want, want_bad = remap_ids_reference(ids, offsets, row_position)
    assert want_bad == 2
    out = torch.full_like(ids, -7).to(DEV)
    bad = torch.zeros(1, dtype=torch.int64, device=DEV)
    remap_ids(ids.to(DEV), offsets, row_position, out, bad)
    assert torch.equal(out.cpu(), want)
    assert int(bad[0]) == want_bad
    # in place, as the engine does for a by-value batch
    again = ids.clone().to(DEV)
    remap_ids(again, offsets, row_position, again, bad)
    assert torch.equal(again.cpu(), want) and int(bad[0]) == 2 * want_bad


def test_gather_pair_rows_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    n_src, n = 500, 133
    dense = torch.randn(n_src, 16, generator=gen).to(torch.float16).to(DEV)
    pos = torch.randint(0, 1 << 30, (n_src, 26), generator=gen, dtype=torch.int32).to(DEV)
    pairs = torch.randint(0, n_src, (n,), generator=gen).to(DEV)
    d_out = torch.full((n + 5, 16), float("nan"), dtype=torch.float16, device=DEV)
    p_out = torch.full((n + 5, 26), -1, dtype=torch.int32, device=DEV)
    gather_pair_rows(pairs, dense, d_out, pos, p_out)
    want_d, want_p = gather_pair_rows_reference(pairs, dense, pos)
    assert torch.equal(d_out[:n].cpu(), want_d.cpu())
    assert torch.equal(p_out[:n].cpu(), want_p.cpu())
    assert torch.isnan(d_out[n:].float()).all() and (p_out[n:] == -1).all()  # nothing past n written


def test_gather_pair_rows_refuses_odd_widths() -> None:
    bad = torch.zeros(4, 3, dtype=torch.float16, device=DEV)  # 6-byte rows
    with pytest.raises(ValueError, match="4-byte words"):
        gather_pair_rows(torch.zeros(2, dtype=torch.int64, device=DEV), bad, bad, bad, bad)


@pytest.mark.gpu
def test_pair_rows_full_shapes_on_gpu() -> None:
    gen = torch.Generator().manual_seed(9)
    rows = [39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10, 2208,
            11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36]
    offsets, row_position = _tables(rows, gen)
    n = 262144
    ids = torch.stack([torch.randint(0, r, (n,), generator=gen) for r in rows], 1).to(torch.int32)
    want, _ = remap_ids_reference(ids, offsets, row_position)
    out = torch.empty_like(ids, device=DEV)
    bad = torch.zeros(1, dtype=torch.int64, device=DEV)
    remap_ids(ids.to(DEV), offsets, row_position, out, bad)
    assert torch.equal(out.cpu(), want) and int(bad[0]) == 0
    n_src = 1 << 20
    dense = torch.randn(n_src, 16, generator=gen).to(torch.float16).to(DEV)
    pos = torch.randint(0, 1 << 30, (n_src, 26), generator=gen, dtype=torch.int32).to(DEV)
    pairs = torch.randint(0, n_src, (n,), generator=gen).to(DEV)
    d_out, p_out = torch.empty(n, 16, dtype=torch.float16, device=DEV), torch.empty(n, 26, dtype=torch.int32, device=DEV)
    gather_pair_rows(pairs, dense, d_out, pos, p_out)
    assert torch.equal(d_out, dense[pairs]) and torch.equal(p_out, pos[pairs])
