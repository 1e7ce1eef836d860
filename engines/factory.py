"""Backend factory: "cpu" -> CpuBackend, "cuda:N" -> GpuBackend (imported only when asked for).

CpuBackend takes (artifact_path, gpu_part, device); GpuBackend takes (device, artifact_path, gpu_part).
"""
from __future__ import annotations

import re
from pathlib import Path

from engines.backend import EngineBackend


def create_backend(device: str, artifact_path: Path | str, gpu_part: float) -> EngineBackend:
    if device == "cpu":
        from engines.cpu_backend import CpuBackend

        return CpuBackend(artifact_path, gpu_part, device)
    if re.fullmatch(r"cuda:\d+", device):
        try:
            from engines.gpu_backend import GpuBackend
        except ImportError as exc:
            raise ValueError(f"device {device}: the GPU backend is unavailable ({exc})") from exc
        return GpuBackend(device, artifact_path, gpu_part)
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda:N'")
