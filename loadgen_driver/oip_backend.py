"""The driver's backend for any Open Inference Protocol (KServe v2) server, through tritonclient's gRPC client.

As NVIDIA's Triton configuration of the MLPerf harness, each `send` becomes one inference request for model
`dlrm` (or --oip-model): by value (default; any server) the pairs of the samples as `dense` FP32 [n, 13]
and `sparse` INT32 [n, 26] from the local dataset, or by reference (`--oip-inputs reference`, this project's
front end) `sample_ids` INT64 [k] with the request parameter `dataset` naming a dataset registered on the
daemon. The output `probability` FP32 [n] is the reply. Requests go out with tritonclient's `async_infer`
from LoadGen's issue thread; its callbacks (tritonclient's threads) queue the replies for `poll`.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from formats.dataset import Dataset
from formats.pairs import pair_index
from loadgen_driver.backend import BackendLimits, BackendReply, DriverBackendError, Liveness, drain


class OipBackend:
    def __init__(self, url: str, dataset: Dataset, dataset_name: str, model: str = "dlrm",
                 inputs: str = "value", timeout_s: float = 10.0, parameters: dict[str, Any] | None = None,
                 channels: int = 1) -> None:
        try:
            import tritonclient.grpc as grpcclient
        except ImportError as exc:
            raise DriverBackendError(f"--backend oip needs tritonclient (pip install 'dlrm-daemon[oip]'): {exc}") from exc
        if inputs not in ("value", "reference"):
            raise DriverBackendError(f"--oip-inputs must be value or reference, got {inputs!r}")
        self._grpc = grpcclient
        self.url = url
        self.model = model
        self.inputs = inputs
        self.dataset_name = dataset_name
        # request parameters of every request (the driver's default, deadline_s=inf, tells dlrm-daemon's front
        # end that this is throughput work, never refused for latency: LoadGen measures it)
        self.parameters: dict[str, Any] = dict(parameters or {})
        self._offsets = np.asarray(dataset.sample_offsets, dtype=np.int64)
        self._dense = dataset.dense
        self._sparse = dataset.sparse
        self._replies: queue.SimpleQueue[BackendReply] = queue.SimpleQueue()
        self._outstanding = 0
        self._lock = threading.Lock()
        # the protocol does not tell a server's limits: --max-inflight-pairs sets a bound where needed
        self.limits = BackendLimits()
        if channels < 1:
            raise DriverBackendError(f"--oip-channels must be at least 1, got {channels}")
        self._next = 0
        try:
            # Several channels, each its own connection (a local subchannel pool: gRPC would otherwise share
            # one connection between equal channels), take turns: a server of several processes on one port
            # (SO_REUSEPORT, as dlrm-daemon's oip_workers) gets connections spread over its processes.
            args = None if channels == 1 else [("grpc.use_local_subchannel_pool", 1),
                                               ("grpc.max_send_message_length", 2**31 - 1),
                                               ("grpc.max_receive_message_length", 2**31 - 1)]
            self._clients = [grpcclient.InferenceServerClient(url, channel_args=args) for _ in range(channels)]
            self._client = self._clients[0]
            if not self._live(timeout_s):
                raise DriverBackendError(f"Open Inference Protocol server at {url} is not live")
            # Every channel asked once before the run: a gRPC channel connects at its first call, which
            # would otherwise fall inside the run's first queries (on an H100 host the first Server run
            # through 8 channels was INVALID at p99 52-83 ms where the later ones were VALID at 15-24 ms).
            for client in self._clients:
                if not client.is_model_ready(model, client_timeout=timeout_s):
                    raise DriverBackendError(f"model {model!r} is not ready at {url}")
        except DriverBackendError:
            raise
        except Exception as exc:  # tritonclient raises InferenceServerException and grpc errors
            raise DriverBackendError(f"Open Inference Protocol server at {url}: {exc}") from exc

    def _live(self, timeout_s: float) -> bool:
        """Whether the server says it is live, asked again within `timeout_s` while it cannot be reached
        (a server process of several on one port that just died resets the connections it was handed)."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                return bool(self._client.is_server_live(client_timeout=max(0.1, end - time.monotonic())))
            except Exception:  # tritonclient raises InferenceServerException (UNAVAILABLE) and grpc errors
                if time.monotonic() + 0.2 >= end:
                    raise
                time.sleep(0.2)

    def load_samples(self, sample_ids: np.ndarray) -> None:
        pass  # by value the rows travel; by reference the front end loads its dataset itself

    def unload_samples(self, sample_ids: np.ndarray) -> None:
        pass

    def _request(self, sample_ids: np.ndarray) -> tuple[list[Any], dict[str, Any] | None]:
        g = self._grpc
        if self.inputs == "reference":
            ids = g.InferInput("sample_ids", [len(sample_ids)], "INT64")
            ids.set_data_from_numpy(np.ascontiguousarray(sample_ids, dtype=np.int64))
            return [ids], {"dataset": self.dataset_name, **self.parameters}
        starts = self._offsets[sample_ids]
        pairs = pair_index(starts, self._offsets[sample_ids + 1] - starts)
        dense = np.ascontiguousarray(self._dense[pairs], dtype=np.float32)
        sparse = np.ascontiguousarray(self._sparse[pairs], dtype=np.int32)
        d = g.InferInput("dense", list(dense.shape), "FP32")
        d.set_data_from_numpy(dense)
        s = g.InferInput("sparse", list(sparse.shape), "INT32")
        s.set_data_from_numpy(sparse)
        return [d, s], self.parameters or None

    def send(self, request_id: int, sample_ids: np.ndarray) -> None:
        inputs, parameters = self._request(np.asarray(sample_ids, dtype=np.int64))

        def done(result: Any, error: Any) -> None:
            with self._lock:
                self._outstanding -= 1
            if error is not None:
                self._replies.put(BackendReply(request_id, None, f"{type(error).__name__}: {error}"))
            else:
                # [n] from dlrm-daemon's front end, [n, 1] from a Triton model with dims [1]: one value a pair
                self._replies.put(BackendReply(request_id, result.as_numpy("probability").reshape(-1)))

        with self._lock:
            self._outstanding += 1
        client = self._clients[self._next]
        self._next = (self._next + 1) % len(self._clients)
        try:
            client.async_infer(self.model, inputs, done, request_id=str(request_id), parameters=parameters,
                                     outputs=[self._grpc.InferRequestedOutput("probability")])
        except Exception as exc:
            with self._lock:
                self._outstanding -= 1
            self._replies.put(BackendReply(request_id, None, f"send failed: {exc}"))

    def poll(self, timeout_ms: int) -> list[BackendReply]:
        return drain(self._replies, timeout_ms)

    def liveness(self, timeout_s: float) -> Liveness:
        with self._lock:
            busy = self._outstanding > 0
        try:
            ready = bool(self._client.is_model_ready(self.model, client_timeout=timeout_s))
        except Exception as exc:
            return Liveness(False, False, f"Open Inference Protocol server at {self.url}: {exc}")
        return Liveness(ready, busy, f"model {self.model} {'ready' if ready else 'not ready'}, "
                                     f"{self._outstanding} requests outstanding")

    def close(self) -> None:
        for client in self._clients:
            client.close()
