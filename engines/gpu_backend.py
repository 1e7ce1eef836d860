"""GPU engine backend: int8 hot/cold embeddings, Triton gather + interaction, half-precision MLPs, CUDA graphs.

Placement (REFERENCE "Quantization and placement"): rows [0, n_hot) of the frequency-ordered artifact go to
device memory, the rest to pinned host memory that the gather kernel reads zero-copy; the remap table
(row_position) lives on the device. By-reference datasets are copied to the device once at registration
(NVIDIA's "start_from_device") with their ids already remapped to file positions (kernels.pair_rows), so
a by-reference batch moves only its ranges over PCIe and the forward's gather does no remap load; a
by-value batch is remapped (and its ids checked) on the device right after its copy.

One forward: bottom MLP (cuBLAS, bias+ReLU in the GEMM epilogue, fp16/bf16) -> gather of all 26
lookups and the dot interaction, fused in one kernel (kernels.gather_interaction; or, with
fused_gather=False, kernels.embedding_gather into an fp16 [B,26,128] buffer then kernels.dot_interaction),
written straight into the top-MLP input (512 wide: zero columns after the 479 values meet zero columns
of the first top weight, so every GEMM has aligned K) -> top MLP (fp16/bf16 cuBLAS, or the int8 Triton
chain of kernels.quant_linear) -> sigmoid. Fixed batch sizes are captured as CUDA graphs; a batch is
padded up to the next captured size (padding rows are zeroed positions, a valid row; the hot-lookup
count is limited to the real rows in the kernel).

Pipelining (engines/gpu_staging.py): submit_by_ref/submit_by_value enqueue a batch and return at once;
up to `inflight` batches are in flight, each with its own staging set. Input copies run on a copy
stream, the forward and the small prediction copy on the compute stream, so the host prepares batch
i+1 while the GPU computes batch i. By reference only the ranges (start, count) cross PCIe; they are
expanded to pair indices on the device. The engine's shared-memory region is page-locked
(pin_host_memory), so by-value inputs and all predictions move by DMA with no host copy.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engines.backend import BatchStats
from formats.pairs import check_ranges, pair_index
from engines.cold_rows import ColdLookups, gather_rows
from engines.gpu_staging import GpuPending, HostRegistry, InFlight, StagingSet, Ticket
from engines.host_rows import shared_cold_rows
from engines.placement import Placement
from formats.artifact import Artifact
from formats.dataset import Dataset
from formats.kernel_tuning import KernelTuningError, read_kernel_tuning
from kernels.bottom_mlp import bottom_mlp, fits as bottom_mlp_fits
from kernels.cold_stage import stage_cold_rows
from kernels.dot_interaction import dot_interaction
from kernels.embedding_gather import embedding_gather
from kernels.gather_interaction import gather_interaction, new_counts
from kernels.pair_rows import gather_pair_rows, remap_ids
from engines.fp8_top_mlp import Fp8MlpError, Fp8TopMlpRunner, quantize_fp8_top_mlp
from engines.int8_top_mlp import QuantTopMlp, alloc_scratch, quantize_top_mlp, top_mlp_int8

_CHUNK_ROWS = 1 << 21  # 256 MiB of int8 rows per host->device / host->pinned copy step
_GATHER_THREADS = 4  # cold_gather "host": threads that copy a batch's cold rows (numpy's take frees the GIL)


class GpuBackendError(RuntimeError):
    """A GPU engine that cannot load or serve (the message says what and where)."""


@dataclass
class _DeviceDataset:
    dense: torch.Tensor  # [N, dense_width] in the model dtype (zero padding columns) on the device
    positions: torch.Tensor  # int32 [N, 26]: file positions of the lookups (ids remapped at registration)
    num_pairs: int
    cold: ColdLookups | None = None  # its cold lookups, on the host (cold_gather "host")


@dataclass
class _ColdStage:
    """One staging set's share of the cold-row stage (cold_gather "host"): `capacity` device rows at
    hot[base:], the pinned host rows and batch places that fill them, and the positions that point there."""

    base: int
    rows_host: torch.Tensor  # int8 [capacity, D], pinned
    flat_host: torch.Tensor  # int64 [capacity], pinned: batch_row * tables + table of each staged lookup
    flat_dev: torch.Tensor  # int64 [capacity]
    slots_dev: torch.Tensor  # int32 [capacity]: base + i, the position the i-th staged lookup gets


@dataclass
class LoadTimes:
    """Seconds spent loading, for the notes and the benchmark."""

    hot_s: float = 0.0
    cold_s: float = 0.0
    remap_s: float = 0.0
    graphs_s: float = 0.0
    datasets_s: dict[str, float] = field(default_factory=dict)


def default_graph_sizes(max_batch_pairs: int) -> list[int]:
    """Powers of two from 512 up to max_batch_pairs (itself included): padding wastes at most half."""
    sizes = [s for s in (1 << k for k in range(9, 31)) if s < max_batch_pairs]
    return sizes + [max_batch_pairs]


class GpuBackend:
    """EngineBackend on one CUDA device (see engines/backend.py)."""

    def __init__(
        self,
        device: str,
        artifact: Path | str | Artifact,
        gpu_part: float = 1.0,
        max_batch_pairs: int = 65536,
        dtype: torch.dtype = torch.float16,
        graph_sizes: Sequence[int] | None = None,
        fused_relu: bool = True,
        fused_gather: bool = True,
        kernel_config: dict[str, Any] | None = None,
        inflight: int = 4,
        mlp_precision: str | None = None,
        top_configs: Sequence[dict[str, int] | None] | None = None,
        fused_bottom: bool = True,
        host_rows: str = "private",
        cold_gather: str = "kernel",
        cold_stage_rows: int | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise GpuBackendError(f"{device}: CUDA is not available on this machine")
        self.device = device
        self._dev = torch.device(device)
        if self._dev.type != "cuda":
            raise GpuBackendError(f"GpuBackend needs a cuda:N device, got {device!r}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise GpuBackendError(f"dtype must be float16 or bfloat16, got {dtype}")
        if mlp_precision is None:
            mlp_precision = "fp16" if dtype == torch.float16 else "bf16"
        if mlp_precision not in ("int8", "fp16", "bf16", "fp8"):
            raise GpuBackendError(f"mlp_precision must be fp16, bf16, int8 or fp8, got {mlp_precision!r}")
        if mlp_precision in ("fp16", "bf16"):
            dtype = torch.float16 if mlp_precision == "fp16" else torch.bfloat16
        if max_batch_pairs < 1:
            raise GpuBackendError(f"max_batch_pairs must be positive, got {max_batch_pairs}")
        self.dtype = dtype
        self.fused_relu = fused_relu
        self.fused_gather = fused_gather
        self.fused_bottom = fused_bottom  # the bottom MLP in one Triton kernel (kernels/bottom_mlp.py)
        if host_rows not in ("private", "shared"):
            raise GpuBackendError(f"host_rows must be private or shared, got {host_rows!r}")
        self.host_rows = host_rows  # cold rows: a pinned copy of this engine's, or the file's pages (host_rows.py)
        if cold_gather not in ("kernel", "host"):
            raise GpuBackendError(f"cold_gather must be kernel or host, got {cold_gather!r}")
        # Where a by-reference batch's cold rows come from: the fused kernel reads them from host memory
        # (zero-copy, "kernel"), or the CPU gathers them and one copy puts them on the device first
        # ("host", engines/cold_rows.py; by-value batches always take the kernel's way).
        self.cold_gather = cold_gather
        # gather_interaction launch parameters (pairs_per_program, pairs_per_tile, num_warps, gram, prefetch);
        # fp8_linear: {layer: launch} for fp8 top-MLP layers to run in Triton (kernels/fp8_linear.py's
        # launch parameters) instead of the default (engines/fp8_top_mlp.py). Where the artifact keeps
        # measured choices for this card (formats/kernel_tuning.py), they are the defaults and
        # kernel_config's own keys win over them.
        art = artifact if isinstance(artifact, Artifact) else Artifact.open(Path(artifact))
        try:
            tuned = read_kernel_tuning(art.path, torch.cuda.get_device_name(self._dev)) or {}
        except KernelTuningError as exc:
            raise GpuBackendError(str(exc)) from exc
        self.tuned_keys = sorted(set(tuned) - set(kernel_config or {}))  # what the artifact's tuning set
        self.kernel_config = {**tuned, **dict(kernel_config or {})}
        unknown = set(self.kernel_config) - {"pairs_per_program", "pairs_per_tile", "num_warps", "gram", "prefetch",
                                             "stage_cold_rows", "fp8_linear"}
        if unknown:
            raise GpuBackendError(f"kernel_config: unknown parameters {sorted(unknown)}")
        self._launch_config: dict[str, Any] = dict(self.kernel_config)
        fp8_linear = self._launch_config.pop("fp8_linear", None)
        try:
            self._fp8_linear = None if fp8_linear is None else {int(i): dict(launch)
                                                                 for i, launch in dict(fp8_linear).items()}
        except (TypeError, ValueError) as exc:
            raise GpuBackendError(f"kernel_config fp8_linear must map layer indices to launch tables: {exc}") from exc
        # Device rows for staging a batch's cold rows before the fused kernel (kernels/cold_stage.py;
        # opt-in, measured slower on an H100: BENCHMARKS.md round 5): 0 = the fused kernel reads them itself.
        self.stage_rows = int(self._launch_config.pop("stage_cold_rows", 0))
        if self.stage_rows < 0 or (self.stage_rows and not fused_gather):
            raise GpuBackendError("kernel_config stage_cold_rows must be >= 0, and needs fused_gather")
        if self.stage_rows and cold_gather == "host":
            raise GpuBackendError("kernel_config stage_cold_rows and cold_gather host both stage the cold rows: "
                                  "choose one")
        self.max_batch_pairs = int(max_batch_pairs)
        if inflight < 1:
            raise GpuBackendError(f"inflight must be positive, got {inflight}")
        self.inflight = int(inflight)  # device batches in flight (staging sets)
        self.times = LoadTimes()
        self.host = HostRegistry(self._dev)
        self.config = art.config
        self.calibration = art.calibration
        if mlp_precision == "fp8" and max_batch_pairs % 16:
            raise GpuBackendError(f"mlp_precision fp8 needs max_batch_pairs divisible by 16 (fp8 GEMM rows), got "
                                  f"{max_batch_pairs}")
        if mlp_precision in ("int8", "fp8"):
            if self.calibration is None:
                raise GpuBackendError(f"mlp_precision {mlp_precision} needs {art.path}/calibration.json: run "
                                      "`dlrm-prepare calibrate --model ARTIFACT --dataset CALIBRATION_DATASET`")
            if dtype != torch.float16:
                raise GpuBackendError(f"mlp_precision {mlp_precision} runs the rest of the model in fp16; dtype "
                                      "must be float16")
        self.mlp_precision = mlp_precision
        self.top_configs = list(top_configs) if top_configs is not None else None
        self.placement = Placement.from_artifact(art, gpu_part)
        # cold_gather "host": each set in flight stages up to 1/16 of its lookups (0.5% were cold at
        # gpu_part 0.3 on the full-size model); a batch with more reads the rest from host memory.
        self.cold_capacity = 0
        if cold_stage_rows is not None and cold_stage_rows < 1:
            raise GpuBackendError(f"cold_stage_rows must be positive, got {cold_stage_rows}")
        if cold_gather == "host" and self.placement.total_rows > self.placement.n_hot:
            self.cold_capacity = (cold_stage_rows if cold_stage_rows is not None
                                  else max(1024, self.max_batch_pairs * self.config.num_tables // 16))
        self._datasets: dict[str, _DeviceDataset] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        torch.cuda.set_device(self._dev)
        self.stream = torch.cuda.Stream(self._dev)  # compute, and the small prediction copies back
        self.copy_stream = torch.cuda.Stream(self._dev)  # host-to-device input copies
        with torch.cuda.stream(self.stream):
            self._load_tables(art)
            self._load_mlp(art)
            self.fused_bottom = self.fused_bottom and bottom_mlp_fits(self.bottom)
            self._alloc_buffers()
        sizes = default_graph_sizes(self.max_batch_pairs) if graph_sizes is None else sorted(set(graph_sizes))
        if any(s < 1 or s > self.max_batch_pairs for s in sizes):
            raise GpuBackendError(f"graph sizes {sizes} must lie in [1, max_batch_pairs={self.max_batch_pairs}]")
        # Captured at the first batch or warm_up(), not here: the engine page-locks its shared memory
        # first, before any library (nvmath's cuda.core, for fp8) has driven CUDA outside the runtime.
        self._graph_sizes = sizes
        self._sizes: list[int] = []

    @property
    def gather_launch_config(self) -> dict[str, Any]:
        """The fused gather+interaction kernel's launch parameters (kernel_config without the keys of other
        stages): what a bench that times that kernel alone passes to it."""
        return dict(self._launch_config)

    def _ensure_graphs(self) -> None:
        if not self._sizes:
            t0 = time.perf_counter()
            self._capture(self._graph_sizes)
            self.times.graphs_s = time.perf_counter() - t0

    # ---- loading -------------------------------------------------------------------------------------
    def _load_tables(self, art: Artifact) -> None:
        n_hot, total, dim = self.placement.n_hot, self.placement.total_rows, self.config.embedding_dim
        emb = art.embeddings
        t0 = time.perf_counter()
        if total == n_hot:
            self.stage_rows = 0  # no cold rows: nothing to stage
        # The stage (if any) right after the hot rows: the kernels take staged rows as hot ones (they read
        # position p < hot.shape[0] from `hot`, else cold row p - hot.shape[0]).
        self.stage_total = self.stage_rows + self.inflight * self.cold_capacity
        self.hot = torch.empty((n_hot + self.stage_total, dim), dtype=torch.int8, device=self._dev)
        staging = torch.empty((min(_CHUNK_ROWS, max(n_hot, 1)), dim), dtype=torch.int8, pin_memory=True)
        st_np = staging.numpy()
        for a in range(0, n_hot, _CHUNK_ROWS):
            b = min(n_hot, a + _CHUNK_ROWS)
            st_np[: b - a] = emb[a:b]
            self.hot[a:b].copy_(staging[: b - a], non_blocking=True)
            self.stream.synchronize()  # the staging buffer is reused next step
        self.times.hot_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_cold = total - n_hot
        self.cold: torch.Tensor | None = None
        if n_cold and self.host_rows == "shared":
            self.cold = shared_cold_rows(self.host, self.device, emb, n_hot, n_cold)
        if n_cold and self.cold is None:
            # Pinned (page-locked, device-mapped under UVA): the gather kernel reads it over PCIe directly.
            self.cold = torch.empty((n_cold, dim), dtype=torch.int8, pin_memory=True)
            cold_np = self.cold.numpy()
            for a in range(0, n_cold, _CHUNK_ROWS):
                b = min(n_cold, a + _CHUNK_ROWS)
                cold_np[a:b] = emb[n_hot + a : n_hot + b]
        self.times.cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.row_position = torch.from_numpy(np.ascontiguousarray(art.row_position, dtype=np.int32)).to(self._dev)
        if self.cold_capacity:
            # cold positions shifted past the stage once, here: every remap (registration, by value) then
            # gives the kernels' positions (the device-pass stage shifts them per batch instead)
            shift = self.inflight * self.cold_capacity
            self.row_position = torch.where(self.row_position >= n_hot, self.row_position + shift, self.row_position)
        self.table_offsets = torch.from_numpy(np.asarray(art.table_offsets, dtype=np.int64)).to(self._dev)
        self.scales = torch.from_numpy(np.asarray(art.scales, dtype=np.float32)).to(self._dev)
        self.stream.synchronize()
        self.times.remap_s = time.perf_counter() - t0

    def _load_mlp(self, art: Artifact) -> None:
        cfg = self.config
        w = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in art.mlp.items()}
        self.dense_width = (cfg.dense_features + 7) // 8 * 8  # 16-byte aligned rows for cuBLAS
        self.bottom = []
        for i in range(len(cfg.bottom_mlp)):
            weight = w[f"bot_l.{2 * i}.weight"]
            if i == 0:
                weight = F.pad(weight, (0, self.dense_width - cfg.dense_features))  # zero columns, zero inputs
            self.bottom.append((weight.to(self._dev, self.dtype), w[f"bot_l.{2 * i}.bias"].to(self._dev, self.dtype)))
        self.top = []
        width = cfg.interaction_width
        # cuBLAS ran the first top GEMM faster at K = 512 than at 480 (H200: 0.487 vs 0.504 ms at 262,144
        # rows); the int8 chain (kernels/quant_linear.py) pads its fp16 layer to a multiple of 16.
        align = 16 if self.mlp_precision == "int8" else 64
        self.top_in_width = (width + align - 1) // align * align
        for i in range(len(cfg.top_mlp)):
            weight = w[f"top_l.{2 * i}.weight"]
            if i == 0 and self.top_in_width != width:
                weight = F.pad(weight, (0, self.top_in_width - width))  # zero columns meet zero inputs
            self.top.append((weight.to(self._dev, self.dtype), w[f"top_l.{2 * i}.bias"].to(self._dev, self.dtype)))
        self.qtop: QuantTopMlp | None = None
        self.fp8: Fp8TopMlpRunner | None = None
        if self.mlp_precision == "fp8":
            # The interaction writes the fp8 top input (scaled by 1 / s_0); cuBLASLt fp8 GEMMs with the bias,
            # ReLU and the next scale fused (engines/fp8_top_mlp.py).
            try:
                q8 = quantize_fp8_top_mlp(art.mlp, self.calibration)
                if q8.in_width_padded > self.top_in_width:
                    raise GpuBackendError(f"fp8 top MLP input width {q8.in_width_padded} > {self.top_in_width}")
                q8.weights[0] = F.pad(q8.weights[0].float(), (0, self.top_in_width - q8.in_width_padded)).to(
                    q8.weights[0].dtype)
                self.fp8 = Fp8TopMlpRunner(
                    q8, self.max_batch_pairs, self._dev,
                    triton_layers=None if self._fp8_linear is None else set(self._fp8_linear),
                    triton_launch=self._fp8_linear)
            except Fp8MlpError as exc:
                raise GpuBackendError(str(exc)) from exc
            self._top_in_inv_scale = torch.tensor([1.0 / q8.x_scales[0]], dtype=torch.float32, device=self._dev)
        else:  # tuning for the fp8 layers is not used by this precision: not reported as applied
            self.tuned_keys = [k for k in self.tuned_keys if k != "fp8_linear"]
        if self.mlp_precision == "int8":
            # Layer 1 fp16 -> int8 activations (calibrated static scales) -> int8 layers, the last with
            # the 1-wide output and sigmoid fused (kernels/quant_linear.py).
            self.qtop = quantize_top_mlp(art.mlp, self.calibration).to(self._dev)
            if self.qtop.in_width_padded != self.top_in_width:
                raise GpuBackendError(f"int8 top MLP input width {self.qtop.in_width_padded} != {self.top_in_width}")

    def _alloc_buffers(self) -> None:
        m, cfg = self.max_batch_pairs, self.config
        dev = self._dev
        # Dense inputs in the model's dtype, 16 wide (3 zero columns, zero weight columns): an aligned K
        # for cuBLAS (K = 13 took a slow unaligned path); the zeros are never written.
        self.dense_in = torch.zeros((m, self.dense_width), dtype=self.dtype, device=dev)
        # Zeros are valid ids: padding rows of a replayed graph always read real rows (see _run).
        self.sparse_in = torch.zeros((m, cfg.num_tables), dtype=torch.int32, device=dev)
        self.emb_buf = (torch.empty((m, cfg.num_tables, cfg.embedding_dim), dtype=self.dtype, device=dev)
                        if not self.fused_gather else None)
        self.top_in = torch.zeros((m, self.top_in_width), dtype=torch.float8_e4m3fn if self.fp8 is not None
                                  else self.dtype, device=dev)
        self.pred = torch.empty(m, dtype=torch.float32, device=dev)
        self.bottom_out = torch.empty((m, cfg.embedding_dim), dtype=self.dtype, device=dev)
        self.top_scratch = alloc_scratch(self.qtop, m, dev) if self.qtop is not None else None
        self.counts = new_counts(dev)  # [limit, bad ids, hot-count slots]
        self._stage_counter = torch.zeros(1, dtype=torch.int32, device=dev)  # cold lookups of the batch
        self._arange = torch.arange(m, dtype=torch.int64, device=dev)
        self._rows_dev = (self.table_offsets[1:] - self.table_offsets[:-1]).to(torch.int32)
        sets = [StagingSet(m, cfg.dense_features, cfg.num_tables, self.counts.numel(), dev)
                for _ in range(self.inflight)]
        r = self.cold_capacity
        for i, s in enumerate(sets if r else []):
            base = self.placement.n_hot + i * r
            s.cold_stage = _ColdStage(
                base, torch.empty((r, cfg.embedding_dim), dtype=torch.int8, pin_memory=True),
                torch.empty(r, dtype=torch.int64, pin_memory=True), torch.empty(r, dtype=torch.int64, device=dev),
                torch.arange(base, base + r, dtype=torch.int32, device=dev))
        self._cold_np = self.cold.numpy() if r and self.cold is not None else None
        self._gather_pool = ThreadPoolExecutor(_GATHER_THREADS, "cold-gather") if self._cold_np is not None else None
        self.pool = InFlight(sets, self._finish)

    # ---- the forward ---------------------------------------------------------------------------------
    def _forward(self, n: int) -> None:
        """Predict rows [0, n) of dense_in/sparse_in into pred[:n]; hot count into counts[2:]."""
        x = self.dense_in[:n]
        if self.fused_bottom:
            x = bottom_mlp(x, self.bottom, self.bottom_out[:n])
        else:
            for weight, bias in self.bottom:
                x = self._linear_relu(x, weight, bias)
        # sparse_in holds file positions (remapped and checked before the graph): no remap loads here.
        if self.stage_rows:  # the batch's cold rows to the device first; their positions point there
            assert self.cold is not None
            n_hot = self.placement.n_hot
            self._stage_counter.zero_()
            stage_cold_rows(self.sparse_in[:n], n_hot, self.cold, self.hot[n_hot:], self._stage_counter, self.counts)
        if self.fp8 is not None:
            gather_interaction(x, self.sparse_in[:n], self.table_offsets, None, self.scales, self.hot, self.cold,
                               self.top_in[:n], self.counts, out_scale=self._top_in_inv_scale, **self._launch_config)
            self.fp8.forward(self.top_in[:n], self.pred, self.stream)
            return
        if self.fused_gather:
            y = gather_interaction(x, self.sparse_in[:n], self.table_offsets, None, self.scales,
                                   self.hot, self.cold, self.top_in[:n], self.counts, **self._launch_config)
        else:
            assert self.emb_buf is not None  # allocated whenever fused_gather is off
            emb = self.emb_buf[:n]
            embedding_gather(self.sparse_in[:n], self.table_offsets, None, self.scales, self.hot,
                             self.cold, emb, self.counts[2:3], count_limit=self.counts[:1])
            y = dot_interaction(x, emb, self.top_in[:n])
        if self.qtop is not None:
            top_mlp_int8(self.qtop, y, self.pred[:n], self.top_scratch, self.top_configs)
            return
        last = len(self.top) - 1
        for i, (weight, bias) in enumerate(self.top):
            y = self._linear_relu(y, weight, bias) if i < last else F.linear(y, weight, bias)
        self.pred[:n].copy_(torch.sigmoid(y.float()).reshape(-1))

    def _linear_relu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.fused_relu:
            # cuBLASLt bias+ReLU epilogue: saves a read and a write of every activation.
            return torch._addmm_activation(bias, x, weight.t())
        return torch.relu(F.linear(x, weight, bias))

    def _capture(self, sizes: Sequence[int]) -> None:
        with torch.cuda.stream(self.stream):
            self.counts.zero_()
            for s in sizes:
                self._forward(s)  # compiles the kernels and picks cuBLAS algorithms outside capture
            self.stream.synchronize()
            pool = None
            for s in sorted(sizes, reverse=True):  # largest first so smaller graphs reuse its pool
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=self.stream):
                    self._forward(s)
                pool = g.pool()
                self._graphs[s] = g
        self._sizes = sorted(self._graphs)

    def _run(self, n: int) -> int:
        """Forward of the first n staged rows (already on the device, enqueued on self.stream); the
        caller zeroed counts[1:] before staging (a by-value batch's remap counts its bad ids there)."""
        self.counts[:1].fill_(n * self.config.num_tables)
        size = next((s for s in self._sizes if s >= n), None)
        if size is None:
            self._forward(n)
        else:
            if size > n:
                # Padding rows hold what earlier batches left: zero them (position 0, a valid row) so a
                # replay reads only rows that were checked.
                self.sparse_in[n:size].zero_()
            self._graphs[size].replay()
        return n

    def _launch(self, staging: StagingSet, n: int, out: np.ndarray, owner: GpuPending, staged: int = 0) -> None:
        """Forward the n rows staged in dense_in/sparse_in; predictions and counts back to the host."""
        self._run(n)
        direct = self.host.contains(out[:n])
        dest = torch.from_numpy(out[:n]) if direct else staging.pred_host[:n]
        dest.copy_(self.pred[:n], non_blocking=True)
        staging.counts_host.copy_(self.counts, non_blocking=True)
        staging.done.record(self.stream)
        self.pool.add(Ticket(staging, n, out[:n], direct, owner, staged))

    def _finish(self, t: Ticket) -> tuple[int, int]:
        """Wait for a ticket's batch, move its predictions into place, give its set back."""
        try:
            t.staging.done.synchronize()
            c = t.staging.counts_host.numpy()
            bad, hot = int(c[1]), int(c[2:].sum()) - t.staged  # staged rows were read as hot ones
            if not bad and not t.direct:
                t.out[:] = t.staging.pred_host[: t.n].numpy()
        finally:
            self.pool.give(t.staging)
        if bad:
            raise GpuBackendError(f"batch of {t.n} pairs: {bad} sparse ids outside their table (those lookups "
                                  "were skipped; the batch has no valid predictions)")
        return hot, t.n * self.config.num_tables - hot

    # ---- EngineBackend -------------------------------------------------------------------------------
    def register_dataset(self, name: str, path: Path) -> None:
        t0 = time.perf_counter()
        ds = Dataset.open(path)  # every id is checked against the model's tables below
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            # Stored as the forward reads it: dense in the model dtype, 16 wide; lookups as file positions
            # (remapped once here, so the forward's gather skips the remap table).
            dense = torch.zeros((ds.num_pairs, self.dense_width), dtype=self.dtype, device=self._dev)
            sparse = torch.empty((ds.num_pairs, self.config.num_tables), dtype=torch.int32, device=self._dev)
            bad = torch.zeros(1, dtype=torch.int64, device=self._dev)
            nd = self.config.dense_features
            first_cold = int(self.hot.shape[0])
            cold_chunks: list[tuple[int, np.ndarray, np.ndarray]] = []
            for a in range(0, ds.num_pairs, _CHUNK_ROWS):
                b = min(ds.num_pairs, a + _CHUNK_ROWS)
                sparse[a:b].copy_(torch.from_numpy(np.ascontiguousarray(ds.sparse[a:b])))
                dense[a:b, :nd].copy_(torch.from_numpy(np.ascontiguousarray(ds.dense[a:b], dtype=np.float32)))
                # Checked on the device (a host pass over 89 M x 26 ids would take seconds).
                invalid = (sparse[a:b] < 0) | (sparse[a:b] >= self._rows_dev[None, :])
                if bool(invalid.any()):
                    pair, table = (int(v) for v in invalid.nonzero()[0])
                    raise GpuBackendError(
                        f"dataset {name!r} at {path}: sparse id {int(sparse[a + pair, table])} of pair {a + pair} "
                        f"is outside table {table} ({self.config.table_rows[table]} rows)")
                remap_ids(sparse[a:b], self.table_offsets, self.row_position, sparse[a:b], bad)
                if self.cold_capacity:  # its cold lookups, for the host to gather per batch
                    flat = sparse[a:b].reshape(-1)
                    where = torch.nonzero(flat >= first_cold).flatten()
                    cold_chunks.append((a, where.cpu().numpy(), (flat[where].long() - first_cold).cpu().numpy()))
            self.stream.synchronize()
        cold = (ColdLookups.from_chunks(cold_chunks, self.config.num_tables, ds.num_pairs) if self.cold_capacity
                else None)
        self._datasets[name] = _DeviceDataset(dense, sparse, ds.num_pairs, cold)
        if ds.num_pairs:
            # One pair through the whole by-reference path: its kernels compile (Triton) and load now, not
            # under the first queries (a GPU demo's Server run saw p90 250 ms without this).
            self.infer_by_ref(name, np.zeros(1, np.int64), np.ones(1, np.int64), np.empty(1, np.float32))
        self.times.datasets_s[name] = time.perf_counter() - t0

    def warm_up(self) -> None:
        """Run every path a served batch can take, at several sizes, before the engine says it is ready:
        nothing may compile (Triton), load lazily (CUDA modules) or pick an algorithm inside a measured
        run. Sizes cover 1, odd and multiples of 16, range counts of 1 and many, by value and by
        reference for each registered dataset; the forward itself is captured at every graph size."""
        self._ensure_graphs()
        m = self.max_batch_pairs
        sizes = sorted({min(m, n) for n in (1, 2, 17, 32, 333, 4096, m - 1 if m > 1 else 1, m)})
        cfg = self.config
        for n in sizes:
            dense = np.zeros((n, cfg.dense_features), np.float32)
            sparse = np.zeros((n, cfg.num_tables), np.int32)
            self.infer_by_value(dense, sparse, np.empty(n, np.float32))
        for name, ds in self._datasets.items():
            for n in sizes:
                n = min(n, ds.num_pairs)
                if n == 0:
                    continue
                # one range, then ranges of one pair each (a batch of many short samples)
                self.infer_by_ref(name, np.zeros(1, np.int64), np.full(1, n, np.int64), np.empty(n, np.float32))
                k = min(n, 700)
                self.infer_by_ref(name, np.arange(k, dtype=np.int64), np.ones(k, np.int64), np.empty(k, np.float32))
        torch.cuda.synchronize(self._dev)

    def pin_host_memory(self, buf: np.ndarray) -> bool:
        """Page-lock a host buffer (the engine's shared-memory region): batches in it move by DMA."""
        return self.host.register(buf)

    def submit_by_ref(self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray,
                      out: np.ndarray) -> GpuPending:
        """Enqueue a by-reference request; the returned handle's wait() gives its BatchStats."""
        self._ensure_graphs()
        ds = self._datasets.get(dataset)
        if ds is None:
            raise GpuBackendError(f"dataset {dataset!r} is not registered on {self.device}")
        try:
            starts, counts = check_ranges(dataset, pair_starts, pair_counts, ds.num_pairs)
        except ValueError as exc:
            raise GpuBackendError(str(exc)) from exc
        total = int(counts.sum())
        self._check_out(out, total)
        pending = GpuPending(self.pool)
        m = self.max_batch_pairs
        # The daemon's batches fit one device batch: their ranges are expanded on the device. A larger
        # request (direct API use) is cut into device batches of pair indices made on the host.
        pieces: list[tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]] = [
            (starts, counts, None)] if total <= m else [
            (None, None, idx) for idx in np.split(pair_index(starts, counts), range(m, total, m))]
        at = 0
        for st, ct, idx in pieces:
            n = total if idx is None else idx.size
            if n == 0:
                continue
            s = self.pool.take()
            try:
                staged = 0
                if ds.cold is not None and s.cold_stage is not None and self._cold_np is not None:
                    # this batch's cold rows gathered here, copied to the device with its ranges
                    cs = s.cold_stage
                    plan = (ds.cold.plan(idx, np.ones(idx.size, np.int64), self.cold_capacity) if idx is not None
                            else ds.cold.plan(st, ct, self.cold_capacity))  # type: ignore[arg-type]
                    staged = plan.staged
                    gather_rows(self._cold_np, plan, cs.rows_host.numpy(), self._gather_pool, _GATHER_THREADS)
                    cs.flat_host.numpy()[:staged] = plan.flat
                # starts then counts (or the pair indices), one contiguous run: a single DMA
                host = s.ranges_host.numpy()
                if idx is None:
                    assert st is not None and ct is not None
                    r = st.size
                    host[:r] = st
                    host[r : 2 * r] = ct
                    k = 2 * r
                else:
                    host[:n] = idx
                    k = n
                with torch.cuda.stream(self.copy_stream):
                    s.ranges_dev[:k].copy_(s.ranges_host[:k], non_blocking=True)
                    if staged:
                        cs = s.cold_stage
                        self.hot[cs.base : cs.base + staged].copy_(cs.rows_host[:staged], non_blocking=True)
                        cs.flat_dev[:staged].copy_(cs.flat_host[:staged], non_blocking=True)
                    s.copied.record(self.copy_stream)
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(s.copied)
                    if idx is None:
                        st_dev, ct_dev = s.ranges_dev[:r], s.ranges_dev[r : 2 * r]
                        first = torch.cumsum(ct_dev, 0) - ct_dev
                        pairs = torch.repeat_interleave(st_dev - first, ct_dev, output_size=n) + self._arange[:n]
                    else:
                        pairs = s.ranges_dev[:n]
                    self.counts[1:].zero_()
                    # One launch for both rows of every pair (index_select took 0.16 ms a batch).
                    gather_pair_rows(pairs, ds.dense, self.dense_in, ds.positions, self.sparse_in)
                    if staged:  # the staged lookups now point at this set's device rows
                        cs = s.cold_stage
                        self.sparse_in.view(-1).index_copy_(0, cs.flat_dev[:staged], cs.slots_dev[:staged])
                    self._launch(s, n, out[at : at + n], pending, staged)
            except BaseException:
                self.pool.give(s)  # never launched: its set goes straight back
                raise
            at += n
        return pending

    def submit_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> GpuPending:
        """Enqueue a by-value request (inputs copied asynchronously; by DMA from registered memory)."""
        self._ensure_graphs()
        cfg = self.config
        if dense.ndim != 2 or dense.shape[1] != cfg.dense_features or sparse.shape[0] != dense.shape[0]:
            raise GpuBackendError(f"dense must be [n, {cfg.dense_features}] and sparse [n, {cfg.num_tables}], "
                                  f"got {list(dense.shape)} and {list(sparse.shape)}")
        if sparse.ndim != 2 or sparse.shape[1] != cfg.num_tables:
            raise GpuBackendError(f"sparse must be [n, {cfg.num_tables}], got {list(sparse.shape)}")
        if sparse.dtype != np.int32:
            if sparse.size and (sparse.min() < 0 or sparse.max() >= 2**31):
                raise GpuBackendError("by-value batch: sparse ids outside int32")
            sparse = sparse.astype(np.int32)
        if dense.dtype != np.float32:
            dense = dense.astype(np.float32)
        total = dense.shape[0]
        self._check_out(out, total)
        pending = GpuPending(self.pool)
        nd = cfg.dense_features
        for a in range(0, total, self.max_batch_pairs):
            b = min(total, a + self.max_batch_pairs)
            n = b - a
            s = self.pool.take()
            try:
                d_src, s_src = dense[a:b], sparse[a:b]
                if self.host.contains(d_src) and self.host.contains(s_src):
                    d_t, s_t = torch.from_numpy(d_src), torch.from_numpy(s_src)
                else:
                    d_host, s_host = s.host_inputs()
                    d_host.numpy()[:n] = d_src
                    s_host.numpy()[:n] = s_src
                    d_t, s_t = d_host[:n], s_host[:n]
                with torch.cuda.stream(self.copy_stream):
                    s.dense_dev[:n].copy_(d_t, non_blocking=True)
                    s.sparse_dev[:n].copy_(s_t, non_blocking=True)
                    s.copied.record(self.copy_stream)
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(s.copied)
                    self.dense_in[:n, :nd].copy_(s.dense_dev[:n])
                    self.counts[1:].zero_()
                    # ids -> file positions; ids outside their table count in counts[1] (the batch fails)
                    remap_ids(s.sparse_dev[:n], self.table_offsets, self.row_position, self.sparse_in[:n],
                              self.counts[1:2])
                    self._launch(s, n, out[a:b], pending)
            except BaseException:
                self.pool.give(s)
                raise
        return pending

    def infer_by_ref(
        self, dataset: str, pair_starts: np.ndarray, pair_counts: np.ndarray, out: np.ndarray
    ) -> BatchStats:
        return self.submit_by_ref(dataset, pair_starts, pair_counts, out).wait()

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, out: np.ndarray) -> BatchStats:
        return self.submit_by_value(dense, sparse, out).wait()

    def device_memory_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self._dev))

    def close(self) -> None:
        torch.cuda.synchronize(self._dev)
        self.host.unregister_all()
        self._graphs.clear()
        if self.fp8 is not None:
            self.fp8.close()
        pool = getattr(self, "_gather_pool", None)
        if pool is not None:
            pool.shutdown()
            self._gather_pool = None
        self._datasets.clear()
        for name in ("hot", "cold", "row_position", "emb_buf", "top_in", "dense_in", "sparse_in", "pred"):
            if hasattr(self, name):
                setattr(self, name, None)
        torch.cuda.synchronize(self._dev)
        torch.cuda.empty_cache()

    @staticmethod
    def _check_out(out: np.ndarray, n: int) -> None:
        if out.dtype != np.float32 or out.ndim != 1 or out.shape[0] < n:
            raise GpuBackendError(f"out must be float32 [>= {n}], got {out.dtype}{list(out.shape)}")
