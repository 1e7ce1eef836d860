"""kernels.quant_linear vs its plain-PyTorch reference, and the quantized top-MLP chain.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported, only without a GPU) at
small shapes and small tiles; the `gpu` tests run the compiled kernel at M = 262,144 with the default
Hopper tiles. Outputs are poisoned before each launch; fresh random data per run.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.quant_linear import QuantLinearError, quant_linear, quant_linear_reference, quantize_weight  # noqa: E402
from engines.int8_top_mlp import alloc_scratch, quantize_top_mlp, top_mlp_int8, top_mlp_int8_reference  # noqa: E402

SMALL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))


def _int8_layer(m: int, k: int, n: int, gen: torch.Generator, dev: str) -> dict[str, torch.Tensor]:
    x = torch.randint(0, 128, (m, k), dtype=torch.int8, generator=gen)  # post-ReLU activations
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    return {"x": x.to(dev), "weight": w.to(dev),
            "bias": (torch.randn(n, generator=gen) * 0.5).to(dev),
            "w_scale": (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(dev),
            "x_scale": torch.tensor([0.02]).to(dev)}


def _check_int8_out(got: torch.Tensor, ref: torch.Tensor, device: str) -> None:
    assert got.dtype == torch.int8 and got.shape == ref.shape
    diff = (got.cpu().int() - ref.int()).abs()
    if device == "cpu":
        assert int(diff.max()) == 0, "the interpreter runs the reference's float32 epilogue exactly"
    else:
        # Compiled code may fuse the multiply-add: a value on a rounding boundary can move by one step.
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


def _run_int8_out(m: int, k: int, n: int, device: str, config: dict | None) -> None:
    gen = _seed()
    a = _int8_layer(m, k, n, gen, device)
    inv = torch.tensor([1.0 / 0.01]).to(device)  # y reaches ~2.5: some outputs saturate
    out = torch.full((m, n), -99, dtype=torch.int8, device=device)
    quant_linear(**a, out=out, relu=True, out_inv_scale=inv, config=config)
    ref = quant_linear_reference(**a, relu=True, out_inv_scale=inv)
    assert int(ref.min()) == 0 and int(ref.max()) == 127, "data must exercise ReLU and saturation"
    _check_int8_out(out, ref, device)


@pytest.mark.parametrize("m,k,n", [(70, 64, 96), (33, 128, 32)])
def test_int8_out_matches_reference_cpu(m: int, k: int, n: int) -> None:
    _run_int8_out(m, k, n, "cpu", SMALL)


def test_int8_out_rounding_and_saturation_exact() -> None:
    # Hand-built accumulators (independent of the reference): with x = e_j and scales 1, y = W[n, j] + bias.
    k, n = 32, 32
    x = torch.eye(k, dtype=torch.int8)
    w = torch.zeros((n, k), dtype=torch.int8)
    w[0, :] = torch.arange(k, dtype=torch.int8)  # y[j, 0] = j
    bias = torch.zeros(n)
    ones = torch.ones(n)
    out = torch.empty((k, n), dtype=torch.int8)
    # y = j, times 1/2: odd j land exactly on .5 and must round up (floor(v + 0.5)), not to even.
    quant_linear(x, w, bias, ones, torch.tensor([1.0]), out, out_inv_scale=torch.tensor([0.5]), config=SMALL)
    j = np.arange(k)
    np.testing.assert_array_equal(out[:, 0].numpy(), np.floor(j * 0.5 + 0.5))
    bias[0] = 0.5
    # Saturation: y = (31 + 0.5) * 8 = 252 -> 127, never wraps to negative.
    quant_linear(x, w, bias, ones, torch.tensor([1.0]), out, out_inv_scale=torch.tensor([8.0]), config=SMALL)
    assert int(out[31, 0]) == 127 and int(out[:, 0].min()) >= 0
    assert (out[:, 1:] == 0).all(), "zero weight columns give zero"


def test_fp16_in_fp16_out_without_relu_cpu() -> None:
    gen = _seed()
    m, k, n = 45, 80, 64  # K not a multiple of BLOCK_K (masked tail), M not a multiple of BLOCK_M
    x = torch.randn(m, k, generator=gen).half()
    w = (torch.randn(n, k, generator=gen) * 0.1).half()
    bias = torch.randn(n, generator=gen)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    quant_linear(x, w, bias, None, None, out, relu=False, config=SMALL)
    ref = quant_linear_reference(x, w, bias, None, None, relu=False)
    assert (ref < 0).any(), "relu=False must keep negative values"
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)
    # Against an independent fp64 formula, too.
    torch.testing.assert_close(out.double(), x.double() @ w.double().t() + bias.double(), rtol=2e-3, atol=5e-3)


def test_final_epilogue_cpu() -> None:
    gen = _seed()
    m, k, n = 50, 64, 48  # N < BLOCK_N = 64: masked columns must contribute nothing
    a = _int8_layer(m, k, n, gen, "cpu")
    fw = torch.randn(n, generator=gen) * 0.3
    fb = torch.tensor([-0.2])
    pred = torch.full((m,), float("nan"))
    quant_linear(**a, out=pred, relu=True, final_weight=fw, final_bias=fb, config={**SMALL, "BLOCK_N": 64})
    ref = quant_linear_reference(**a, relu=True, final_weight=fw, final_bias=fb)
    hidden = torch.relu((a["x"].double() @ a["weight"].double().t()) * (0.02 * a["w_scale"].double()) + a["bias"].double())
    independent = torch.sigmoid(hidden @ fw.double() + fb.double())
    torch.testing.assert_close(pred, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(pred.double(), independent, rtol=0, atol=1e-5)


def test_argument_errors() -> None:
    a = _int8_layer(8, 32, 32, _seed(), "cpu")
    out8 = torch.empty((8, 32), dtype=torch.int8)
    with pytest.raises(QuantLinearError, match="relu=True"):
        quant_linear(**a, out=out8, relu=False, out_inv_scale=torch.tensor([1.0]))
    with pytest.raises(QuantLinearError, match="w_scale"):
        quant_linear(a["x"], a["weight"], a["bias"], None, None, out8, out_inv_scale=torch.tensor([1.0]))
    with pytest.raises(QuantLinearError, match="both be int8 or both fp16"):
        quant_linear(a["x"].half(), a["weight"], a["bias"], None, None, out8)
    with pytest.raises(QuantLinearError, match="N = 512 > 256"):
        b = _int8_layer(8, 32, 512, _seed(), "cpu")
        quant_linear(**b, out=torch.empty(8), final_weight=torch.zeros(512), final_bias=torch.zeros(1))
    with pytest.raises(QuantLinearError, match="out must be"):
        quant_linear(**a, out=torch.empty((8, 31), dtype=torch.int8), out_inv_scale=torch.tensor([1.0]))


def test_quantize_weight_per_channel() -> None:
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.01]])
    q, s = quantize_weight(w)
    np.testing.assert_allclose(s.numpy(), [1.0 / 127, 0.0, 3.0 / 127], rtol=1e-6)
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 64, 0]


def _mlp_weights(widths: list[int], in_width: int, gen: torch.Generator) -> dict[str, np.ndarray]:
    out, fan_in = {}, in_width
    for i, w in enumerate(widths):
        out[f"top_l.{2 * i}.weight"] = (torch.randn(w, fan_in, generator=gen) / fan_in ** 0.5).numpy()
        out[f"top_l.{2 * i}.bias"] = (torch.randn(w, generator=gen) * 0.05).numpy()
        fan_in = w
    return out


def _calibrated_amax(weights: dict[str, np.ndarray], x: torch.Tensor, layers: int) -> list[float]:
    act, amax = x.float(), []
    for i in range(layers - 2):
        act = torch.relu(act @ torch.from_numpy(weights[f"top_l.{2 * i}.weight"]).t()
                         + torch.from_numpy(weights[f"top_l.{2 * i}.bias"]))
        amax.append(float(act.max()))
    return amax


def _run_chain(m: int, widths: list[int], in_width: int, device: str, configs: list | None) -> None:
    gen = _seed()
    weights = _mlp_weights(widths, in_width, gen)
    x = torch.relu(torch.randn(m, in_width, generator=gen))
    amax = _calibrated_amax(weights, x[: max(8, m // 2)], len(widths))  # calibrate on part: some saturation
    q = quantize_top_mlp(weights, amax)
    top_in = torch.nn.functional.pad(x, (0, q.in_width_padded - in_width)).half()
    ref = top_mlp_int8_reference(q, top_in)
    qd = q.to(device)
    scratch = alloc_scratch(qd, m + 5, device).fill_(-1)
    pred = top_mlp_int8(qd, top_in.to(device), scratch=scratch, configs=configs).cpu()
    # Predictions may differ where an activation sits on a rounding boundary (fp32 sums in a different
    # order in layer 1); a one-step move at the scale of these layers stays far below 1e-2.
    assert pred.shape == (m,) and torch.isfinite(pred).all()
    assert float((pred - ref).abs().max()) < 1e-2
    fp32 = torch.from_numpy(_fp32_chain(weights, x.numpy()))
    assert float((ref - fp32).abs().max()) < 0.1, "the int8 chain must track the fp32 MLP"


def _fp32_chain(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    layers = len([k for k in weights if k.endswith(".weight")])
    for i in range(layers):
        x = x @ weights[f"top_l.{2 * i}.weight"].T + weights[f"top_l.{2 * i}.bias"]
        if i < layers - 1:
            x = np.maximum(x, 0)
    return 1 / (1 + np.exp(-x.reshape(-1)))


def test_top_mlp_chain_cpu() -> None:
    cfg = [SMALL, SMALL, SMALL, {**SMALL, "BLOCK_N": 32}]
    _run_chain(37, [64, 64, 32, 32, 1], 79, "cpu", cfg)


def test_quantize_top_mlp_needs_calibration() -> None:
    weights = _mlp_weights([64, 64, 32, 32, 1], 79, _seed())
    with pytest.raises(QuantLinearError, match="top_l.6"):
        quantize_top_mlp(weights, {"top_l.2": 1.0, "top_l.4": 2.0})
    with pytest.raises(QuantLinearError, match="positive"):
        quantize_top_mlp(weights, [1.0, 0.0, 1.0])
    q = quantize_top_mlp(weights, {"top_l.2": 1.0, "top_l.4": 2.0, "top_l.6": 4.0})
    assert q.in_width_padded == 80 and q.widths == [64, 64, 32, 32]
    assert float(q.x_scales[2]) == pytest.approx(4.0 / 127) and float(q.inv_scales[0]) == pytest.approx(127.0)


@pytest.mark.gpu
def test_layers_full_shapes_gpu() -> None:
    m = 262_144
    for k, n in ((1024, 1024), (1024, 512)):
        _run_int8_out(m, k, n, "cuda", None)
    gen = _seed()
    a = _int8_layer(m, 512, 256, gen, "cuda")
    fw, fb = (torch.randn(256, generator=gen) * 0.1).cuda(), torch.tensor([0.1]).cuda()
    pred = torch.empty(m, device="cuda")
    quant_linear(**a, out=pred, final_weight=fw, final_bias=fb)
    ref = quant_linear_reference(**a, final_weight=fw, final_bias=fb)
    torch.testing.assert_close(pred.cpu(), ref, rtol=0, atol=1e-5)
    x = torch.randn(m, 480, generator=gen).half().cuda()
    w = (torch.randn(1024, 480, generator=gen) * 0.05).half().cuda()
    b = torch.randn(1024, generator=gen).cuda()
    out = torch.empty((m, 1024), dtype=torch.float16, device="cuda")
    quant_linear(x, w, b, None, None, out, relu=False)
    torch.testing.assert_close(out.cpu().float(), quant_linear_reference(x, w, b, None, None, relu=False).float(),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_top_mlp_chain_full_shapes_gpu() -> None:
    _run_chain(262_144 - 3, [1024, 1024, 512, 256, 1], 479, "cuda", None)
