"""int8 (or fp16) linear layer on the tensor cores with the whole epilogue fused: y = x @ W^T.

Why (docs/GPU_NOTES.md, issue 4): the fp16 top MLP runs near the fp16 ceiling; Hopper's int8 tensor cores
are twice that, but `torch._int_mm` is slow and `torch._scaled_mm` has no ReLU/requantize epilogue (each
extra elementwise pass over [262144, 1024] costs ~0.2 ms). So one kernel does, per output tile:
int32 (int8 in) or fp32 (fp16 in) accumulation, dequantization acc * x_scale * w_scale[n], bias, ReLU,
then one of: requantize to int8 with a static (calibrated) activation scale, store fp16, or FINAL:
the dot of each full row with the last layer's 1-wide weight plus sigmoid (fuses the top MLP's
512->256->1 tail: the [M, 256] activation never reaches memory).

Scales are device tensors read in the kernel (no host sync: the launch is captured in CUDA graphs).
`quant_linear_reference` is the plain-PyTorch oracle (exact int64 / float64 accumulation).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

OUT_HALF = 0
OUT_INT8 = 1
OUT_FINAL = 2

# Hopper starting points (the bench sweeps around them): the int8 tile moves the same bytes per k-step
# as the fp16 tile with half the BLOCK_K.
DEFAULT_INT8 = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
DEFAULT_FP16 = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


class QuantLinearError(ValueError):
    """Bad shapes, dtypes, devices or options for quant_linear; the message says which."""


@triton.jit
def _quant_linear_kernel(
    x_ptr, w_ptr, bias_ptr, w_scale_ptr, x_scale_ptr, out_ptr, out_inv_ptr, fw_ptr, fb_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IS_INT8: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr, OUT_MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles sweep all column tiles together, so their x tiles stay in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped row/column indices: loads need no M/N masks (out-of-range rows compute garbage that is
    # never stored), which keeps the inner loop's loads unpredicated.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :]
    # W is [N, K] row-major: the [BLOCK_K, BLOCK_N] tile of W^T is read through the strides, no copy.
    w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None]
    if IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        if IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    n_ok = offs_n < N
    y = acc.to(tl.float32)
    if HAS_SCALE:
        x_scale = tl.load(x_scale_ptr)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
        y = y * (x_scale * w_scale)[None, :]
    bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
    y = y + bias[None, :]
    if RELU:
        y = tl.maximum(y, 0.0)
    m_ok = offs_m < M
    if OUT_MODE == 2:
        # FINAL: the whole row is in this program (BLOCK_N >= N, one column tile); masked columns
        # carry weight 0.
        fw = tl.load(fw_ptr + offs_n, mask=n_ok, other=0.0)
        logit = tl.sum(y * fw[None, :], axis=1) + tl.load(fb_ptr)
        pred = 1.0 / (1.0 + tl.exp(-logit))
        tl.store(out_ptr + offs_m, pred, mask=m_ok)
    else:
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if OUT_MODE == 1:
            # y >= 0 after the ReLU, so round-half-up is floor(v + 0.5) and only the top needs a clamp.
            q = tl.minimum(tl.floor(y * tl.load(out_inv_ptr) + 0.5), 127.0)
            tl.store(o_ptrs, q.to(tl.int8), mask=mask)
        else:
            tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_vec(name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device) -> None:
    if t is None:
        raise QuantLinearError(f"{name} is required")
    if t.dtype != dtype or t.numel() != n or t.device != device or not t.is_contiguous():
        raise QuantLinearError(f"{name} must be contiguous {dtype} [{n}] on {device}, got "
                               f"{t.dtype} {list(t.shape)} on {t.device}")


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, w_scale: torch.Tensor | None,
              x_scale: torch.Tensor | None, out: torch.Tensor, relu: bool, out_inv_scale: torch.Tensor | None,
              final_weight: torch.Tensor | None, final_bias: torch.Tensor | None) -> int:
    """The output mode, after checking every argument (the kernel itself checks nothing)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise QuantLinearError(f"x [M, K] and weight [N, K] needed, got {list(x.shape)} and {list(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.int8, torch.float16):
        raise QuantLinearError(f"x and weight must both be int8 or both fp16, got {x.dtype} and {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise QuantLinearError("x and weight need contiguous rows (stride 1 along K)")
    dev = x.device
    if weight.device != dev or out.device != dev:
        raise QuantLinearError(f"x, weight and out must share a device: {dev}, {weight.device}, {out.device}")
    m, k = x.shape
    n = weight.shape[0]
    _check_vec("bias", bias, n, torch.float32, dev)
    if x.dtype == torch.int8 or w_scale is not None or x_scale is not None:
        _check_vec("w_scale", w_scale, n, torch.float32, dev)
        _check_vec("x_scale", x_scale, 1, torch.float32, dev)
    if final_weight is not None or final_bias is not None:
        _check_vec("final_weight", final_weight, n, torch.float32, dev)
        _check_vec("final_bias", final_bias, 1, torch.float32, dev)
        if out_inv_scale is not None:
            raise QuantLinearError("FINAL output takes no out_inv_scale")
        if n > 256:
            raise QuantLinearError(f"FINAL needs the whole row in one program: N = {n} > 256")
        if out.dtype != torch.float32 or out.shape != (m,):
            raise QuantLinearError(f"FINAL out must be float32 [{m}], got {out.dtype} {list(out.shape)}")
        return OUT_FINAL
    if out.dim() != 2 or out.shape != (m, n) or out.stride(1) != 1:
        raise QuantLinearError(f"out must be [{m}, {n}] with contiguous rows, got {list(out.shape)}")
    if out_inv_scale is not None:
        if not relu:
            raise QuantLinearError("int8 output needs relu=True (the rounding assumes y >= 0)")
        if out.dtype != torch.int8:
            raise QuantLinearError(f"out_inv_scale given: out must be int8, got {out.dtype}")
        _check_vec("out_inv_scale", out_inv_scale, 1, torch.float32, dev)
        return OUT_INT8
    if out.dtype != torch.float16:
        raise QuantLinearError(f"out must be fp16 (or int8 with out_inv_scale, or FINAL), got {out.dtype}")
    return OUT_HALF


def default_config(dtype: torch.dtype, n: int, final: bool) -> dict[str, int]:
    cfg = dict(DEFAULT_INT8 if dtype == torch.int8 else DEFAULT_FP16)
    if final:
        cfg["BLOCK_N"] = max(16, triton.next_power_of_2(n))
    return cfg


def quant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, w_scale: torch.Tensor | None,
    x_scale: torch.Tensor | None, out: torch.Tensor, *, relu: bool = True,
    out_inv_scale: torch.Tensor | None = None, final_weight: torch.Tensor | None = None,
    final_bias: torch.Tensor | None = None, config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """out = epilogue(x @ weight^T); returns out.

    x [M, K] int8 with weight [N, K] int8 (per-channel w_scale fp32 [N], per-tensor x_scale fp32 [1],
    both device tensors), or x and weight fp16 (scales None or ones). bias fp32 [N].
    y = acc * x_scale * w_scale[n] + bias[n], then ReLU if `relu`, then:
    out int8 [M, N] with out_inv_scale (fp32 [1] = 1/out_scale): min(floor(y * inv + 0.5), 127);
    out fp16 [M, N]; or FINAL (final_weight fp32 [N], final_bias fp32 [1], N <= 256):
    out fp32 [M] = sigmoid(y @ final_weight + final_bias).
    `config`: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages (defaults: default_config).
    """
    mode = _validate(x, weight, bias, w_scale, x_scale, out, relu, out_inv_scale, final_weight, final_bias)
    m, k = x.shape
    n = weight.shape[0]
    cfg = default_config(x.dtype, n, mode == OUT_FINAL)
    if config:
        cfg.update(config)
    if mode == OUT_FINAL and cfg["BLOCK_N"] < n:
        raise QuantLinearError(f"FINAL needs BLOCK_N >= N = {n}, config has {cfg['BLOCK_N']}")
    if m == 0:
        return out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    has_scale = w_scale is not None
    dummy = bias  # never read where the matching constexpr switches it off
    _quant_linear_kernel[grid](
        x, weight, bias, w_scale if has_scale else dummy, x_scale if has_scale else dummy, out,
        out_inv_scale if out_inv_scale is not None else dummy,
        final_weight if final_weight is not None else dummy, final_bias if final_bias is not None else dummy,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0) if mode != OUT_FINAL else 1,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        IS_INT8=x.dtype == torch.int8, HAS_SCALE=has_scale, RELU=relu, OUT_MODE=mode,
        EVEN_K=k % cfg["BLOCK_K"] == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def quant_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, w_scale: torch.Tensor | None,
    x_scale: torch.Tensor | None, out: torch.Tensor | None = None, *, relu: bool = True,
    out_inv_scale: torch.Tensor | None = None, final_weight: torch.Tensor | None = None,
    final_bias: torch.Tensor | None = None, config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The same semantics in plain PyTorch on the CPU: exact integer (int8) or float64 (fp16) accumulation,
    the epilogue in float32 in the kernel's order. Returns a new CPU tensor (int8/fp16 [M, N] or fp32 [M]);
    `out` and `config` are accepted for signature parity and ignored."""
    xc, wc = x.cpu(), weight.cpu()
    if xc.dtype == torch.int8:
        # Exact integer sums through BLAS: every partial sum is an integer below K * 127 * 127, exact in
        # float32 up to 2^24 (K <= 1040) and in float64 beyond; then int32 -> fp32 like the kernel.
        exact = torch.float32 if xc.shape[1] * 127 * 127 < 2 ** 24 else torch.float64
        acc = (xc.to(exact) @ wc.to(exact).t()).to(torch.float32)
    else:
        acc = (xc.double() @ wc.double().t()).to(torch.float32)
    y = acc
    if w_scale is not None:
        assert x_scale is not None  # _validate: int8 inputs come with both scales
        y = y * (x_scale.cpu().float() * w_scale.cpu().float())[None, :]
    y = y + bias.cpu().float()[None, :]
    if relu:
        y = torch.clamp_min(y, 0.0)
    if final_weight is not None:
        assert final_bias is not None
        logit = (y.double() @ final_weight.cpu().double()).float() + final_bias.cpu().float()
        return torch.sigmoid(logit)
    if out_inv_scale is not None:
        return torch.clamp_max(torch.floor(y * out_inv_scale.cpu().float() + 0.5), 127.0).to(torch.int8)
    return y.to(torch.float16)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel symmetric int8: (q int8 [N, K], scale fp32 [N]); an all-zero row gets scale 0."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale
