"""The DLRM top MLP in fp8 e4m3 on Hopper's tensor cores: cuBLASLt GEMMs with the epilogue fused.

Why (issue 13, docs/GPU_NOTES.md): the fp16 top MLP took 1.75 ms of a 3 ms batch of 262,144 pairs; fp8
GEMMs run near twice the fp16 rate, but only with the epilogue (bias, ReLU, the scale and cast to fp8
for the next layer) fused, which cuBLASLt does (through nvmath-python, an optional GPU extra).

The arithmetic (`fp8_top_mlp_reference` is the same in plain PyTorch, on any device):
    x0 = e4m3(clamp(top_in / s0))                     the interaction output, written by the gather kernel
    for the fp8 GEMM layers i = 0 .. L-2:
        y  = relu((x_i @ W_i^T) * (s_i * w_i) + b_i)     W_i e4m3 with one scale w_i = amax|W_i| / 448
        x_{i+1} = e4m3(clamp(y / s_{i+1}))              but the last GEMM layer's y stays bf16
    prediction = sigmoid(y_{L-2} @ w_last + b_last)     the 1-wide last layer in fp32 accumulation
with static per-tensor activation scales s_i = amax_i / 448 from the artifact's calibration.json
(`dlrm-prepare calibrate`: "top_l.0" is the top input's magnitude, "top_l.2".. the ReLU outputs).
e4m3 saturates at +-448 here (clamped), never overflows to NaN.

`Fp8TopMlpRunner` runs it on a GPU: one nvmath `Matmul` per layer and batch size, planned once, with
the GEMM computed as D = W @ X^T so that each layer's output (column-major [N, M]) is the next layer's
input as cuBLASLt wants it, and a bf16 C (beta 0) so that cuBLASLt accepts a bias with fp8 output.
Capturable in a CUDA graph: each layer's result, allocated in the graph's pool, is handed to the next
layer's Matmul during the capture (reset_operands only changes host-side pointers). A layer may run in
Triton instead (kernels/fp8_linear.py, the same arithmetic with its epilogue fused), where the stage probe
measured it faster; without nvmath every layer runs in Triton (the DLRM widths fit its kernels).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import numpy as np
import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# nvmath logs each plan's specification at INFO to the logger it is given (the root logger by default):
# some thirty lines per layer and graph size at every engine start. Ours passes only its warnings on.
NVMATH_LOG = logging.getLogger("dlrm.engine.nvmath")
NVMATH_LOG.setLevel(logging.WARNING)
# The fp8-output layers that run in Triton (kernels/fp8_linear.py) where nvmath is installed, and the
# kernel's launch shape: chosen by bench/stage_probe.py's per-layer timings (BENCHMARKS.md).
TRITON_LAYERS: frozenset[int] = frozenset()
TRITON_LINEAR_LAUNCH: dict[str, int] = dict(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3)
TRITON_LINEAR_LAUNCH_BY_LAYER: dict[int, dict[str, int]] = {}


class Fp8MlpError(ValueError):
    """The fp8 top MLP cannot be built (no calibration of the top input, no nvmath, ...)."""


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to float8 e4m3 (torch's own cast would give NaN past 448)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


@dataclass
class Fp8TopMlp:
    in_width: int  # the interaction width (479)
    weights: list[torch.Tensor]  # e4m3 [N_i, K_i] row-major, layer 0's K padded to a multiple of 16
    w_scales: list[float]  # per tensor
    biases: list[torch.Tensor]  # bf16 [N_i]
    x_scales: list[float]  # scale of each fp8 GEMM layer's input (s_0 .. s_{L-2})
    final_weight: torch.Tensor  # fp32 [N_{L-2}]
    final_bias: float

    @property
    def in_width_padded(self) -> int:
        return int(self.weights[0].shape[1])

    def to(self, device: torch.device | str) -> "Fp8TopMlp":
        return Fp8TopMlp(self.in_width, [w.to(device) for w in self.weights], self.w_scales,
                         [b.to(device) for b in self.biases], self.x_scales, self.final_weight.to(device),
                         self.final_bias)


def fp8_amax(calibration: Any, layers: int) -> list[float]:
    """amax of each fp8 GEMM layer's input: "top_l.0" (the top input), "top_l.2", .. from a Calibration."""
    amax = getattr(calibration, "amax", calibration)
    keys = [f"top_l.{2 * i}" for i in range(layers)]
    if not isinstance(amax, Mapping) or any(k not in amax for k in keys):
        have = sorted(amax) if isinstance(amax, Mapping) else amax
        raise Fp8MlpError(f"the fp8 top MLP needs calibrated amax for {keys}, have {have}: run "
                          "`dlrm-prepare calibrate` again (calibrations before 2026-12 lack top_l.0)")
    values = [float(amax[k]) for k in keys]
    if not all(np.isfinite(a) and a > 0 for a in values):
        raise Fp8MlpError(f"fp8 amax values must be finite and positive, got {values}")
    return values


def quantize_fp8_top_mlp(weights: Mapping[str, Any], calibration: Any) -> Fp8TopMlp:
    """Fp8TopMlp (on the CPU) from the fp32 `top_l.{2i}.{weight,bias}` arrays and the calibration."""
    def get(key: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(weights[key], dtype=np.float32))

    layers = sum(1 for k in weights if k.startswith("top_l.") and k.endswith(".weight"))
    last = layers - 1
    if layers < 2 or get(f"top_l.{2 * last}.weight").shape[0] != 1:
        raise Fp8MlpError(f"need a top MLP of >= 2 layers ending 1 wide, got {layers} layers")
    amax = fp8_amax(calibration, last)
    qs, ws, bs = [], [], []
    in_width = int(get("top_l.0.weight").shape[1])
    for i in range(last):
        w = get(f"top_l.{2 * i}.weight")
        if i == 0:
            w = torch.nn.functional.pad(w, (0, (in_width + 15) // 16 * 16 - in_width))
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise Fp8MlpError(f"fp8 GEMMs need dimensions divisible by 16, layer {i} is {list(w.shape)}")
        scale = float(w.abs().max()) / E4M3_MAX or 1.0
        qs.append(e4m3(w / scale).contiguous())
        ws.append(scale)
        bs.append(get(f"top_l.{2 * i}.bias").to(torch.bfloat16))
    return Fp8TopMlp(in_width=in_width, weights=qs, w_scales=ws, biases=bs, x_scales=[a / E4M3_MAX for a in amax],
                     final_weight=get(f"top_l.{2 * last}.weight").reshape(-1).contiguous(),
                     final_bias=float(get(f"top_l.{2 * last}.bias").reshape(-1)[0]))


def quantize_top_input(q: Fp8TopMlp, top_in: torch.Tensor) -> torch.Tensor:
    """The fp8 top input as the gather kernel writes it: e4m3(top_in / s_0), zero padding columns."""
    x = torch.nn.functional.pad(top_in.float(), (0, q.in_width_padded - top_in.shape[1]))
    return e4m3(x / q.x_scales[0])


def fp8_top_mlp_reference(q: Fp8TopMlp, x0: torch.Tensor) -> torch.Tensor:
    """Predictions fp32 [M] from the fp8 top input x0 (e4m3 [M, in_width_padded]), in plain PyTorch
    with fp32 accumulation: what the cuBLASLt chain computes, up to accumulation order."""
    x = x0
    n = len(q.weights)
    y = torch.empty(0)
    for i in range(n):
        acc = (x.float() @ q.weights[i].float().t()) * (q.x_scales[i] * q.w_scales[i]) + q.biases[i].float()
        y = torch.relu(acc)
        if i < n - 1:
            x = e4m3(y / q.x_scales[i + 1])
    y = y.to(torch.bfloat16).float()  # the last GEMM layer's output is bf16
    return torch.sigmoid(y @ q.final_weight.float() + q.final_bias)


def _on(stream: torch.cuda.Stream | None) -> Any:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class Fp8TopMlpRunner:
    """The fp8 top MLP on one CUDA device through nvmath-python's cuBLASLt matmul (see the module doc).

    `forward(x0, pred, stream)` computes predictions for the rows of x0 (a view of a preallocated fp8
    buffer: its pointer must be the same at every call for a given row count, as in the engine)."""

    def __init__(self, q: Fp8TopMlp, max_rows: int, device: torch.device, autotune_rows: int | None = None,
                 fused_tail: bool = True, triton_layers: Collection[int] | None = None,
                 triton_launch: Mapping[int, Mapping[str, int]] | None = None) -> None:
        self.q = q.to(device)
        self.device = device
        widths = [int(w.shape[0]) for w in self.q.weights]
        # The last GEMM layer and the 1-wide layer in one Triton kernel (kernels/fp8_mlp_tail.py): the
        # bf16 [M, 256] hidden output never goes to device memory. Where its shape does not fit the
        # kernel (N a power of two, K a multiple of 128), the cuBLASLt chain does both.
        n_tail, k_tail = (int(v) for v in self.q.weights[-1].shape)
        self.fused_tail = (fused_tail and len(self.q.weights) > 1 and n_tail & (n_tail - 1) == 0
                           and k_tail % 128 == 0)
        self._tail_scale = torch.tensor([self.q.x_scales[-1] * self.q.w_scales[-1]], dtype=torch.float32,
                                        device=device)
        # The fp8-output layers that run in Triton (kernels/fp8_linear.py) instead of cuBLASLt; the others
        # through nvmath. Without nvmath every layer that the Triton kernels can take runs in Triton.
        by_layer = TRITON_LINEAR_LAUNCH_BY_LAYER if triton_launch is None else triton_launch
        fp8_out = range(len(self.q.weights) - 1)
        self.launch = {i: dict(by_layer.get(i, TRITON_LINEAR_LAUNCH)) for i in fp8_out}
        fits = [i for i in fp8_out if widths[i] % self.launch[i]["block_n"] == 0]
        try:
            import nvmath  # noqa: F401  (an optional GPU extra)
            nvmath_error = None
        except ImportError as exc:
            nvmath_error = exc
        if triton_layers is None:
            triton_layers = TRITON_LAYERS if nvmath_error is None else fits
        bad = sorted(set(triton_layers) - set(fits))
        if bad:
            raise Fp8MlpError(f"fp8 layers {bad} cannot run in the Triton kernel (launch {self.launch}, "
                              f"widths {widths})")
        self.triton_layers = frozenset(triton_layers)
        self.needs_nvmath = not self.fused_tail or len(self.triton_layers) < len(self.q.weights) - 1
        if self.needs_nvmath and nvmath_error is not None:
            raise Fp8MlpError(f"gpu_mlp_precision fp8 needs nvmath-python (pip install 'dlrm-daemon[gpu]') "
                              f"for these layer shapes: {nvmath_error}")
        self._lin_scales = {i: torch.tensor([self.q.x_scales[i] * self.q.w_scales[i], 1.0 / self.q.x_scales[i + 1]],
                                            dtype=torch.float32, device=device) for i in self.triton_layers}
        # Two ping-pong buffers for the Triton layers' outputs (fixed addresses: graphs replay them).
        act_width = max((widths[i] for i in self.triton_layers), default=0)
        self._act = [torch.empty((max_rows, act_width), dtype=E4M3, device=device) for _ in range(2)] \
            if act_width else []
        # One bf16 C for every cuBLASLt layer (beta 0: cuBLASLt does not read it; a C is what lets it take
        # a bias with fp8 output), and the last layer as a 16-row GEMM (fp8 and cuBLASLt want multiples
        # of 16).
        self._c = torch.zeros(max_rows * max(widths) if self.needs_nvmath else 0, dtype=torch.bfloat16,
                              device=device)
        last_k = widths[-1]
        self._w_last = torch.zeros((16, last_k), dtype=torch.bfloat16, device=device)
        self._w_last[0] = self.q.final_weight.to(torch.bfloat16)
        self._b_last = torch.zeros(16, dtype=torch.float32, device=device)
        self._b_last[0] = self.q.final_bias
        self._plans: dict[int, list[Any]] = {}
        # From this many rows up, each layer's plan times cuBLASLt's candidate algorithms once and keeps
        # the fastest (nvmath's autotune; a few ms a layer), instead of taking the heuristic's first.
        self.autotune_rows = autotune_rows

    def _c_view(self, n_out: int, m: int) -> torch.Tensor:
        return self._c[: m * n_out].view(m, n_out).t()  # column-major [n_out, m]

    def _plan(self, x0: torch.Tensor) -> list[Any]:
        """One step per layer: an nvmath Matmul, or the index of a layer that runs in Triton."""
        m = int(x0.shape[0])
        q = self.q
        steps: list[Any] = []
        b: torch.Tensor = x0.t()  # column-major [K0, m]
        last = len(q.weights) - 1
        for i, w in enumerate(q.weights[:last] if self.fused_tail else q.weights):
            n_out = int(w.shape[0])
            fp8_out = i < last
            if i in self.triton_layers:
                steps.append(i)
            else:
                steps.append(self._matmul(i, b, m, fp8_out))
            # the next layer's B: this layer's output, column-major [n_out, m] (a stand-in until run)
            b = torch.empty((m, n_out), dtype=E4M3 if fp8_out else torch.bfloat16, device=self.device).t()
        if self.fused_tail:
            return steps
        import nvmath
        from nvmath.linalg.advanced import Matmul, MatmulEpilog, MatmulOptions

        mm = Matmul(self._w_last, b, options=MatmulOptions(result_type=nvmath.CudaDataType.CUDA_R_32F,
                                                           logger=NVMATH_LOG))
        mm.plan(epilog=MatmulEpilog.BIAS, epilog_inputs={"bias": self._b_last})
        steps.append(mm)
        return steps

    def _matmul(self, i: int, b: torch.Tensor, m: int, fp8_out: bool) -> Any:
        import nvmath
        from nvmath.linalg.advanced import Matmul, MatmulEpilog, MatmulOptions

        q = self.q
        w = q.weights[i]
        n_out = int(w.shape[0])
        cuda = nvmath.CudaDataType
        scales = {"a": q.w_scales[i], "b": q.x_scales[i]}
        if fp8_out:
            scales["d"] = 1.0 / q.x_scales[i + 1]
        opts = MatmulOptions(result_type=cuda.CUDA_R_8F_E4M3 if fp8_out else cuda.CUDA_R_16BF, logger=NVMATH_LOG)
        mm = Matmul(w, b, c=self._c_view(n_out, m), beta=0.0, quantization_scales=scales, options=opts)
        mm.plan(epilog=MatmulEpilog.RELU_BIAS, epilog_inputs={"bias": q.biases[i]})
        if self.autotune_rows is not None and m >= self.autotune_rows:
            mm.autotune(iterations=3)
        return mm

    def forward(self, x0: torch.Tensor, pred: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """pred[:M] for the M rows of x0 on `stream` (None: the current one; on the CPU only Triton's
        interpreter can run it, with every layer in Triton)."""
        from kernels.fp8_linear import fp8_linear_relu
        from kernels.fp8_mlp_tail import fp8_mlp_tail

        m = int(x0.shape[0])
        steps = self._plans.get(m)
        if steps is None:
            steps = self._plans[m] = self._plan(x0)
        q = self.q
        y = x0.t()  # each layer's output as the next one's B: column-major [width, m]
        for j, step in enumerate(steps):
            if isinstance(step, int):
                n_out = int(q.weights[step].shape[0])
                out = self._act[j % 2][:m, :n_out]
                with _on(stream):
                    fp8_linear_relu(y.t(), q.weights[step], self._lin_scales[step], q.biases[step], out,
                                    **self.launch[step])
                y = out.t()
            else:
                if j > 0:  # the first layer's B is x0 itself, planned with it
                    step.reset_operands(b=y)
                y = step.execute(stream=stream)
        if self.fused_tail:
            with _on(stream):  # y: the last fp8 layer's output, column-major [K, m]
                fp8_mlp_tail(y.t(), q.weights[-1], self._tail_scale, q.biases[-1], q.final_weight, q.final_bias,
                             pred[:m])
            return
        torch.sigmoid(y[0], out=pred[:m])  # row 0 of the 16-row last layer; its bias is in the epilogue

    def close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for mms in self._plans.values():
            for mm in mms:
                if isinstance(mm, int):  # a Triton layer: nothing to free
                    continue
                # Its last compute event may have been recorded inside a graph capture, which no stream
                # may wait on afterwards; the device is idle (synchronized above), so nothing is pending.
                mm.last_compute_event = None
                mm.free()
        self._plans.clear()
