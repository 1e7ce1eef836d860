"""Client library: Client (blocking), AsyncClient (asyncio) and PipelinedClient (drivers).

All three speak wire/messages.py over a DEALER socket: a msgpack header frame plus raw array frames.
Each request kind is defined once (a `Call`: how its header and frames are built, what its reply
becomes); `Client` and `AsyncClient` expose every call as a method through the same definition, so the
two cannot drift apart. Array inputs are sent without copying when large (pyzmq copy=False keeps them
referenced until sent); predictions come back as read-only float32 views of the received frame.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Concatenate, Generic, ParamSpec, TypeVar, overload

import msgspec
import msgspec.structs
import numpy as np
import zmq
import zmq.asyncio

from wire import messages as M
from wire.curve import ClientCurve
from wire.errors import ConnectionFailed, DaemonError, error_for

_ZERO_COPY_MIN = 1 << 16  # below this pyzmq copies anyway, and a copy is cheaper than tracking
Frames = tuple[Any, ...]
Params = ParamSpec("Params")
Result = TypeVar("Result")


def _ids(sample_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(sample_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"sample ids must be integers, got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _apply_curve(sock: zmq.Socket[Any], curve: ClientCurve | None) -> None:
    """CURVE keys from the argument, else DLRM_CURVE_SERVER_KEY / DLRM_CURVE_CLIENT_KEY, else none."""
    curve = curve if curve is not None else ClientCurve.from_env()
    if curve is not None:
        try:
            curve.apply(sock)
        except (OSError, ValueError) as exc:
            raise ConnectionFailed(f"CURVE keys: {exc}") from None


def _connect(sock: zmq.Socket[Any], endpoint: str, curve: ClientCurve | None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    _apply_curve(sock, curve)
    sock.connect(endpoint)


def by_value_header(rid: int, dense: np.ndarray, sparse: np.ndarray, deadline_s: float | None) -> bytes:
    if dense.ndim != 2 or sparse.ndim != 2 or len(dense) != len(sparse):
        raise ValueError(f"dense [n,13] and sparse [n,26] must have the same n, got {dense.shape} and {sparse.shape}")
    return M.encode(M.InferByValue(request_id=rid, num_pairs=len(dense), deadline_s=deadline_s,
                                   dense_dtype=dense.dtype.str, sparse_dtype=sparse.dtype.str))


def _decode(frames: list[Any]) -> tuple[Any, list[Any]]:
    try:
        return M.reply_decoder.decode(frames[0]), frames[1:]
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DaemonError(f"undecodable reply from the daemon: {exc}") from None


def _buffer(frame: Any) -> Any:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


class Predictions(np.ndarray):
    """float32 predictions (a read-only view of the reply) that also say which model computed them:
    `.model` is the reply's model id (`directory@checksum`; "" from a daemon that does not send it)."""

    model: str = ""

    def __array_finalize__(self, obj: Any) -> None:
        self.model = getattr(obj, "model", "")  # slices and views keep saying which model


def predictions(values: np.ndarray, model: str) -> Predictions:
    out = values.view(Predictions)
    out.model = model
    return out


def _split(reply: M.InferResults, rest: list[Any]) -> list[tuple[int, Predictions]]:
    """(request id, predictions view) for each query of a multi-result reply."""
    if len(rest) != 1:
        raise DaemonError(f"InferResults with {len(rest)} frames")
    counts = np.asarray(reply.num_pairs, dtype=np.int64)
    preds = M.as_array(_buffer(rest[0]), M.PRED_DTYPE, int(counts.sum()))
    return [(r, predictions(p, reply.model))
            for r, p in zip(reply.request_ids, np.split(preds, np.cumsum(counts)[:-1]))]


def _value(reply: Any, rest: list[Any]) -> Any:
    """What a reply means for its caller: predictions, a status dict, None; an Error raises."""
    if isinstance(reply, M.Error):
        raise error_for(reply.code, reply.message)
    if isinstance(reply, M.InferResult):
        if len(rest) != 1:
            raise DaemonError(f"InferResult with {len(rest)} frames")
        return predictions(M.as_array(_buffer(rest[0]), M.PRED_DTYPE, reply.num_pairs), reply.model)
    if isinstance(reply, M.Reloaded):
        return msgspec.structs.asdict(reply)
    if isinstance(reply, M.Status):
        out = msgspec.structs.asdict(reply)
        out["engines"] = [msgspec.structs.asdict(e) for e in reply.engines]
        return out
    return None


# ---- every request kind, once ----
@dataclass(frozen=True)
class Call(Generic[Params, Result]):
    """One request kind: `build(request_id, *args)` gives its header and frames."""

    build: Callable[Concatenate[int, Params], tuple[bytes, Frames]]
    result: type[Result]  # what the call returns (documentation and typing; the reply decides)


def _register(rid: int, name: str, path: str) -> tuple[bytes, Frames]:
    return M.encode(M.RegisterDataset(request_id=rid, name=name, path=str(path))), ()


def _load(rid: int, dataset: str, sample_ids: np.ndarray) -> tuple[bytes, Frames]:
    ids = _ids(sample_ids)
    return M.encode(M.LoadSamples(request_id=rid, dataset=dataset, num_samples=len(ids))), (ids,)


def _unload(rid: int, dataset: str, sample_ids: np.ndarray) -> tuple[bytes, Frames]:
    ids = _ids(sample_ids)
    return M.encode(M.UnloadSamples(request_id=rid, dataset=dataset, num_samples=len(ids))), (ids,)


def _by_ref(rid: int, dataset: str, sample_ids: np.ndarray, deadline_s: float | None = None) -> tuple[bytes, Frames]:
    ids = _ids(sample_ids)
    return M.encode(M.InferByRef(request_id=rid, dataset=dataset, num_samples=len(ids), deadline_s=deadline_s)), (ids,)


def _by_value(rid: int, dense: np.ndarray, sparse: np.ndarray,
              deadline_s: float | None = None) -> tuple[bytes, Frames]:
    d, s = np.ascontiguousarray(dense), np.ascontiguousarray(sparse)
    return by_value_header(rid, d, s, deadline_s), (d, s)


def _status(rid: int) -> tuple[bytes, Frames]:
    return M.encode(M.GetStatus(request_id=rid)), ()


def _register_output(rid: int, path: str, num_predictions: int) -> tuple[bytes, Frames]:
    return M.encode(M.RegisterOutput(request_id=rid, path=str(path), num_predictions=num_predictions)), ()


def _unregister_output(rid: int, path: str) -> tuple[bytes, Frames]:
    return M.encode(M.UnregisterOutput(request_id=rid, path=str(path))), ()


def _reload(rid: int, config: str = "") -> tuple[bytes, Frames]:
    return M.encode(M.Reload(request_id=rid, config=str(config))), ()


REGISTER_DATASET = Call(_register, type(None))  # make a dataset directory servable by reference
LOAD_SAMPLES = Call(_load, type(None))  # mark samples servable (the LoadGen working set)
UNLOAD_SAMPLES = Call(_unload, type(None))  # withdraw them
INFER_BY_REF = Call(_by_ref, Predictions)  # predictions of the pairs of samples of a registered dataset
INFER_BY_VALUE = Call(_by_value, Predictions)  # predictions of pairs given inline
STATUS = Call(_status, dict)  # the daemon's engines, queue, rates and totals
# swap in the model of the daemon's (re-read) config: {model, previous_model, seconds, checks}; minutes
# for a large model, so give the client a timeout to match; ReloadFailed when refused
RELOAD = Call(_reload, dict)
# an output region (wire/output_region.py) this client's requests may name: engines write predictions
# there; it is released when this client unregisters it or disconnects
REGISTER_OUTPUT = Call(_register_output, type(None))
UNREGISTER_OUTPUT = Call(_unregister_output, type(None))


class _SyncMethod(Generic[Params, Result]):
    def __init__(self, call: Call[Params, Result]) -> None:
        self.call = call

    @overload
    def __get__(self, obj: None, owner: type) -> "_SyncMethod[Params, Result]": ...
    @overload
    def __get__(self, obj: "Client", owner: type) -> Callable[Params, Result]: ...

    def __get__(self, obj: "Client | None", owner: type) -> Any:
        return self if obj is None else functools.partial(obj.invoke, self.call)


class _AsyncMethod(Generic[Params, Result]):
    def __init__(self, call: Call[Params, Result]) -> None:
        self.call = call

    @overload
    def __get__(self, obj: None, owner: type) -> "_AsyncMethod[Params, Result]": ...
    @overload
    def __get__(self, obj: "AsyncClient", owner: type) -> Callable[Params, Awaitable[Result]]: ...

    def __get__(self, obj: "AsyncClient | None", owner: type) -> Any:
        return self if obj is None else functools.partial(obj.invoke, self.call)


class Client:
    """Blocking client; one request at a time. Every failure raises a wire.errors type."""

    register_dataset = _SyncMethod(REGISTER_DATASET)
    load_samples = _SyncMethod(LOAD_SAMPLES)
    unload_samples = _SyncMethod(UNLOAD_SAMPLES)
    infer_by_ref = _SyncMethod(INFER_BY_REF)
    infer_by_value = _SyncMethod(INFER_BY_VALUE)
    status = _SyncMethod(STATUS)
    reload = _SyncMethod(RELOAD)
    register_output = _SyncMethod(REGISTER_OUTPUT)
    unregister_output = _SyncMethod(UNREGISTER_OUTPUT)

    def __init__(self, endpoint: str, timeout_s: float = 30.0, curve: ClientCurve | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        _connect(self._sock, endpoint, curve)
        self._ids = itertools.count(1)

    def invoke(self, call: Call[Params, Result], *args: Params.args, **kwargs: Params.kwargs) -> Result:
        rid = next(self._ids)
        header, frames = call.build(rid, *args, **kwargs)
        self._sock.send_multipart([header, *frames],
                                  copy=all(memoryview(f).nbytes < _ZERO_COPY_MIN for f in frames))
        end = time.monotonic() + self.timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise ConnectionFailed(f"no reply from {self.endpoint} within {self.timeout_s} s")
            reply, rest = _decode(self._sock.recv_multipart(copy=False))
            if isinstance(reply, M.InferResults):
                for r, preds in _split(reply, rest):
                    if r == rid:
                        return preds  # type: ignore[return-value]
                continue
            if reply.request_id in (rid, -1):  # -1: the daemon could not read our header
                return _value(reply, rest)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; many calls may be awaited concurrently on one socket."""

    register_dataset = _AsyncMethod(REGISTER_DATASET)
    load_samples = _AsyncMethod(LOAD_SAMPLES)
    unload_samples = _AsyncMethod(UNLOAD_SAMPLES)
    infer_by_ref = _AsyncMethod(INFER_BY_REF)
    infer_by_value = _AsyncMethod(INFER_BY_VALUE)
    status = _AsyncMethod(STATUS)
    reload = _AsyncMethod(RELOAD)
    register_output = _AsyncMethod(REGISTER_OUTPUT)
    unregister_output = _AsyncMethod(UNREGISTER_OUTPUT)

    def __init__(self, endpoint: str, timeout_s: float = 30.0, curve: ClientCurve | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._sock: zmq.asyncio.Socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        _connect(self._sock, endpoint, curve)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Future[None] | None = None

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                reply, rest = _decode(frames)
            except DaemonError as exc:
                for pending in self._waiting.values():
                    if not pending.done():
                        pending.set_exception(exc)
                continue
            if isinstance(reply, M.InferResults):
                try:
                    parts = _split(reply, rest)
                except DaemonError:
                    continue
                for r, preds in parts:
                    waiter = self._waiting.pop(r, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(preds)
                continue
            fut: asyncio.Future[Any] | None = self._waiting.pop(reply.request_id, None)
            if fut is not None and not fut.done():
                try:
                    fut.set_result(_value(reply, rest))
                except DaemonError as exc:
                    fut.set_exception(exc)

    async def invoke(self, call: Call[Params, Result], *args: Params.args, **kwargs: Params.kwargs) -> Result:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        rid = next(self._ids)
        header, frames = call.build(rid, *args, **kwargs)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            await self._sock.send_multipart([header, *frames])
            return await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            raise ConnectionFailed(f"no reply from {self.endpoint} within {self.timeout_s} s") from None
        finally:
            self._waiting.pop(rid, None)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(0)


@dataclass(frozen=True, slots=True)
class PipelinedReply:
    """One answer for PipelinedClient: predictions (read-only float32) or a typed error."""

    request_id: int
    predictions: np.ndarray | None
    error: DaemonError | None
    model: str = ""  # the model that computed the predictions (the reply's model id)
    written: bool = False  # the predictions are in the output region the request named (predictions None)


class PipelinedClient:
    """For drivers: send without waiting (request ids are the caller's), collect many replies per poll.

    Not thread-safe: use it from one thread (ZeroMQ sockets are single-threaded)."""

    def __init__(self, endpoint: str, curve: ClientCurve | None = None) -> None:
        self.endpoint = endpoint
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.SNDHWM, 1_000_000)
        self._sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self._sock.setsockopt(zmq.SNDBUF, 8 << 20)  # see the dispatcher: MB-sized replies
        self._sock.setsockopt(zmq.RCVBUF, 8 << 20)
        _connect(self._sock, endpoint, curve)
        self._enc = msgspec.msgpack.Encoder()

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The DEALER socket (e.g. to poll it together with other sockets)."""
        return self._sock

    def send_by_ref(self, request_id: int, dataset: str, sample_ids: np.ndarray,
                    deadline_s: float | None = None, output: str = "", output_offset: int = 0) -> None:
        """`output`: a registered output region's path; the predictions are written there from element
        `output_offset` on, and the reply says so (`written`) instead of carrying them."""
        ids = sample_ids if sample_ids.dtype == np.int64 and sample_ids.flags.c_contiguous else _ids(sample_ids)
        s = self._sock
        s.send(self._enc.encode(M.InferByRef(request_id, dataset, len(ids), deadline_s, M.SAMPLE_ID_DTYPE,
                                             output, output_offset)), zmq.SNDMORE)
        if ids.nbytes < _ZERO_COPY_MIN:
            s.send(ids.data)
        else:
            s.send(ids.data, copy=False)

    def send_by_value(self, request_id: int, dense: np.ndarray, sparse: np.ndarray,
                      deadline_s: float | None = None) -> None:
        header, (d, sp) = _by_value(request_id, dense, sparse, deadline_s)
        self._sock.send_multipart([header, d, sp], copy=d.nbytes + sp.nbytes < _ZERO_COPY_MIN)

    def poll(self, timeout_ms: int) -> list[PipelinedReply]:
        """Every reply available now, waiting up to timeout_ms for the first one."""
        s = self._sock
        out: list[PipelinedReply] = []
        if not s.poll(timeout_ms):
            return out
        decode = M.reply_decoder.decode
        while True:
            try:
                frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            try:
                reply = decode(frames[0].buffer)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                out.append(PipelinedReply(-1, None, DaemonError(f"undecodable reply: {exc}")))
                continue
            t = type(reply)
            if t is M.InferResults and len(frames) == 2:
                preds = np.frombuffer(frames[1].buffer, np.float32)
                ends = np.cumsum(reply.num_pairs).tolist()
                if ends and ends[-1] == len(preds):
                    start = 0
                    for r, end in zip(reply.request_ids, ends):
                        out.append(PipelinedReply(r, preds[start:end], None, reply.model))
                        start = end
                else:
                    out.append(PipelinedReply(-1, None, DaemonError("InferResults frame size does not match num_pairs")))
            elif t is M.InferWritten:
                out.extend(PipelinedReply(r, None, None, reply.model, True) for r in reply.request_ids)
            elif t is M.InferResult and len(frames) == 2:
                out.append(PipelinedReply(reply.request_id, np.frombuffer(frames[1].buffer, np.float32), None,
                                          reply.model))
            elif isinstance(reply, M.Error):
                out.append(PipelinedReply(reply.request_id, None, error_for(reply.code, reply.message)))
            else:
                rid = getattr(reply, "request_id", -1)
                out.append(PipelinedReply(rid, None, DaemonError(f"unexpected reply {type(reply).__name__}")))

    def close(self) -> None:
        self._sock.close(0)


def wait_until_serving(endpoint: str, timeout_s: float = 60.0, proc: Any = None) -> dict[str, Any]:
    """Poll GetStatus until the daemon reports 'serving' and return that status.

    `proc` (a subprocess.Popen of the daemon, optional) makes an early exit fail at once instead of
    after the timeout. Raises ConnectionFailed naming the endpoint (and the exit code, if any).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConnectionFailed(f"dlrm-daemon for {endpoint} exited with code {proc.returncode} while starting")
        try:
            with Client(endpoint, timeout_s=0.5) as client:
                status = client.status()
            if status.get("state") == M.DaemonState.SERVING:
                return status
        except DaemonError:
            pass
        time.sleep(0.1)
    raise ConnectionFailed(f"dlrm-daemon at {endpoint} did not report 'serving' within {timeout_s:g} s")
