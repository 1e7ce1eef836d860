"""Where a pipelined GPU engine's time goes between graph replays (issue 4), on the GPU machine.

bench_engine.py showed a pipelined by-reference batch of 262,144 pairs taking ~0.29 ms longer than the
captured forward alone. This script:
  1. times pipelined by-reference throughput at several batch sizes (a fixed per-batch cost shrinks
     per pair as batches grow);
  2. records a torch.profiler trace of pipelined batches and prints the device time per kernel/copy and
     the device's busy share of the wall time (idle = the host or a dependency kept it waiting);
  3. times the top MLP's first GEMM with K = 480 (the engine's padded width) against K = 512.
Run: `python3 bench/profile_engine.py --out $OUT/profile.json` (builds bench_engine.py's artifact).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import build, cuda_ms, pipelined_pairs_per_s  # noqa: E402
from engines.gpu_backend import GpuBackend  # noqa: E402


def ranges_for(offsets: np.ndarray, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole LoadGen samples from the dataset's start adding up to at most `pairs` pairs."""
    end = int(np.searchsorted(offsets, pairs, side="right")) - 1
    return offsets[:end], np.diff(offsets[: end + 1])


def profile(eng: GpuBackend, starts: np.ndarray, counts: np.ndarray, reps: int, region: np.ndarray) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    pipelined_pairs_per_s(eng, starts, counts, region, 4)
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        pipelined_pairs_per_s(eng, starts, counts, region, reps)
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per: dict[str, list[float]] = {}
    spans = []
    for e in events:
        per.setdefault(e.name[:90], []).append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy = 0.0
    cur_s, cur_e = None, None
    for s, e in spans:  # union of device intervals (us)
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    first = spans[0][0] if spans else 0
    last = max(e for _, e in spans) if spans else 0
    table = sorted(((k, len(v), sum(v)) for k, v in per.items()), key=lambda r: -r[2])
    batches = 4 + reps  # pipelined_pairs_per_s warms up with 4 batches first
    return {"wall_s": wall, "device_busy_us": busy, "device_span_us": last - first,
            "busy_share_of_span": busy / (last - first) if last > first else None,
            "per_batch_us": [(k, c / batches, t / batches) for k, c, t in table[:25]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--pairs", type=int, default=1_100_000)
    ap.add_argument("--batches", default="131072,262144,524288")
    ap.add_argument("--reps", type=int, default=24)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res: dict = {"card": torch.cuda.get_device_name()}
    root = Path(tempfile.mkdtemp(prefix="profile_engine_"))
    art, ds, _config, extra = build(root, args.scale, args.pairs, 1.05, 7)
    offsets = extra["offsets"]
    sizes = [int(b) for b in args.batches.split(",")]
    res["pipelined_pairs_per_s"] = {}
    for b in sizes:
        eng = GpuBackend("cuda:0", art, 1.0, max_batch_pairs=b, graph_sizes=[b])
        region = np.zeros(eng.inflight * b, dtype=np.float32)  # page-locked as the engine's slots
        eng.pin_host_memory(region)
        eng.register_dataset("bench", ds)
        starts, counts = ranges_for(offsets, b)
        rate = pipelined_pairs_per_s(eng, starts, counts, region, args.reps)
        with torch.cuda.stream(eng.stream):
            fwd = b / cuda_ms(lambda: eng._run(b), reps=20) * 1e3
        res["pipelined_pairs_per_s"][b] = {"pipelined": rate, "graph_forward": fwd}
        print(f"batch {b}: pipelined by_ref {rate / 1e6:.2f} M pairs/s, graph forward {fwd / 1e6:.2f} M pairs/s",
              flush=True)
        if b == 262144:
            prof = profile(eng, starts, counts, 12, region)
            res["profile_262144"] = prof
            print(f"  profile: wall {prof['wall_s'] * 1e3:.1f} ms for 16 batches, device busy "
                  f"{prof['device_busy_us'] / 1e3:.1f} ms of a {prof['device_span_us'] / 1e3:.1f} ms span "
                  f"({100 * (prof['busy_share_of_span'] or 0):.1f}%)")
            for name, calls, us in prof["per_batch_us"]:
                print(f"    {us:9.1f} us/batch  {calls:5.1f} calls  {name}")
        eng.close()
        del eng
        torch.cuda.empty_cache()
    m = 262144
    times = {}
    for k in (480, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = torch.randn(1024, k, device="cuda", dtype=torch.float16)
        bias = torch.randn(1024, device="cuda", dtype=torch.float16)
        ms = cuda_ms(lambda: torch._addmm_activation(bias, x, w.t()), reps=30)
        times[k] = ms
        print(f"top layer 1 GEMM {m}x{k} @ {k}x1024 (bias+ReLU epilogue): {ms:.3f} ms, "
              f"{2 * m * k * 1024 / ms / 1e9:.0f} TFLOP/s")
    res["layer1_ms_by_k"] = times
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
