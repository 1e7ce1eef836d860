"""Measured kernel launch choices kept with the artifact: `kernel_tuning.json`, one entry per GPU model.

Why: issue 13 asks that start-up stay short ("tune once, keep the result with the artifact or a cache").
Which kernel and launch shape is fastest for a layer depends on the layer's shape (the artifact's model)
and on the card (an H100 and an H200 differ in memory bandwidth), not on the data. So a bench that has
measured them (bench/stage_probe.py) writes its choices here under the card's name, and a GPU engine on
that card starts with them at no cost; on another card, or without the file, the engine keeps its own
defaults. The file is optional and, like calibration.json, not in meta.json's list of data files.

    {"format": "dlrm-kernel-tuning", "version": 1,
     "by_device": {"NVIDIA H100 80GB HBM3": {"fp8_linear": {"0": {"block_m": 128, ...}}, "measured": "..."}}}

Each device entry holds GpuBackend kernel_config keys (engines/gpu_backend.py checks them), plus free-text
`measured` (what measured them, and when): numpy-free and torch-free, as formats/ is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

KERNEL_TUNING = "kernel_tuning.json"
TUNING_FORMAT = "dlrm-kernel-tuning"
TUNING_VERSION = 1


class KernelTuningError(ValueError):
    """An unreadable, wrong-format or wrong-version kernel_tuning.json; the message names the file."""


def read_kernel_tuning(path: Path | str, device_name: str) -> dict[str, Any] | None:
    """The artifact's kernel_config for `device_name` (torch.cuda.get_device_name), without `measured`;
    None when the artifact has no tuning file or none for this card."""
    file = Path(path) / KERNEL_TUNING
    if not file.is_file():
        return None
    raw = _read(file)
    entry = raw["by_device"].get(device_name)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise KernelTuningError(f"{file}: the entry for {device_name!r} is not a table")
    return {k: v for k, v in entry.items() if k != "measured"}


def write_kernel_tuning(path: Path | str, device_name: str, kernel_config: dict[str, Any], measured: str) -> Path:
    """Set (replace) the entry of `device_name` in the artifact's kernel_tuning.json, keeping other cards'
    entries; atomically. Returns the file."""
    file = Path(path) / KERNEL_TUNING
    raw: dict[str, Any] = (_read(file) if file.is_file()
                           else {"format": TUNING_FORMAT, "version": TUNING_VERSION, "by_device": {}})
    raw["by_device"][device_name] = {**kernel_config, "measured": measured}
    tmp = file.with_name(KERNEL_TUNING + ".tmp")
    tmp.write_text(json.dumps(raw, indent=1, sort_keys=True))
    os.replace(tmp, file)
    return file


def _read(file: Path) -> dict[str, Any]:
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KernelTuningError(f"{file}: unreadable: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != TUNING_FORMAT:
        raise KernelTuningError(f"{file}: format is not {TUNING_FORMAT!r}")
    if raw.get("version") != TUNING_VERSION:
        raise KernelTuningError(f"{file}: wrong version {raw.get('version')!r}, this build reads version "
                                f"{TUNING_VERSION}")
    if not isinstance(raw.get("by_device"), dict):
        raise KernelTuningError(f"{file}: by_device must be a table")
    return raw
