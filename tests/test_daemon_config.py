"""Configuration: TOML < DLRM_* environment < flags; errors name the key; check-config and --help."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from wire.exitcodes import ExitCode
from daemon.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "d.toml"
    p.write_text(text)
    return p


def test_precedence_and_types(tmp_path: Path) -> None:
    p = write(tmp_path, 'engines = ["null", "null"]\nmax_batch_pairs = 1000\nmax_queue_delay_s = 0.01\n'
                        f'runtime_dir = "{tmp_path}/rt"\n')
    cfg = load_config(p, env={})
    assert cfg.engines == ("null", "null") and cfg.max_batch_pairs == 1000
    assert cfg.endpoint == f"ipc://{tmp_path}/rt/dlrm.sock" and cfg.engine_names == ("null0", "null1")
    cfg = load_config(p, {"max_batch_pairs": "2000"}, env={"DLRM_MAX_BATCH_PAIRS": "1500",
                                                           "DLRM_MAX_QUEUE_DELAY_S": "0.5"})
    assert cfg.max_batch_pairs == 2000 and cfg.max_queue_delay_s == 0.5
    assert cfg.batch_timeout_s == 10.0  # the documented default
    assert load_config(p, env={"DLRM_BATCH_TIMEOUT_S": "2.5"}).batch_timeout_s == 2.5
    with pytest.raises(Exception):
        cfg.max_batch_pairs = 3  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("text,key,what", [
    ('engines = ["null"]\nbogus = 1\n', "bogus", "unknown key"),
    ('engines = ["null"]\nmax_batch_pairs = -5\n', "max_batch_pairs", "positive"),
    ('engines = ["null"]\nmax_batch_pairs = "many"\n', "max_batch_pairs", "integer"),
    ('engines = ["tpu:0"]\n', "engines", "unknown device"),
    ('engines = ["cpu"]\n', "model", "required"),
    ('engines = ["null"]\nembedding_weights_on_gpu_part = 1.5\n', "embedding_weights_on_gpu_part", "[0, 1]"),
    ('engines = ["null"]\nheartbeat_timeout_s = 0.1\n', "heartbeat_timeout_s", "exceed"),
    ('engines = ["null"]\nbatch_timeout_s = 0\n', "batch_timeout_s", "> 0"),
    ('engines = ["null"]\nendpoint = "udp://x"\n', "endpoint", "ipc://"),
    ('engines = ["null"]\n[datasets]\nds = "/nonexistent"\n', "datasets", "not a dataset"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert info.value.key == key and f"'{key}'" in str(info.value) and what in str(info.value)


def test_accuracy_target_decides_the_gpu_mlp_precision(tmp_path: Path) -> None:
    """fp8 kept 99.68% of the fp32 AUC on the demo day: refused for the default 99.9% profile, served at 99%."""
    fp8_gpu = 'engines = ["cuda:0"]\ngpu_mlp_precision = "fp8"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, fp8_gpu), env={})
    assert info.value.key == "gpu_mlp_precision"
    assert "99.68%" in str(info.value) and 'accuracy_target = "99"' in str(info.value)
    # at 99% the precision check passes; the next check (no model artifact) is what stops this config
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, fp8_gpu + 'accuracy_target = "99"\n'), env={})
    assert info.value.key == "model"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, fp8_gpu), env={"DLRM_ACCURACY_TARGET": "99"})
    assert info.value.key == "model"
    with pytest.raises(ConfigError, match="one of '99.9', '99'"):
        load_config(write(tmp_path, fp8_gpu + 'accuracy_target = "99.5"\n'), env={})
    # int8 (99.96%) keeps the 99.9% profile; engines that are not GPUs ignore the GPU MLP precision
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, 'engines = ["cuda:0"]\ngpu_mlp_precision = "int8"\n'), env={})
    assert info.value.key == "model"
    cfg = load_config(write(tmp_path, 'engines = ["null"]\ngpu_mlp_precision = "fp8"\n'), env={})
    assert cfg.accuracy_target == "99.9"


def test_env_error_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DLRM_INFLIGHT_BATCHES"):
        load_config(write(tmp_path, 'engines = ["null"]\n'), env={"DLRM_INFLIGHT_BATCHES": "x"})


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)


def test_cli_check_config_and_help(tmp_path: Path) -> None:
    ok = _cli("check-config", str(write(tmp_path, f'engines = ["null"]\nruntime_dir = "{tmp_path}"\n')))
    assert ok.returncode == 0 and 'engines = ["null"]' in ok.stdout
    bad = _cli("check-config", str(write(tmp_path, 'engines = ["null"]\nmax_queue_pairs = 0\n')))
    assert bad.returncode == ExitCode.CONFIG_ERROR and "'max_queue_pairs'" in bad.stderr
    serve_bad = _cli("--config", str(tmp_path / "d.toml"))
    assert serve_bad.returncode == ExitCode.CONFIG_ERROR and "max_queue_pairs" in serve_bad.stderr
    h = _cli("--help")
    assert h.returncode == 0 and "--max-batch-pairs" in h.stdout and "DLRM_MAX_BATCH_PAIRS" in h.stdout
    assert _cli("--no-such-flag").returncode == ExitCode.USAGE


def test_max_batch_pairs_default_fits_the_engine_kind(tmp_path: Path) -> None:
    """A CPU engine does ~10k pairs/s on 2 cores: its default batch must not hold it for seconds
    (make demo lost a healthy engine under a 65,536-pair batch on a loaded host)."""
    art = tmp_path / "art"
    write_model_description(art, DLRMConfig((5, 5)))
    cpu = load_config(write(tmp_path, f'engines = ["cpu"]\nmodel = "{art}"\n'), env={})
    assert cpu.max_batch_pairs == 8192
    assert load_config(write(tmp_path, 'engines = ["null"]\n'), env={}).max_batch_pairs == 65536
    mixed = load_config(write(tmp_path, f'engines = ["cpu", "cuda:0"]\nmodel = "{art}"\n'), env={})
    assert mixed.max_batch_pairs == 65536
    assert load_config(write(tmp_path, f'engines = ["cpu"]\nmodel = "{art}"\nmax_batch_pairs = 300\n'),
                       env={}).max_batch_pairs == 300


def test_unknown_dlrm_variable_is_an_error(tmp_path: Path) -> None:
    """DLRM_ENGINE (for DLRM_ENGINES) used to pass check-config silently."""
    cfg = write(tmp_path, 'engines = ["null"]\n')
    with pytest.raises(ConfigError, match="DLRM_ENGINE") as err:
        load_config(cfg, env={"DLRM_ENGINE": "cuda:7"})
    assert "unknown environment variable" in str(err.value) and "DLRM_ENGINES" in str(err.value)
    # the null engine's hooks and the clients' CURVE keys are known, not config keys
    load_config(cfg, env={"DLRM_NULL_DELAY_S": "0.1", "DLRM_CURVE_CLIENT_KEY": "x"})
    bad = _cli("check-config", str(cfg), env_extra={"DLRM_ENGINE": "cuda:7"})
    assert bad.returncode == ExitCode.CONFIG_ERROR and "DLRM_ENGINE" in bad.stderr


def test_values_are_converted_by_type(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'engines = ["null"]\n')
    c = load_config(cfg, {"allow_remote": "yes", "gpu_mlp_precision": "int8"},
                    env={"DLRM_HEARTBEAT_TIMEOUT_S": "2", "DLRM_ENGINES": "null, null"})
    assert c.allow_remote is True and c.gpu_mlp_precision == "int8" and c.heartbeat_timeout_s == 2.0
    assert c.engines == ("null", "null")
    with pytest.raises(ConfigError, match="one of 'fp16', 'bf16', 'int8', 'fp8'"):
        load_config(cfg, {"gpu_mlp_precision": "fp4"}, env={})
    with pytest.raises(ConfigError, match="true or false"):
        load_config(cfg, {"allow_remote": "maybe"}, env={})
