"""The Open Inference Protocol (KServe v2) front end (oip/) on a daemon with a real CPU engine: tritonclient
over REST and gRPC gets what the native client gets, by value and by reference; malformed tensors get the
protocol's error with our message; `loadgen_driver --backend oip` scores the AUC of the native path."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from daemon.config import ConfigError, load_config
from formats.dataset import Dataset
from formats.model_config import DLRMConfig
from loadgen_driver.cli import main as driver_main
from test_daemon_support import REPO, DaemonProc, make_cpu_artifact, make_dataset

CONFIG = DLRMConfig.mlperf().scaled(1e-4, cap=1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("oip")
    art = make_cpu_artifact(d, CONFIG, seed=5)
    ds = make_dataset(d / "ds", np.random.default_rng(1).integers(1, 40, size=200), seed=4,
                      table_rows=CONFIG.table_rows)
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    daemon = DaemonProc({"engines": ["cpu"], "model": str(art), "datasets": {"ds": str(ds)}, "max_batch_pairs": 512,
                         "heartbeat_timeout_s": 5.0, "oip_http_port": http_port, "oip_grpc_port": grpc_port,
                         "metrics_port": metrics_port})
    try:
        daemon.wait_serving(60)
        http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        end = time.monotonic() + 60
        while True:  # the front end starts once the daemon serves
            try:
                if http.is_model_ready("dlrm") and grpc.is_model_ready("dlrm"):
                    break
            except Exception:
                pass
            assert time.monotonic() < end, daemon.log()[-3000:]
            time.sleep(0.2)
        warm_ups = _by_ref_answered(metrics_port)  # before any client's request
        yield {"daemon": daemon, "http": http, "grpc": grpc, "ds": Dataset.open(ds), "ds_path": ds,
               "grpc_url": f"127.0.0.1:{grpc_port}", "warm_ups": warm_ups}
        http.close()
        grpc.close()
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        daemon.close()


def _by_ref_answered(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    found = re.search(r'^dlrm_queries_total\{kind="by_ref",outcome="ok"\} (\S+)$', body, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_front_end_is_ready_only_after_its_warm_up(served: dict[str, Any]) -> None:
    """Before it says ready, the front end process answered one request of its own per dataset (its wire
    connection, LoadSamples, KServe's tensor types: not paid inside a client's first run)."""
    assert served["warm_ups"] == 1  # one worker, one dataset, no client request yet


def _inputs(module: Any, **tensors: np.ndarray) -> list[Any]:
    dtype = {np.float32: "FP32", np.float64: "FP64", np.int32: "INT32", np.int64: "INT64"}
    out = []
    for name, arr in tensors.items():
        i = module.InferInput(name, list(arr.shape), dtype[arr.dtype.type])
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_same_predictions_as_the_native_client(served: dict[str, Any], proto: str) -> None:
    client, module = served[proto], httpclient if proto == "http" else grpcclient
    ds: Dataset = served["ds"]
    rng = np.random.default_rng(7)
    idx = rng.integers(0, ds.num_pairs, size=333)
    dense, sparse = np.asarray(ds.dense[idx]), np.asarray(ds.sparse[idx])
    ids = rng.integers(0, ds.num_samples, size=9).astype(np.int64)
    with served["daemon"].client() as native:
        want_value = native.infer_by_value(dense, sparse)
        native.load_samples("ds", ids)
        want_ref = native.infer_by_ref("ds", ids)
    for sp in (sparse.astype(np.int32), sparse.astype(np.int64)):  # either id width is accepted
        r = client.infer("dlrm", _inputs(module, dense=dense, sparse=sp))
        np.testing.assert_array_equal(r.as_numpy("probability"), want_value)
    r = client.infer("dlrm", _inputs(module, sample_ids=ids), parameters={"dataset": "ds"})
    np.testing.assert_array_equal(r.as_numpy("probability"), want_ref)
    # throughput work (never refused for latency), as LoadGen's driver sends it
    throughput = client.infer("dlrm", _inputs(module, sample_ids=ids), parameters={"dataset": "ds", "deadline_s": "inf"})
    np.testing.assert_array_equal(throughput.as_numpy("probability"), want_ref)
    params = r.get_response().get("parameters") if proto == "http" else r.get_response().parameters
    model = params["model"] if proto == "http" else params["model"].string_param
    assert model == want_ref.model  # the reply names its model, as the native header does


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_malformed_requests_get_the_protocols_error_with_our_message(served: dict[str, Any], proto: str) -> None:
    client, module = served[proto], httpclient if proto == "http" else grpcclient
    good_dense = np.ones((4, 13), np.float32)
    good_sparse = np.zeros((4, 26), np.int32)
    cases: list[tuple[list[Any], dict[str, Any] | None, str]] = [
        (_inputs(module, dense=np.ones((4, 12), np.float32), sparse=good_sparse), None, r"shape \[4, 12\], expected \[n, 13\]"),
        (_inputs(module, dense=good_dense.astype(np.float64), sparse=good_sparse), None, "datatype FP64 not accepted"),
        (_inputs(module, dense=good_dense, sparse=np.zeros((3, 26), np.int32)), None, "dense has 4 rows and sparse 3"),
        (_inputs(module, dense=good_dense), None, "send inputs 'dense' and 'sparse'"),
        (_inputs(module, dense=good_dense, sparse=np.full((4, 26), 10**6, np.int32)), None, "outside"),
        (_inputs(module, sample_ids=np.array([0], np.int64)), None, "needs the request parameter 'dataset'"),
        (_inputs(module, sample_ids=np.array([0], np.int64)), {"dataset": "nope"}, "unknown dataset 'nope'"),
        (_inputs(module, sample_ids=np.array([10**6], np.int64)), {"dataset": "ds"}, "sample id"),
        (_inputs(module, sample_ids=np.array([0], np.int64)), {"dataset": "ds", "deadline_s": "soon"},
         "parameter deadline_s: a number of seconds"),
    ]
    for inputs, params, message in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer("dlrm", inputs, parameters=params)
        status = str(err.value.status())
        assert ("400" in status if proto == "http" else "INVALID_ARGUMENT" in status), (message, status)
        assert re.search(message, err.value.message()), (message, err.value.message())


def test_health_and_metadata(served: dict[str, Any]) -> None:
    http, grpc = served["http"], served["grpc"]
    assert http.is_server_live() and http.is_server_ready() and grpc.is_server_ready()
    meta = http.get_model_metadata("dlrm")
    assert {i["name"] for i in meta["inputs"]} == {"dense", "sparse", "sample_ids"}
    assert meta["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1]}]
    assert not http.is_model_ready("no-such-model")


@pytest.mark.parametrize("inputs", ["value", "reference"])
def test_loadgen_driver_through_the_front_end_scores_the_native_auc(served: dict[str, Any], tmp_path: Path,
                                                                      inputs: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--scenario", "Offline", "--mode", "AccuracyOnly", "--dataset", str(served["ds_path"]),
              "--dataset-name", "ds", "--quiet", "--samples-per-request", "32"]
    assert driver_main(common + ["--endpoint", served["daemon"].endpoint, "--output-dir", str(tmp_path / "n")]) == 0
    native = capsys.readouterr().out
    assert driver_main(common + ["--backend", "oip", "--url", served["grpc_url"], "--oip-inputs", inputs,
                                 "--output-dir", str(tmp_path / "o")]) == 0
    oip = capsys.readouterr().out
    auc = [re.search(r"AUC=([0-9.]+)%", text) for text in (native, oip)]
    assert auc[0] and auc[1] and auc[0].group(1) == auc[1].group(1), (native, oip)
    assert "errors: 0 samples" in oip, oip


def test_the_front_end_listens_on_loopback_unless_allowed(tmp_path: Path) -> None:
    base = {"engines": ["null"], "runtime_dir": str(tmp_path), "oip_http_port": "8080"}
    with pytest.raises(ConfigError, match="oip_host.*allow_remote"):
        load_config(None, {**base, "oip_host": "0.0.0.0"}, env={})
    assert load_config(None, {**base, "oip_host": "0.0.0.0", "allow_remote": "true"}, env={}).oip_host == "0.0.0.0"
    with pytest.raises(ConfigError, match="must differ"):
        load_config(None, {**base, "oip_grpc_port": "8080"}, env={})


TRITON_PY = REPO / ".venv-triton" / "bin" / "python"


def _three_free_ports() -> int:
    """A port p with p, p + 1 and p + 2 free (Triton's gRPC, HTTP and metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
        if p + 2 < 65536 and all(_port_free(q) for q in (p + 1, p + 2)):
            return p
    raise AssertionError("no three consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_driver_speaks_the_protocol_to_a_real_triton_server(served: dict[str, Any], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`loadgen_driver --backend oip` against NVIDIA's Triton Inference Server (nvidia-pytriton, set up by
    `make test` in .venv-triton) serving a small Python model (tests/triton_toy_model.py), not our front
    end: every prediction LoadGen logged is the model's for its sample's pairs, in order; and a request
    the model cannot take (by reference: `sample_ids`) fails with Triton's own message."""
    from loadgen_driver.accuracy import read_accuracy_log
    from triton_toy_model import toy_probability

    assert TRITON_PY.exists(), "`make test` makes .venv-triton (nvidia-pytriton in the system Python 3.11)"
    port = _three_free_ports()
    log = open(tmp_path / "triton.log", "wb")
    triton = subprocess.Popen([str(TRITON_PY), str(REPO / "tests" / "triton_toy_model.py"), str(port)],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        end = time.monotonic() + 180
        while True:
            assert triton.poll() is None, (tmp_path / "triton.log").read_text(errors="replace")[-3000:]
            try:
                if client.is_model_ready("dlrm"):
                    break
            except InferenceServerException:
                pass
            assert time.monotonic() < end, (tmp_path / "triton.log").read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        common = ["--scenario", "Offline", "--dataset", str(served["ds_path"]), "--dataset-name", "ds", "--quiet",
                  "--samples-per-request", "32", "--backend", "oip", "--url", f"127.0.0.1:{port}"]
        assert driver_main(common + ["--mode", "AccuracyOnly", "--oip-inputs", "value",
                                     "--output-dir", str(tmp_path / "acc")]) == 0
        out = capsys.readouterr().out
        assert "errors: 0 samples" in out, out
        preds, _, order = read_accuracy_log(tmp_path / "acc" / "mlperf_log_accuracy.json")
        ds = served["ds"]
        off = ds.sample_offsets
        idx = np.concatenate([np.arange(off[s], off[s + 1]) for s in order])
        np.testing.assert_allclose(preds, toy_probability(ds.dense[idx], ds.sparse[idx]), rtol=1e-6, atol=1e-7)
        assert driver_main(common + ["--mode", "PerformanceOnly", "--oip-inputs", "reference",
                                     "--output-dir", str(tmp_path / "ref")]) != 0
        err = capsys.readouterr().err
        assert "RUN FAILED" in err and "sample_ids" in err, err
        client.close()
    finally:
        triton.terminate()
        try:
            triton.wait(60)
        except subprocess.TimeoutExpired:
            triton.kill()
        log.close()


def _front_end_pids(daemon_pid: int) -> list[int]:
    """The dispatcher's `python -m oip` children."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == daemon_pid and cmd[1:3] == [b"-m", b"oip"]:
            pids.append(int(d.name))
    return sorted(pids)


def test_several_front_end_workers_share_the_port(served: dict[str, Any], tmp_path: Path) -> None:
    """oip_workers = 2: two processes on one gRPC port (SO_REUSEPORT); the driver's connections
    (--oip-channels) are spread over them; one killed, the other serves on and it is restarted."""
    from test_daemon_support import wait_for

    grpc_port = _free_port()
    from formats.artifact import write_model_description

    write_model_description(tmp_path / "art", CONFIG)
    d = DaemonProc({"engines": ["null"], "model": str(tmp_path / "art"), "datasets": {"ds": str(served["ds_path"])},
                    "oip_grpc_port": grpc_port, "oip_workers": 2, "heartbeat_timeout_s": 5.0})
    try:
        d.wait_serving(60)
        workers = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(_front_end_pids(d.proc.pid)), 60,
                           "two front end workers")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        wait_for(lambda: _ready(client), 60, "the front end ready")
        run = ["--scenario", "Offline", "--dataset", str(served["ds_path"]), "--dataset-name", "ds", "--quiet",
               "--samples-per-request", "8", "--backend", "oip", "--url", f"127.0.0.1:{grpc_port}",
               "--oip-inputs", "reference", "--oip-channels", "4", "--mode", "AccuracyOnly"]
        assert driver_main(run + ["--output-dir", str(tmp_path / "a")]) == 0
        os.kill(workers[0], signal.SIGKILL)
        # reaped, not only exiting: an exiting process has closed its memory (no cmdline) before its sockets,
        # and a connection the kernel hands its listening socket meanwhile is reset
        wait_for(lambda: not Path(f"/proc/{workers[0]}").exists(), 30, "the killed worker reaped")
        assert driver_main(run + ["--output-dir", str(tmp_path / "b")]) == 0  # on the worker left (and a new one)
        back = wait_for(lambda: (lambda p: p if len(p) == 2 and workers[0] not in p else None)(
            _front_end_pids(d.proc.pid)), 60, "the killed worker restarted")
        assert workers[1] in back
        client.close()
    finally:
        d.close()


def _ready(client: Any) -> bool:
    try:
        return bool(client.is_model_ready("dlrm"))
    except InferenceServerException:
        return False
