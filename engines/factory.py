"""Backend factory: "cpu" -> CpuBackend, "cuda:N" -> GpuBackend (imported only when asked for).

CpuBackend takes (artifact_path, gpu_part, device); GpuBackend takes (device, artifact_path, gpu_part,
max_batch_pairs, inflight): the daemon passes its own max_batch_pairs so that a GPU engine runs the
daemon's batches whole (GpuBackend would otherwise cut them at its default of 65,536 pairs), its
slots per engine as the batches the GPU keeps in flight, and its gpu_mlp_precision.
"""
from __future__ import annotations

import re
from pathlib import Path

from engines.backend import EngineBackend


def create_backend(device: str, artifact_path: Path | str, gpu_part: float,
                   max_batch_pairs: int | None = None, inflight: int | None = None,
                   mlp_precision: str | None = None) -> EngineBackend:
    if device == "cpu":
        from engines.cpu_backend import CpuBackend

        return CpuBackend(artifact_path, gpu_part, device)
    if re.fullmatch(r"cuda:\d+", device):
        try:
            from engines.gpu_backend import GpuBackend
        except ImportError as exc:
            raise ValueError(f"device {device}: the GPU backend is unavailable ({exc})") from exc
        kwargs: dict[str, int | str] = {}
        if mlp_precision is not None:
            kwargs["mlp_precision"] = mlp_precision
        if max_batch_pairs is not None:
            kwargs["max_batch_pairs"] = max_batch_pairs
        if inflight is not None:
            kwargs["inflight"] = inflight
        return GpuBackend(device, artifact_path, gpu_part, **kwargs)
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda:N'")
