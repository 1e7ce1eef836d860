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


@pytest.fixture(scope="module")
def calibrated_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (small, random) artifact; its calibration.json is written per test."""
    from test_daemon_cpu import CONFIG
    from test_daemon_support import make_cpu_artifact

    return make_cpu_artifact(tmp_path_factory.mktemp("cal"), CONFIG)


def _calibrate(art: Path, auc: dict[str, float] | None) -> None:
    """calibration.json with scales and, unless None, this accuracy record (baseline fp32 AUC 0.8)."""
    from formats.artifact import AccuracyRecord, Artifact, Calibration, write_calibration

    a = Artifact.open(art)
    names = ["top_l.0"] + [f"top_l.{2 * (i + 1)}" for i in range(len(a.config.top_mlp) - 2)]
    write_calibration(art, Calibration(
        method="p99.99", amax={n: 4.0 for n in names}, dataset="calib", pairs=1000,
        mlp_sha256=str(a.meta["files"]["mlp.npz"]["sha256"]),
        accuracy=None if auc is None else AccuracyRecord("fp32", 0.8, {k: 0.8 * v for k, v in auc.items()}, 1000)))


def test_accuracy_target_decides_the_gpu_mlp_precision(tmp_path: Path, calibrated_artifact: Path) -> None:
    """The precision comes from what the artifact's calibration measured (as on the demo: fp16 99.98%,
    int8 99.95%, fp8 99.64% of the fp32 AUC on the calibration day)."""
    art = calibrated_artifact
    gpu = f'engines = ["cuda:0"]\nmodel = "{art}"\n'
    measured = {"fp16": 0.9998, "int8": 0.9995, "fp8": 0.9964}
    _calibrate(art, measured)
    assert load_config(write(tmp_path, gpu), env={}).gpu_mlp_precision == "fp16"  # auto at 99.9%
    assert load_config(write(tmp_path, gpu), env={"DLRM_ACCURACY_TARGET": "99"}).gpu_mlp_precision == "fp8"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, gpu + 'gpu_mlp_precision = "fp8"\n'), env={})
    assert info.value.key == "gpu_mlp_precision"
    assert "99.640%" in str(info.value) and 'accuracy_target = "99"' in str(info.value)
    cfg = load_config(write(tmp_path, gpu + 'gpu_mlp_precision = "fp8"\naccuracy_target = "99"\n'), env={})
    assert cfg.gpu_mlp_precision == "fp8"
    assert load_config(write(tmp_path, gpu + 'gpu_mlp_precision = "int8"\n'), env={}).gpu_mlp_precision == "int8"
    with pytest.raises(ConfigError, match="one of '99.9', '99', 'none'"):
        load_config(write(tmp_path, gpu + 'accuracy_target = "99.5"\n'), env={})
    # a model whose fp8 keeps 99.9% gets fp8 at 99.9% too: the measurement decides, not a table
    _calibrate(art, {"fp16": 0.99995, "int8": 0.9998, "fp8": 0.9993})
    assert load_config(write(tmp_path, gpu), env={}).gpu_mlp_precision == "fp8"
    # scales without an accuracy record: fp8/int8 refused for a profile, auto falls back to fp16
    _calibrate(art, None)
    with pytest.raises(ConfigError, match="calibrated for accuracy"):
        load_config(write(tmp_path, gpu + 'gpu_mlp_precision = "fp8"\naccuracy_target = "99"\n'), env={})
    assert load_config(write(tmp_path, gpu), env={}).gpu_mlp_precision == "fp16"
    # no profile (speed runs of synthetic models): any calibrated precision, auto the fastest
    assert load_config(write(tmp_path, gpu + 'accuracy_target = "none"\n'), env={}).gpu_mlp_precision == "fp8"
    (art / "calibration.json").unlink()
    with pytest.raises(ConfigError, match="calibration scales"):
        load_config(write(tmp_path, gpu + 'gpu_mlp_precision = "fp8"\naccuracy_target = "none"\n'), env={})
    # engines that are not GPUs compute in fp32: auto resolves to fp16 and nothing is checked
    cfg = load_config(write(tmp_path, 'engines = ["null"]\n'), env={})
    assert cfg.accuracy_target == "99.9" and cfg.gpu_mlp_precision == "fp16"


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


def test_a_queue_bound_below_the_engines_slots_is_advised(tmp_path: Path) -> None:
    """Eight engines of 8 slots of 1 Mi pairs hold 64 Mi pairs; a 16 M queue bound (which a client such as
    loadgen_driver keeps its work within) cannot fill them: check-config says so, and how much is needed.
    The defaults, and a bound that covers the slots, draw no note."""
    assert load_config(write(tmp_path, 'engines = ["null"]\n'), env={}).advisories() == []
    text = ('engines = ["null", "null", "null", "null", "null", "null", "null", "null"]\n'
            'max_batch_pairs = 1048576\ninflight_batches = 8\nmax_queue_pairs = {q}\n')
    small = load_config(write(tmp_path, text.format(q=16_000_000)), env={})
    (note,) = small.advisories()
    assert "max_queue_pairs = 16000000" in note and "= 67108864 pairs" in note and "to 67108864" in note
    assert load_config(write(tmp_path, text.format(q=67_108_864)), env={}).advisories() == []
    shown = _cli("check-config", str(write(tmp_path, text.format(q=16_000_000))))
    assert shown.returncode == 0 and "# note: max_queue_pairs = 16000000 is below" in shown.stdout, shown.stdout


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


def test_cuda_all_is_one_engine_per_visible_gpu(tmp_path: Path, calibrated_artifact: Path) -> None:
    from daemon.config import visible_gpus

    gpus = tmp_path / "gpus"
    for bus in ("0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0"):
        (gpus / bus).mkdir(parents=True)
    assert visible_gpus({}, str(gpus)) == 4
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, str(gpus)) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,0"}, str(gpus)) == 1  # CUDA stops at -1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, str(gpus)) == 0
    assert visible_gpus({}, str(tmp_path / "no-driver")) == 0
    cfg_text = f'engines = ["cuda:all", "cpu"]\nmodel = "{calibrated_artifact}"\n'
    n = visible_gpus({"CUDA_VISIBLE_DEVICES": "0"})
    if n:  # a GPU host: expanded to its one visible GPU
        cfg = load_config(write(tmp_path, cfg_text), env={"CUDA_VISIBLE_DEVICES": "0"})
        assert cfg.engines == ("cuda:0", "cpu") and cfg.engine_names == ("cuda0", "cpu0")
    else:  # CI: no GPU, a clear error naming the key
        with pytest.raises(ConfigError, match="'cuda:all' but no NVIDIA GPU is visible") as info:
            load_config(write(tmp_path, cfg_text), env={})
        assert info.value.key == "engines"
    cfg = load_config(write(tmp_path, f'engines = ["cuda:0", "cuda:0"]\nmodel = "{calibrated_artifact}"\n'), env={})
    assert cfg.engine_names == ("cuda0", "cuda0-1")  # two engines sharing one GPU
