"""Where kernels/fp8_linear.py differs from its reference on a GPU: its GEMM+epilogue (fp32 output) against
the exact fp32 reference, its e4m3 cast against torch's cast of the same fp32 values, and cuBLASLt's layer
(nvmath) against the same reference, on the data of tests/test_fp8_linear.py.

    python3 bench/fp8_linear_check.py [--rows 262144] [--k 512] [--n 1024]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.fp8_linear import E4M3, E4M3_MAX, _fp8_linear_relu_kernel, fp8_linear_relu  # noqa: E402


def worst(name: str, got: torch.Tensor, ref: torch.Tensor, k: int = 6) -> None:
    d = (got.float() - ref.float()).abs()
    flat = d.flatten()
    idx = flat.topk(k).indices
    print(f"{name}: max {float(flat.max()):.4g}, mean {float(flat.mean()):.3g}, share > 0: "
          f"{float((flat > 0).float().mean()):.4f}; worst (got, ref): "
          f"{[(round(float(got.flatten()[i]), 4), round(float(ref.flatten()[i]), 4)) for i in idx]}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--n", type=int, default=1024)
    a = ap.parse_args()
    dev = "cuda"
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(a.rows, a.k, generator=gen) * 300).to(E4M3).to(dev)
    w = (torch.randn(a.n, a.k, generator=gen) * 100).clamp(-448, 448).to(E4M3).to(dev)
    scale = 1.0 / (448 * a.k ** 0.5 * 40)
    bias = (torch.randn(a.n, generator=gen) * 0.5).to(torch.bfloat16).to(dev)
    acc = x.float() @ w.float().t()
    y = torch.relu(acc * scale + bias.float())
    inv = E4M3_MAX / float(y.max())
    y_ref = (y * inv).clamp(max=E4M3_MAX)
    scales = torch.tensor([scale, inv], device=dev)
    print(f"{torch.cuda.get_device_name()}: rows {a.rows}, K {a.k}, N {a.n}; |acc| max {float(acc.abs().max()):.3g}")
    for launch in (dict(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3),
                   dict(block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=4)):
        out32 = torch.empty(a.rows, a.n, device=dev)
        grid = (triton_cdiv(a.rows, launch["block_m"]) * (a.n // launch["block_n"]),)
        _fp8_linear_relu_kernel[grid](x, x.stride(0), w, scales, bias, out32, out32.stride(0), a.rows, a.k, N=a.n,
                                      BLOCK_M=launch["block_m"], BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"],
                                      EVEN_K=True, INTERPRETED=False, num_warps=launch["num_warps"],
                                      num_stages=launch["num_stages"])
        worst(f"  {launch} GEMM+epilogue fp32 vs exact", out32, y_ref)
        out8 = torch.empty(a.rows, a.n, device=dev).to(E4M3)
        fp8_linear_relu(x, w, scales, bias, out8, **launch)
        worst("  e4m3 output vs torch's cast of the kernel's own fp32", out8, out32.to(E4M3))
        worst("  e4m3 output vs the reference", out8, y_ref.to(E4M3))
    try:
        from nvmath.linalg.advanced import Matmul, MatmulEpilog, MatmulOptions
        import nvmath
        c = torch.zeros(a.rows * a.n, dtype=torch.bfloat16, device=dev)[: a.rows * a.n].view(a.rows, a.n).t()
        mm = Matmul(w, x.t(), c=c, beta=0.0, quantization_scales={"a": 1.0, "b": scale, "d": inv},
                    options=MatmulOptions(result_type=nvmath.CudaDataType.CUDA_R_8F_E4M3))
        mm.plan(epilog=MatmulEpilog.RELU_BIAS, epilog_inputs={"bias": bias})
        outc = mm.execute().t()
        torch.cuda.synchronize()
        worst("  cuBLASLt e4m3 vs the reference", outc, y_ref.to(E4M3))
        mm.free()
    except Exception as exc:
        print(f"cuBLASLt: {type(exc).__name__}: {exc}")
    return 0


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


if __name__ == "__main__":
    raise SystemExit(main())
