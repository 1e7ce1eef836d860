"""The one backend factory: an engine kind and the daemon's engine parameters -> an EngineBackend.

Backends are imported only when asked for (the GPU one needs torch with CUDA and Triton). The daemon
passes its own max_batch_pairs so that a GPU engine runs the daemon's batches whole (GpuBackend would
otherwise cut them at its default of 65,536 pairs), its slots per engine as the batches the GPU keeps
in flight, and its MLP precision.
"""
from __future__ import annotations

from pathlib import Path

from engines.backend import EngineBackend
from wire.messages import ColdRowGather, EngineKind, HostRows, MlpPrecision


def create_backend(device: str, artifact: Path | str, *, gpu_part: float = 1.0, max_batch_pairs: int | None = None,
                   inflight: int | None = None, mlp_precision: MlpPrecision | None = None,
                   host_rows: HostRows | None = None,
                   cold_row_gather: ColdRowGather | None = None) -> EngineBackend:
    """ValueError for an unknown device or a GPU backend that cannot be imported here."""
    kind = EngineKind.of_device(device)
    if kind is EngineKind.NULL:
        from engines.null_backend import NullBackend

        return NullBackend(device, artifact)
    if kind is EngineKind.CPU:
        from engines.cpu_backend import CpuBackend

        return CpuBackend(artifact, gpu_part, device)
    try:
        from engines.gpu_backend import GpuBackend
    except ImportError as exc:
        raise ValueError(f"device {device}: the GPU backend is unavailable ({exc})") from exc
    options: dict[str, int | str] = {}  # what is not given stays the backend's own default
    if max_batch_pairs is not None:
        options["max_batch_pairs"] = max_batch_pairs
    if inflight is not None:
        options["inflight"] = inflight
    if mlp_precision is not None:
        options["mlp_precision"] = str(mlp_precision)
    if host_rows is not None:
        options["host_rows"] = str(host_rows)
    if cold_row_gather is not None:
        options["cold_gather"] = str(cold_row_gather)
    return GpuBackend(device, artifact, gpu_part, **options)  # type: ignore[arg-type]


def device_name(device: str) -> str:
    """The name of a cuda:N device ("NVIDIA H200"), "" for the cpu and null engines (they have no GPU)."""
    if EngineKind.of_device(device) is not EngineKind.CUDA:
        return ""
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))
