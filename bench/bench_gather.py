"""Gather kernel bandwidth on the GPU, each figure beside its baseline from the same run.

Measures (1) the device's own copy bandwidth (a large device-to-device copy, bytes read + written);
(2) kernels.embedding_gather over an int8 table of several GB generated on the device, uniform random
ids, several block/warp variants, vs torch.index_select (+ the same dequantization in PyTorch);
(3) hot/cold: the same kernel with the cold tier in pinned host memory (zero-copy), gpu_part 1.0, 0.5,
0.3, 0.1 on Zipf-skewed ids in frequency order, with the share of lookups served from device memory.

Run on the device machine: `python3 bench/bench_gather.py --table-gb 16 --out $OUT/gather.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.dot_interaction import dot_interaction  # noqa: E402
from kernels.embedding_gather import embedding_gather  # noqa: E402
from kernels.gather_interaction import gather_interaction, new_counts  # noqa: E402

D, T = 128, 26


def bench_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def copy_bandwidth(gb: float = 4.0) -> float:
    n = int(gb * 1e9)
    src = torch.empty(n, dtype=torch.int8, device="cuda").random_(-128, 127)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / ms / 1e6  # GB/s, read + write


def bounded_zipf(rng: np.random.Generator, a: float, n: np.ndarray | int, size: tuple[int, ...]) -> np.ndarray:
    """Ranks in [0, n) with P(r) ~ (r + 1)^-a (continuous inverse CDF; no clipping of the tail onto one row)."""
    u = rng.random(size)
    top = (np.asarray(n, dtype=np.float64) + 1.0) ** (1.0 - a)
    r = np.floor(((top - 1.0) * u + 1.0) ** (1.0 / (1.0 - a))) - 1
    return np.minimum(r, np.asarray(n) - 1).astype(np.int64)


def make_problem(rows: int, batch: int, seed: int, zipf: float | None) -> dict[str, torch.Tensor]:
    """26 equal tables over `rows` rows; row_position a random permutation (or frequency order for Zipf)."""
    per = rows // T
    offsets = torch.arange(T + 1, dtype=torch.int64, device="cuda") * per  # [T+1], last = total
    rng = np.random.default_rng(seed)
    if zipf is None:
        ids = torch.randint(0, per, (batch, T), dtype=torch.int32, device="cuda")
        row_position = torch.randperm(per * T, device="cuda").to(torch.int32)
    else:
        # Rank r of table t is its r-th most frequent row; the file orders rows by rank across tables
        # (equal tables and exponents: global position = r * T + t), as the REFERENCE hot/cold rule would.
        ranks = bounded_zipf(rng, zipf, per, (batch, T)).astype(np.int32)
        ids = torch.from_numpy(ranks).cuda()
        g = torch.arange(per * T, device="cuda", dtype=torch.int64)
        t, r = g // per, g % per
        row_position = (r * T + t).to(torch.int32)
    return {"ids": ids, "offsets": offsets, "row_position": row_position,
            "scales": torch.rand(T, device="cuda") * 0.05 + 0.001}


def check(pb: dict, hot: torch.Tensor, cold: torch.Tensor | None, out: torch.Tensor, count: torch.Tensor) -> float:
    """Max abs error of the kernel vs the PyTorch reference on 2,000 pairs (cold rows copied for it)."""
    k = min(2000, pb["ids"].shape[0])
    sub = pb["ids"][:k]
    pos = pb["row_position"][(pb["offsets"][None, :T] + sub.long())].long()
    n_hot = hot.shape[0]
    rows = torch.empty((k, T, D), dtype=torch.int8, device="cuda")
    h = pos < n_hot
    rows[h] = hot[pos[h]]
    if cold is not None:
        rows[~h] = cold[(pos[~h] - n_hot).cpu()].cuda()
    want = (rows.float() * pb["scales"][None, :, None]).half()
    got = out[:k].float()
    if torch.isnan(got).any():
        return float("inf")
    return float((got - want.float()).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table-gb", type=float, default=16.0)
    ap.add_argument("--cold-table-gb", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    res: dict = {"card": card, "table_gb": args.table_gb, "batch_pairs": args.batch}
    res["copy_GBps"] = copy_bandwidth()
    print(f"{card}: device copy {res['copy_GBps']:.0f} GB/s (read+write)", flush=True)

    rows = int(args.table_gb * 1e9) // D // T * T
    table = torch.empty((rows, D), dtype=torch.int8, device="cuda").random_(-127, 128)
    pb = make_problem(rows, args.batch, 1, None)
    L = args.batch * T
    out = torch.full((args.batch, T, D), float("nan"), dtype=torch.float16, device="cuda")
    count = torch.zeros(1, dtype=torch.int64, device="cuda")
    variants = []
    for block in (16, 32, 64, 128):
        for warps in (2, 4, 8):
            def run(block: int = block, warps: int = warps) -> None:
                embedding_gather(pb["ids"], pb["offsets"], pb["row_position"], pb["scales"], table, None, out,
                                 count, block=block, num_warps=warps)
            out.fill_(float("nan"))
            run()
            err = check(pb, table, None, out, count)
            ms = bench_ms(run)
            variants.append({"block": block, "warps": warps, "ms": ms, "rows_per_s": L / ms * 1e3,
                             "row_GBps": L * D / ms / 1e6, "total_GBps": L * (D + 2 * D + 8) / ms / 1e6,
                             "max_err": err})
            print(f"  gather block={block:3d} warps={warps}: {ms:.3f} ms  {L / ms / 1e6:.2f} G rows/s  "
                  f"{L * D / ms / 1e6:.0f} GB/s rows  err {err:.2g}", flush=True)
    res["variants"] = variants
    best = min(variants, key=lambda v: v["ms"])
    # The fused gather + interaction (kernels/gather_interaction.py) on the same ids and table.
    bottom = torch.randn(args.batch, D, device="cuda").half()
    inter = torch.empty((args.batch, 480), dtype=torch.float16, device="cuda")
    fused = []
    fvariants = [(1, per, warps) for per in (1, 2) for warps in (1, 2, 4)] + [(2, 1, 2), (4, 1, 4)]
    counts = new_counts("cuda")
    for tile, per_prog, warps in fvariants:
        def runf(tile: int = tile, per_prog: int = per_prog, warps: int = warps) -> None:
            gather_interaction(bottom, pb["ids"], pb["offsets"], pb["row_position"], pb["scales"], table, None,
                               inter, counts, pairs_per_program=per_prog, pairs_per_tile=tile, num_warps=warps)
        try:
            inter.fill_(float("nan"))
            runf()
            torch.cuda.synchronize()
            ok = not bool(torch.isnan(inter[:, :479]).any())
            ms = bench_ms(runf)
        except Exception as exc:  # a variant that does not compile is reported, not fatal
            print(f"  fused tile={tile} per_program={per_prog} warps={warps}: FAILED {type(exc).__name__}: "
                  f"{str(exc)[:200]}", flush=True)
            continue
        fused.append({"tile": tile, "per_program": per_prog, "warps": warps, "ms": ms, "all_written": ok,
                      "pairs_per_s": args.batch / ms * 1e3, "row_GBps": L * D / ms / 1e6})
        print(f"  fused gather+interaction tile={tile} per_program={per_prog} warps={warps}: {ms:.3f} ms  "
              f"{args.batch / ms / 1e3:.1f} M pairs/s  {L * D / ms / 1e6:.0f} GB/s rows  written={ok}", flush=True)
    res["fused"] = fused
    bestf = min(fused, key=lambda v: v["ms"])
    ms_sep = best["ms"] + bench_ms(lambda: dot_interaction(bottom, out, inter))
    # The best fused variant must equal gather -> fp16 buffer -> interaction (same roundings).
    sep = inter[:, :479].float().clone()
    gather_interaction(bottom, pb["ids"], pb["offsets"], pb["row_position"], pb["scales"], table, None, inter,
                       counts, pairs_per_program=bestf["per_program"], pairs_per_tile=bestf["tile"],
                       num_warps=bestf["warps"])
    res["fused_vs_separate_rel_err"] = float((inter[:, :479].float() - sep).norm() / sep.norm())
    print(f"  fused vs separate kernels: rel err {res['fused_vs_separate_rel_err']:.2e}", flush=True)
    res["separate_gather_plus_interaction_ms"] = ms_sep
    # Baselines: index_select of the int8 rows alone, and the full PyTorch path (remap + select + dequant).
    pos = pb["row_position"][(pb["offsets"][None, :T] + pb["ids"].long())].long().reshape(-1)
    ms_sel = bench_ms(lambda: torch.index_select(table, 0, pos))
    ms_ref = bench_ms(lambda: (table[pb["row_position"][(pb["offsets"][None, :T] + pb["ids"].long())].long()]
                               .float() * pb["scales"][None, :, None]).half())
    res["index_select"] = {"ms": ms_sel, "row_GBps": L * D / ms_sel / 1e6}
    res["torch_path"] = {"ms": ms_ref, "row_GBps": L * D / ms_ref / 1e6}
    del table, out, inter
    torch.cuda.empty_cache()

    # Hot/cold with Zipf ids: one pinned host buffer big enough for the largest cold tier (gpu_part 0.1).
    crows = int(args.cold_table_gb * 1e9) // D // T * T
    pbz = make_problem(crows, args.batch, 2, args.zipf)
    full = torch.empty((crows, D), dtype=torch.int8, device="cuda").random_(-127, 128)
    t0 = time.perf_counter()
    pinned = torch.empty((crows - crows // 10, D), dtype=torch.int8, pin_memory=True)
    res["pin_s"] = time.perf_counter() - t0
    res["pin_GB"] = pinned.numel() / 1e9
    t0 = time.perf_counter()
    pinned.copy_(full[crows // 10:])
    torch.cuda.synchronize()
    res["pin_fill_s"] = time.perf_counter() - t0
    outz = torch.full((args.batch, T, D), float("nan"), dtype=torch.float16, device="cuda")
    hotcold = []
    for part in (1.0, 0.5, 0.3, 0.1):
        n_hot = int(np.ceil(part * crows))
        hot = full[:n_hot]
        cold = pinned[: crows - n_hot] if n_hot < crows else None
        count.zero_()
        outz.fill_(float("nan"))
        embedding_gather(pbz["ids"], pbz["offsets"], pbz["row_position"], pbz["scales"], hot, cold, outz, count,
                         block=best["block"], num_warps=best["warps"])
        torch.cuda.synchronize()
        hot_share = int(count.item()) / L
        err = check(pbz, hot, cold, outz, count)
        ms = bench_ms(lambda: embedding_gather(pbz["ids"], pbz["offsets"], pbz["row_position"], pbz["scales"], hot,
                                               cold, outz, None, block=best["block"], num_warps=best["warps"]),
                      reps=10)
        hotcold.append({"gpu_part": part, "hot_share": hot_share, "ms": ms, "rows_per_s": L / ms * 1e3,
                        "max_err": err})
        print(f"  hot/cold gpu_part={part}: hot share {hot_share:.4f}  {ms:.3f} ms  {L / ms / 1e3:.1f} M rows/s  "
              f"err {err:.2g}", flush=True)
    # Uniform ids, everything cold (but one row): the zero-copy PCIe rate.
    pbu = make_problem(crows, args.batch // 8, 3, None)
    Lu = pbu["ids"].numel()
    pbu["row_position"] = (pbu["row_position"] % pinned.shape[0] + 1).to(torch.int32)  # nothing hot
    ms_cold = bench_ms(lambda: embedding_gather(pbu["ids"], pbu["offsets"], pbu["row_position"], pbu["scales"],
                                                full[:1], pinned, outz[: Lu // T], None,
                                                block=best["block"], num_warps=best["warps"]), reps=5)
    res["all_cold"] = {"ms": ms_cold, "rows_per_s": Lu / ms_cold * 1e3, "row_GBps": Lu * D / ms_cold / 1e6}
    res["hot_cold"] = hotcold

    print(f"\n== gather summary ({card}, table {args.table_gb} GB, {L} lookups/launch) ==")
    print(f"device copy bandwidth          {res['copy_GBps']:8.0f} GB/s (read+write)")
    print(f"best kernel (block {best['block']}, warps {best['warps']}) {best['row_GBps']:8.0f} GB/s of rows, "
          f"{best['total_GBps']:.0f} GB/s counting fp16 out + ids + remap, {best['rows_per_s'] / 1e9:.2f} G rows/s")
    print(f"fused gather+interaction (tile {bestf['tile']}, per_program {bestf['per_program']}, warps "
          f"{bestf['warps']}) {bestf['ms']:.3f} ms = "
          f"{bestf['pairs_per_s'] / 1e6:.1f} M pairs/s; separate kernels {ms_sep:.3f} ms = "
          f"{args.batch / ms_sep / 1e3:.1f} M pairs/s")
    print(f"torch.index_select int8 rows    {res['index_select']['row_GBps']:8.0f} GB/s")
    print(f"torch remap+select+dequant      {res['torch_path']['row_GBps']:8.0f} GB/s")
    print(f"all-cold zero-copy (pinned)     {res['all_cold']['row_GBps']:8.1f} GB/s  "
          f"{res['all_cold']['rows_per_s'] / 1e6:.1f} M rows/s")
    print(f"pinning {res['pin_GB']:.1f} GB: {res['pin_s']:.2f} s")
    for h in hotcold:
        print(f"gpu_part {h['gpu_part']:.1f}: HBM share {h['hot_share']:.4f}, {h['rows_per_s'] / 1e6:8.1f} M rows/s")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
