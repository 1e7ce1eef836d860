"""The fp8 top MLP's cuBLASLt chain alone, step by step, as the GPU engine uses it (GPU machine).

    python3 bench/fp8_probe.py [--max-rows 262144]

For every engine graph size (512 .. max, powers of two): one eager forward, checked against the plain
PyTorch reference; then CUDA graphs captured largest first in one shared pool (as GpuBackend does),
each replayed on fresh inputs and checked, with a device synchronize after every step so the first
failing one is named. Last, the chain's time at the largest size, eager and replayed, against the
fp16 cuBLAS top MLP on the same rows (the engine's default), median of CUDA-event timings.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.fp8_top_mlp import E4M3, Fp8TopMlpRunner, fp8_top_mlp_reference, quantize_fp8_top_mlp  # noqa: E402
from engines.fp8_top_mlp import quantize_top_input  # noqa: E402
from engines.model import random_state_dict  # noqa: E402
from formats.model_config import DLRMConfig  # noqa: E402


def cuda_ms(fn, reps: int = 30) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-rows", type=int, default=262144)
    args = ap.parse_args()
    dev = torch.device("cuda")
    config = DLRMConfig.mlperf().scaled(1e-4, cap=500)
    mlp = {k: v.numpy() for k, v in random_state_dict(config, seed=11).items() if k.startswith("top_l.")}
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(20000, config.interaction_width, generator=gen) * 2
    x = sample
    amax = {"top_l.0": float(x.abs().max())}
    for i in range(3):
        x = torch.relu(x @ torch.from_numpy(mlp[f"top_l.{2 * i}.weight"]).t() + torch.from_numpy(mlp[f"top_l.{2 * i}.bias"]))
        amax[f"top_l.{2 * (i + 1)}"] = float(x.max())
    q = quantize_fp8_top_mlp(mlp, amax)
    m = args.max_rows
    sizes = [s for s in (1 << k for k in range(9, 31)) if s < m] + [m]
    runner = Fp8TopMlpRunner(q, m, dev)
    buf = torch.zeros((m, q.in_width_padded), dtype=E4M3, device=dev)
    pred = torch.zeros(m, device=dev)
    stream = torch.cuda.Stream()

    def fill(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4096, config.interaction_width, generator=g) * 2
        x0 = quantize_top_input(q, x)
        buf.copy_(x0.repeat((m + 4095) // 4096, 1)[:m].to(dev))
        return fp8_top_mlp_reference(q, x0)

    def check(what: str, n: int, want: torch.Tensor) -> bool:
        torch.cuda.synchronize()
        got = pred[:n].cpu()
        w = want.repeat((n + 4095) // 4096)[:n]
        err = (got - w).abs()
        ok = bool(not torch.isnan(got).any() and float(err.mean()) < 5e-3 and float(err.max()) < 5e-2)
        print(f"{what:<28} n={n:<7} mean|err| {float(err.mean()):.2e} max {float(err.max()):.2e} {'ok' if ok else 'BAD'}",
              flush=True)
        return ok

    step = "eager"
    try:
        want = fill(1)
        for n in sizes:
            step = f"eager forward {n}"
            pred.fill_(float("nan"))
            with torch.cuda.stream(stream):
                runner.forward(buf[:n], pred, stream)
            check(step, n, want)
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for n in sorted(sizes, reverse=True):
            step = f"capture {n}"
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, stream=stream):
                runner.forward(buf[:n], pred, stream)
            torch.cuda.synchronize()
            pool = g.pool()
            graphs[n] = g
        print("captured", sorted(graphs), flush=True)
        want = fill(2)
        for n in sizes:
            step = f"replay {n}"
            pred.fill_(float("nan"))
            graphs[n].replay()
            check(step, n, want)
        step = "timing"
        with torch.cuda.stream(stream):
            eager = cuda_ms(lambda: runner.forward(buf[:m], pred, stream))
            replay = cuda_ms(lambda: graphs[m].replay())
        w16 = [(torch.from_numpy(mlp[f"top_l.{2 * i}.weight"]).to(dev, torch.float16),
                torch.from_numpy(mlp[f"top_l.{2 * i}.bias"]).to(dev, torch.float16)) for i in range(5)]
        w16[0] = (torch.nn.functional.pad(w16[0][0], (0, 512 - w16[0][0].shape[1])), w16[0][1])
        x16 = torch.randn(m, 512, device=dev, dtype=torch.float16)

        def fp16_top() -> torch.Tensor:
            y = x16
            for i, (w, b) in enumerate(w16):
                y = torch._addmm_activation(b, y, w.t()) if i < 4 else torch.nn.functional.linear(y, w, b)
            return y
        fp16 = cuda_ms(fp16_top)
        flops = 2 * m * sum(int(w.shape[0]) * int(w.shape[1]) for w in q.weights)
        print(f"top MLP at {m} rows: fp8 chain eager {eager:.3f} ms, replayed {replay:.3f} ms "
              f"({flops / replay / 1e9:.0f} TFLOP/s); fp16 cuBLAS with bias+ReLU epilogue {fp16:.3f} ms", flush=True)
    except Exception:
        print(f"FAILED at step: {step}", flush=True)
        traceback.print_exc()
        try:
            torch.cuda.synchronize()
        except Exception as exc:
            print("synchronize after the failure:", exc)
        return 1
    finally:
        torch.cuda.synchronize()
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
