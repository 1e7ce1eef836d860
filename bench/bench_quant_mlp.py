"""Top MLP: cuBLAS fp16 (`torch._addmm_activation`, as engines/gpu_backend.py) vs the int8 Triton chain
(kernels/quant_linear.py), per layer and whole, at the engine's batch (M = 262,144 pairs).

Per layer (479->1024 fp16 in / int8 out, 1024->1024 and 1024->512 int8, 512->256 int8 + FINAL 256->1
sigmoid): TFLOP/s (TOP/s for int8) of cuBLAS fp16 and of each quant_linear config, best config per layer.
Whole MLP: the fp16 cuBLAS chain vs top_mlp_int8 with the best configs: ms, M pairs/s, max |diff| of the
predictions. CUDA events, warm-up, median of --repeats runs. Weights: the artifact's (--model, with its
calibration.json) or random with a calibration on the bench input.

  .venv/bin/python bench/bench_quant_mlp.py --out bench_quant_mlp.json            # GPU
  .venv/bin/python bench/bench_quant_mlp.py --cpu-smoke                           # interpreter, tiny M
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INT8_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 5},
    {"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
]
FP16_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 5},
]
FINAL_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
]
SMOKE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def timer(fn: Callable[[], Any], cuda: bool, warmup: int, repeats: int) -> float:
    """Median seconds of fn()."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_weights(model: Path | None, widths: list[int], in_width: int) -> tuple[dict[str, np.ndarray], Any]:
    if model is not None:
        from formats.artifact import Artifact

        art = Artifact.open(model)
        if art.calibration is None:
            raise SystemExit(f"{model}: no calibration.json (dlrm-prepare calibrate)")
        return {k: v for k, v in art.mlp.items() if k.startswith("top_l.")}, art.calibration
    rng = np.random.default_rng(0)
    out, fan_in = {}, in_width
    for i, w in enumerate(widths):
        out[f"top_l.{2 * i}.weight"] = (rng.standard_normal((w, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        out[f"top_l.{2 * i}.bias"] = (rng.standard_normal(w) * 0.05).astype(np.float32)
        fan_in = w
    return out, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=262_144, help="M: pairs per forward")
    ap.add_argument("--model", type=Path, help="artifact with calibration.json (default: random weights)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny M, one small config, Triton interpreter")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.batch, args.repeats, args.warmup = 48, 1, 0
    import torch

    from kernels.quant_linear import quant_linear
    from engines.int8_top_mlp import quantize_top_mlp, top_mlp_int8, alloc_scratch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("needs a CUDA GPU (or --cpu-smoke)")
    dev = "cuda" if cuda else "cpu"
    half = torch.float16 if cuda else torch.float32  # the CPU has no fp16 addmm: smoke only
    m, widths, in_width = args.batch, [1024, 1024, 512, 256, 1], 479
    weights, calibration = load_weights(args.model, widths, in_width)
    gen = torch.Generator().manual_seed(1)
    x_in = torch.zeros((m, 480), dtype=torch.float16)
    x_in[:, :in_width] = torch.relu(torch.randn(m, in_width, generator=gen)).half()
    if calibration is None:
        # Calibrate on the bench input itself (p99.99 of each activation of the fp32 chain, on 16k rows).
        act, amax = x_in[:16384, :in_width].float(), []
        for i in range(3):
            act = torch.relu(act @ torch.from_numpy(weights[f"top_l.{2 * i}.weight"]).t()
                             + torch.from_numpy(weights[f"top_l.{2 * i}.bias"]))
            amax.append(float(torch.quantile(act.flatten()[:1 << 24], 0.9999)))
        calibration = amax
    q = quantize_top_mlp(weights, calibration).to(dev)
    x = x_in.to(dev)
    run = lambda fn: timer(fn, cuda, args.warmup, args.repeats)  # noqa: E731

    results: dict[str, Any] = {"batch": m, "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)",
                               "layers": [], "chain": {}}
    # fp16 weights for the cuBLAS chain, layer 1 K padded to 480 as in gpu_backend.
    w16 = [q.w1.to(half)] + [torch.from_numpy(weights[f"top_l.{2 * i}.weight"]).to(dev, half) for i in range(1, 5)]
    b16 = [torch.from_numpy(weights[f"top_l.{2 * i}.bias"]).to(dev, half) for i in range(5)]
    acts8 = [torch.randint(0, 128, (m, k), dtype=torch.int8, generator=gen).to(dev) for k in (1024, 1024, 512)]
    specs = [  # name, K, N, fp16 input, int8 input, configs
        ("top_l.0 480x1024 fp16->int8", 480, 1024, x.to(half), x, FP16_CONFIGS),
        ("top_l.2 1024x1024 int8", 1024, 1024, torch.randn(m, 1024, device=dev).to(half), acts8[0], INT8_CONFIGS),
        ("top_l.4 1024x512 int8", 1024, 512, torch.randn(m, 1024, device=dev).to(half), acts8[1], INT8_CONFIGS),
        ("top_l.6 512x256 int8+FINAL", 512, 256, torch.randn(m, 512, device=dev).to(half), acts8[2], FINAL_CONFIGS),
    ]
    best_cfgs = []
    for li, (name, k, n, xh, x8, cfgs) in enumerate(specs):
        flop = 2.0 * m * k * n
        t_cublas = run(lambda: torch._addmm_activation(b16[li], xh, w16[li].t()))
        row = {"layer": name, "cublas_fp16_ms": t_cublas * 1e3, "cublas_fp16_tflops": flop / t_cublas / 1e12,
               "configs": []}
        if args.cpu_smoke:
            cfgs = [dict(SMOKE, BLOCK_N=256) if li == 3 else SMOKE]
        for cfg in cfgs:
            if li == 0:
                out = torch.empty((m, n), dtype=torch.int8, device=dev)
                fn = lambda: quant_linear(x8, q.w1, q.b1, None, None, out, out_inv_scale=q.inv_scales[0], config=cfg)  # noqa: E731
            elif li < 3:
                out = torch.empty((m, n), dtype=torch.int8, device=dev)
                fn = lambda: quant_linear(x8, q.weights[li - 1], q.biases[li - 1], q.w_scales[li - 1],  # noqa: E731
                                          q.x_scales[li - 1], out, out_inv_scale=q.inv_scales[li], config=cfg)
            else:
                out = torch.empty(m, dtype=torch.float32, device=dev)
                fn = lambda: quant_linear(x8, q.weights[-1], q.biases[-1], q.w_scales[-1], q.x_scales[-1], out,  # noqa: E731
                                          final_weight=q.final_weight, final_bias=q.final_bias, config=cfg)
            try:
                t = run(fn)
                row["configs"].append({"config": cfg, "ms": t * 1e3, "tflops": flop / t / 1e12})
            except Exception as exc:  # a config that does not compile (shared memory) is reported, not fatal
                row["configs"].append({"config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        ok = [c for c in row["configs"] if "ms" in c]
        best = min(ok, key=lambda c: c["ms"]) if ok else {"config": None, "ms": float("nan"), "tflops": float("nan")}
        row["best"] = best
        best_cfgs.append(best["config"])
        results["layers"].append(row)
        print(f"{name:<28} cuBLAS fp16 {row['cublas_fp16_ms']:7.3f} ms {row['cublas_fp16_tflops']:7.1f} TFLOP/s | "
              f"int8 best {best['ms']:7.3f} ms {best['tflops']:7.1f} TOP/s  {best['config']}", flush=True)

    def fp16_chain() -> torch.Tensor:
        y = x.to(half)
        for i in range(4):
            y = torch._addmm_activation(b16[i], y, w16[i].t())
        return torch.sigmoid(torch.nn.functional.linear(y, w16[4], b16[4]).float()).reshape(-1)

    pred = torch.empty(m, dtype=torch.float32, device=dev)
    scratch = alloc_scratch(q, m, dev)
    t16 = run(fp16_chain)
    t8 = run(lambda: top_mlp_int8(q, x, pred, scratch, best_cfgs))
    diff = float((fp16_chain() - top_mlp_int8(q, x, pred, scratch, best_cfgs)).abs().max())
    results["chain"] = {"fp16_cublas_ms": t16 * 1e3, "fp16_cublas_mpairs_s": m / t16 / 1e6,
                        "int8_triton_ms": t8 * 1e3, "int8_triton_mpairs_s": m / t8 / 1e6,
                        "max_abs_pred_diff": diff, "configs": best_cfgs}
    print(f"whole top MLP: fp16 cuBLAS {t16 * 1e3:.3f} ms ({m / t16 / 1e6:.1f} M pairs/s) | int8 Triton "
          f"{t8 * 1e3:.3f} ms ({m / t8 / 1e6:.1f} M pairs/s) | max |pred diff| {diff:.2e}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
