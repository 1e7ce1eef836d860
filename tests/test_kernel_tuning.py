"""formats/kernel_tuning.py: measured launch choices kept with the artifact, one entry per card."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from formats.kernel_tuning import KERNEL_TUNING, KernelTuningError, read_kernel_tuning, write_kernel_tuning

ROOT = Path(__file__).resolve().parent.parent
H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
LAUNCH = {"block_m": 128, "block_n": 256, "block_k": 128, "num_warps": 8, "num_stages": 3, "persistent": 1}


def test_absent_file_or_card_means_the_engine_defaults(tmp_path: Path) -> None:
    assert read_kernel_tuning(tmp_path, H100) is None
    write_kernel_tuning(tmp_path, H200, {"fp8_linear": {"0": LAUNCH}}, "stage probe")
    assert read_kernel_tuning(tmp_path, H100) is None


def test_each_card_keeps_its_own_entry(tmp_path: Path) -> None:
    write_kernel_tuning(tmp_path, H100, {"fp8_linear": {"0": LAUNCH}}, "probe on an H100")
    write_kernel_tuning(tmp_path, H200, {"num_warps": 2}, "probe on an H200")
    write_kernel_tuning(tmp_path, H100, {"fp8_linear": {"2": LAUNCH}}, "again")  # replaces the H100's entry
    assert read_kernel_tuning(tmp_path, H100) == {"fp8_linear": {"2": LAUNCH}}  # without "measured"
    assert read_kernel_tuning(tmp_path, H200) == {"num_warps": 2}
    raw = json.loads((tmp_path / KERNEL_TUNING).read_text())
    assert raw["by_device"][H100]["measured"] == "again"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content,match", [("{not json", "unreadable"),
                                           ('{"format": "other", "version": 1, "by_device": {}}', "format"),
                                           ('{"format": "dlrm-kernel-tuning", "version": 9, "by_device": {}}',
                                            "version 9"),
                                           ('{"format": "dlrm-kernel-tuning", "version": 1, "by_device": []}',
                                            "by_device"),
                                           ('{"format": "dlrm-kernel-tuning", "version": 1, '
                                            '"by_device": {"NVIDIA H100 80GB HBM3": 3}}', "not a table")])
def test_a_bad_file_is_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / KERNEL_TUNING).write_text(content)
    with pytest.raises(KernelTuningError, match=match):
        read_kernel_tuning(tmp_path, H100)


def _probe(tmp_path: Path, triton_wins_ms: float) -> Path:
    """A stage_probe.py --stages top JSON: Triton beat cuBLASLt on layers 0 (twice: the faster kept) and 2."""
    rows = [{"layer": 0, **LAUNCH, "ms": 0.30}, {"layer": 0, **LAUNCH, "block_n": 128, "ms": 0.35},
            {"layer": 1, **LAUNCH, "ms": 0.60}, {"layer": 2, **LAUNCH, "persistent": 0, "ms": 0.25}]
    probe = {"card": H100, "batch": 262144,
             "fp8_top": {"per_layer_ms": [0.39, 0.56, 0.32, 0.1], "widths": [1024, 1024, 512, 256],
                         "triton_linear": rows,
                         "triton_chain": {"graph_ms": {"cublaslt": 1.22, "triton_wins": triton_wins_ms}}}}
    path = tmp_path / "stages_top.json"
    path.write_text(json.dumps(probe))
    return path


def _write_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "write_kernel_tuning.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_probes_winners_are_written_for_its_card(tmp_path: Path) -> None:
    """bench/write_kernel_tuning.py: per layer the fastest launch that beat cuBLASLt, into the artifact,
    only for an artifact with the widths the probe measured, and only if the whole chain gained."""
    import torch

    from engines.model import random_state_dict
    from formats.model_config import DLRMConfig
    from prepare.convert import convert

    torch.save(random_state_dict(DLRMConfig.mlperf().scaled(2e-4), seed=1), tmp_path / "ckpt.pt")
    convert(tmp_path / "ckpt.pt", tmp_path / "art")
    done = _write_tool("--probe", str(_probe(tmp_path, 1.10)), "--artifact", str(tmp_path / "art"))
    assert done.returncode == 0, done.stderr
    want = {"fp8_linear": {"0": LAUNCH, "2": {**LAUNCH, "persistent": 0}}}
    assert json.loads(done.stdout) == want
    assert read_kernel_tuning(tmp_path / "art", H100) == want
    assert read_kernel_tuning(tmp_path / "art", H200) is None
    # no gain for the whole chain in its graph: nothing is chosen or written
    (tmp_path / "art" / KERNEL_TUNING).unlink()
    done = _write_tool("--probe", str(_probe(tmp_path, 1.25)), "--artifact", str(tmp_path / "art"))
    assert done.returncode == 0 and json.loads(done.stdout) == {} and not (tmp_path / "art" / KERNEL_TUNING).exists()


def test_another_models_widths_are_refused(tmp_path: Path) -> None:
    import torch

    from engines.model import random_state_dict
    from formats.model_config import DLRMConfig
    from prepare.convert import convert

    config = DLRMConfig.mlperf().scaled(2e-4)
    config = dataclasses.replace(config, top_mlp=(512, 512, 256, 128, 1))
    torch.save(random_state_dict(config, seed=1), tmp_path / "ckpt.pt")
    convert(tmp_path / "ckpt.pt", tmp_path / "art")
    done = _write_tool("--probe", str(_probe(tmp_path, 1.10)), "--artifact", str(tmp_path / "art"))
    assert done.returncode == 1 and "widths" in done.stderr
    assert not (tmp_path / "art" / KERNEL_TUNING).exists()
