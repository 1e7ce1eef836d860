"""The model the Open Inference Protocol front end serves: each v2 inference request becomes one wire request.

Inputs (one of two forms), output and parameters:
  by value      `dense` FP32 [n, 13] and `sparse` INT32 or INT64 [n, 26]
  by reference  `sample_ids` INT64 (or INT32) [k] into a dataset registered on the daemon, named by the
                request parameter `dataset`: the pairs of those LoadGen samples, in order
  output        `probability` FP32 [pairs]
  parameter     `deadline_s` (optional): seconds the request may take, "inf" for throughput work (never
                refused for latency); without it, the daemon's latency_target_s admits it (wire InferByRef)
  response      parameter `model`: the id of the model that computed it (as the native reply header)
Validation errors become the protocol's InvalidInput (REST 400, gRPC INVALID_ARGUMENT) with our message;
the daemon's errors keep their code in the message (BAD_REQUEST as InvalidInput, the others as an
InferenceError). Batching, admission, errors and metrics are the dispatcher's, as for native clients.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from kserve import Model
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from formats.model_config import NUM_TABLES
from wire.messages import DENSE_FEATURES
from wire import messages as M
from wire.client import AsyncClient
from wire.errors import BadRequest, DaemonError

log = logging.getLogger("dlrm.oip")

_DTYPES = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64}


def _param(parameters: Any, key: str) -> Any:
    """A request parameter's value from REST (a dict) or gRPC (a map of InferParameter) requests."""
    if not parameters or key not in parameters:
        return None
    value = parameters[key]
    if hasattr(value, "WhichOneof"):  # gRPC InferParameter
        field = value.WhichOneof("parameter_choice")
        return getattr(value, field) if field else None
    return value


class DlrmModel(Model):
    """kserve.Model over the daemon; `ready` follows the daemon's own state (`watch_daemon`)."""

    def __init__(self, name: str, endpoint: str, timeout_s: float = 600.0) -> None:
        super().__init__(name)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._client: AsyncClient | None = None
        self._loaded: set[str] = set()  # datasets whose samples this connection loaded (LoadSamples)
        self._load_lock = asyncio.Lock()

    def _wire(self) -> AsyncClient:
        if self._client is None:  # made in the serving event loop
            self._client = AsyncClient(self.endpoint, timeout_s=self.timeout_s)
        return self._client

    def load(self) -> bool:
        return self.ready  # the daemon decides (watch_daemon)

    async def watch_daemon(self, period_s: float = 0.5) -> None:
        """Ready exactly while the daemon says it serves (so a KServe readiness probe is the daemon's),
        and not before this process has answered one request of its own per dataset (`warm_up`)."""
        probe = AsyncClient(self.endpoint, timeout_s=2.0)
        warm = False
        try:
            while True:
                try:
                    status = await probe.status()
                    serving = status["state"] == M.DaemonState.SERVING
                    if serving and not warm:
                        await self.warm_up(status["datasets"])
                        warm = True
                    self.ready = serving
                except DaemonError:
                    self.ready = False
                await asyncio.sleep(period_s)
        finally:
            probe.close()

    async def warm_up(self, datasets: dict[str, int]) -> None:
        """One request of one sample through `predict` per registered dataset, before the first client's:
        what a process does once (its wire connection, LoadSamples of the dataset, the first pass through
        KServe's tensor types) is not paid inside a client's run. (On an H100 host the first LoadGen
        Server run through a fresh front end was INVALID three times out of three, p99 52-225 ms, where
        later runs at higher rates were VALID.) A failure is logged; serving goes on."""
        for name, samples in datasets.items():
            if samples < 1:
                continue
            request = InferRequest(model_name=self.name, parameters={"dataset": name, "deadline_s": "inf"},
                                   infer_inputs=[InferInput("sample_ids", [1], "INT64",
                                                            data=np.zeros(1, dtype=np.int64))])
            try:
                await self.predict(request)
            except Exception as exc:  # a warm-up must not keep the front end from serving
                log.warning("front end warm-up on dataset %s failed: %s", name, exc)

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "dense", "datatype": "FP32", "shape": [-1, DENSE_FEATURES]},
                {"name": "sparse", "datatype": "INT64", "shape": [-1, NUM_TABLES]},
                {"name": "sample_ids", "datatype": "INT64", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "probability", "datatype": "FP32", "shape": [-1]}]

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("only Open Inference Protocol (v2) requests are served")
        inputs = {i.name: i for i in payload.inputs}
        deadline = _deadline(_param(payload.parameters, "deadline_s"))
        try:
            if "sample_ids" in inputs:
                dataset = _param(payload.parameters, "dataset")
                if not isinstance(dataset, str) or not dataset:
                    raise InvalidInput("sample_ids needs the request parameter 'dataset' (a registered dataset's name)")
                ids = _tensor(inputs["sample_ids"], ("INT64", "INT32"), 1, None)
                await self._ensure_loaded(dataset)
                preds = await self._wire().infer_by_ref(dataset, ids.astype(np.int64, copy=False), deadline)
            elif "dense" in inputs and "sparse" in inputs:
                dense = _tensor(inputs["dense"], ("FP32",), 2, DENSE_FEATURES)
                sparse = _tensor(inputs["sparse"], ("INT32", "INT64"), 2, NUM_TABLES)
                if len(dense) != len(sparse):
                    raise InvalidInput(f"dense has {len(dense)} rows and sparse {len(sparse)}: one row a pair each")
                if sparse.dtype != np.int32:
                    if sparse.size and (sparse.min() < 0 or sparse.max() >= 2**31):
                        raise InvalidInput("sparse ids outside int32")
                    sparse = sparse.astype(np.int32)
                preds = await self._wire().infer_by_value(dense, sparse, deadline)
            else:
                raise InvalidInput(f"send inputs 'dense' and 'sparse' (by value) or 'sample_ids' (by reference, with "
                                   f"the parameter 'dataset'); got {sorted(inputs)}")
        except BadRequest as exc:
            raise InvalidInput(exc.message) from None
        except DaemonError as exc:
            raise InferenceError(str(exc)) from None
        out = InferOutput(name="probability", shape=[int(len(preds))], datatype="FP32")
        out.set_data_from_numpy(np.ascontiguousarray(preds, dtype=np.float32), binary_data=payload.use_binary_outputs)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[out],
                             parameters={"model": getattr(preds, "model", "")})

    async def _ensure_loaded(self, dataset: str) -> None:
        """Mark every sample of `dataset` servable on this front end's connection (once): the Open
        Inference Protocol has no LoadGen working set to announce."""
        if dataset in self._loaded:
            return
        async with self._load_lock:
            if dataset in self._loaded:
                return
            status = await self._wire().status()
            if dataset not in status["datasets"]:
                raise InvalidInput(f"unknown dataset {dataset!r} (registered: {', '.join(status['datasets']) or 'none'})")
            await self._wire().load_samples(dataset, np.arange(int(status["datasets"][dataset]), dtype=np.int64))
            self._loaded.add(dataset)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _deadline(value: Any) -> float | None:
    """The request's `deadline_s` parameter: None (absent), seconds, or "inf" (throughput work)."""
    if value is None:
        return None
    try:
        deadline = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"parameter deadline_s: a number of seconds or \"inf\", got {value!r}") from None
    if not deadline > 0:
        raise InvalidInput(f"parameter deadline_s must be > 0, got {value!r}")
    return M.NO_DEADLINE if deadline == float("inf") else deadline


def _tensor(inp: Any, datatypes: tuple[str, ...], ndim: int, width: int | None) -> np.ndarray:
    """An input as a numpy array of one of `datatypes` and shape [n] or [n, width]; InvalidInput if not."""
    if inp.datatype not in datatypes:
        raise InvalidInput(f"input {inp.name!r}: datatype {inp.datatype} not accepted, send {' or '.join(datatypes)}")
    shape = list(inp.shape)
    if len(shape) != ndim or (width is not None and shape[-1] != width):
        want = "[n]" if ndim == 1 else f"[n, {width}]"
        raise InvalidInput(f"input {inp.name!r}: shape {shape}, expected {want}")
    try:
        arr = np.asarray(inp.as_numpy())
    except Exception as exc:  # a tensor whose data does not match its shape or datatype
        raise InvalidInput(f"input {inp.name!r}: {exc}") from None
    if list(arr.shape) != shape:
        raise InvalidInput(f"input {inp.name!r}: data of shape {list(arr.shape)} for declared shape {shape}")
    return np.ascontiguousarray(arr, dtype=_DTYPES[inp.datatype])
