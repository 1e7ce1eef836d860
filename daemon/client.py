"""Client library: Client (blocking), AsyncClient (asyncio) and PipelinedClient (drivers).

All three speak daemon/protocol.py over a DEALER socket: a msgpack header frame plus raw array
frames. Array inputs are sent without copying when large (pyzmq copy=False keeps them referenced
until sent); predictions come back as read-only float32 views of the received frame.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.structs
import numpy as np
import zmq
import zmq.asyncio

from daemon import protocol as P
from daemon.errors import ConnectionFailed, DaemonError, error_for
from daemon.security import ClientCurve

_ZERO_COPY_MIN = 1 << 16  # below this pyzmq copies anyway, and a copy is cheaper than tracking


def _ids(sample_ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(sample_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"sample ids must be integers, got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _apply_curve(sock: zmq.Socket, curve: ClientCurve | None) -> None:
    """CURVE keys from the argument, else DLRM_CURVE_SERVER_KEY / DLRM_CURVE_CLIENT_KEY, else none."""
    curve = curve if curve is not None else ClientCurve.from_env()
    if curve is not None:
        try:
            curve.apply(sock)
        except (OSError, ValueError) as exc:
            raise ConnectionFailed(f"CURVE keys: {exc}") from None


def _frame(arr: np.ndarray) -> Any:
    return np.ascontiguousarray(arr)


def _by_value_header(rid: int, dense: np.ndarray, sparse: np.ndarray, deadline_s: float | None) -> bytes:
    if dense.ndim != 2 or sparse.ndim != 2 or len(dense) != len(sparse):
        raise ValueError(f"dense [n,13] and sparse [n,26] must have the same n, got {dense.shape} and {sparse.shape}")
    return P.encode(P.InferByValue(request_id=rid, num_pairs=len(dense), deadline_s=deadline_s,
                                   dense_dtype=dense.dtype.str, sparse_dtype=sparse.dtype.str))


def _decode(frames: list[Any]) -> tuple[Any, list[Any]]:
    try:
        return P.reply_decoder.decode(frames[0]), frames[1:]
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DaemonError(f"undecodable reply from the daemon: {exc}") from None


def _split(reply: P.InferResults, rest: list[Any]) -> list[tuple[int, np.ndarray]]:
    """(request id, predictions view) for each query of a multi-result reply."""
    if len(rest) != 1:
        raise DaemonError(f"InferResults with {len(rest)} frames")
    buf = rest[0].buffer if isinstance(rest[0], zmq.Frame) else rest[0]
    counts = np.asarray(reply.num_pairs, dtype=np.int64)
    preds = P.as_array(buf, P.PRED_DTYPE, int(counts.sum()))
    return list(zip(reply.request_ids, np.split(preds, np.cumsum(counts)[:-1])))


def _result(reply: Any, rest: list[Any]) -> Any:
    if isinstance(reply, P.Error):
        raise error_for(reply.code, reply.message)
    if isinstance(reply, P.InferResult):
        if len(rest) != 1:
            raise DaemonError(f"InferResult with {len(rest)} frames")
        buf = rest[0].buffer if isinstance(rest[0], zmq.Frame) else rest[0]
        return P.as_array(buf, P.PRED_DTYPE, reply.num_pairs)
    if isinstance(reply, P.Status):
        out = msgspec.structs.asdict(reply)
        out["engines"] = [msgspec.structs.asdict(e) for e in reply.engines]
        return out
    return None


class Client:
    """Blocking client; one request at a time. Every failure raises a daemon.errors type."""

    def __init__(self, endpoint: str, timeout_s: float = 30.0, curve: ClientCurve | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        _apply_curve(self._sock, curve)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)

    def _call(self, header: bytes, rid: int, frames: tuple[Any, ...] = ()) -> Any:
        parts = [header, *frames]
        self._sock.send_multipart(parts, copy=all(memoryview(f).nbytes < _ZERO_COPY_MIN for f in frames))
        end = time.monotonic() + self.timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise ConnectionFailed(f"no reply from {self.endpoint} within {self.timeout_s} s")
            reply, rest = _decode(self._sock.recv_multipart(copy=False))
            if isinstance(reply, P.InferResults):
                for r, preds in _split(reply, rest):
                    if r == rid:
                        return preds
                continue
            if reply.request_id in (rid, -1):  # -1: the daemon could not read our header
                return _result(reply, rest)

    def register_dataset(self, name: str, path: str) -> None:
        rid = next(self._ids)
        self._call(P.encode(P.RegisterDataset(request_id=rid, name=name, path=str(path))), rid)

    def load_samples(self, dataset: str, sample_ids: np.ndarray) -> None:
        ids = _ids(sample_ids)
        rid = next(self._ids)
        self._call(P.encode(P.LoadSamples(request_id=rid, dataset=dataset, num_samples=len(ids))), rid, (ids,))

    def unload_samples(self, dataset: str, sample_ids: np.ndarray) -> None:
        ids = _ids(sample_ids)
        rid = next(self._ids)
        self._call(P.encode(P.UnloadSamples(request_id=rid, dataset=dataset, num_samples=len(ids))), rid, (ids,))

    def infer_by_ref(self, dataset: str, sample_ids: np.ndarray, deadline_s: float | None = None) -> np.ndarray:
        ids = _ids(sample_ids)
        rid = next(self._ids)
        hdr = P.encode(P.InferByRef(request_id=rid, dataset=dataset, num_samples=len(ids), deadline_s=deadline_s))
        return self._call(hdr, rid, (ids,))

    def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray, deadline_s: float | None = None) -> np.ndarray:
        rid = next(self._ids)
        return self._call(_by_value_header(rid, dense, sparse, deadline_s), rid, (_frame(dense), _frame(sparse)))

    def status(self) -> dict:
        rid = next(self._ids)
        return self._call(P.encode(P.GetStatus(request_id=rid)), rid)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; many calls may be awaited concurrently on one socket."""

    def __init__(self, endpoint: str, timeout_s: float = 30.0, curve: ClientCurve | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        _apply_curve(self._sock, curve)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                reply, rest = _decode(frames)
            except DaemonError as exc:
                for fut in self._waiting.values():
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            if isinstance(reply, P.InferResults):
                try:
                    parts = _split(reply, rest)
                except DaemonError:
                    continue
                for r, preds in parts:
                    f = self._waiting.pop(r, None)
                    if f is not None and not f.done():
                        f.set_result(preds)
                continue
            fut = self._waiting.pop(reply.request_id, None)
            if fut is not None and not fut.done():
                try:
                    fut.set_result(_result(reply, rest))
                except DaemonError as exc:
                    fut.set_exception(exc)

    async def _call(self, header: bytes, rid: int, frames: tuple[Any, ...] = ()) -> Any:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            await self._sock.send_multipart([header, *frames])
            return await asyncio.wait_for(fut, self.timeout_s)
        except asyncio.TimeoutError:
            raise ConnectionFailed(f"no reply from {self.endpoint} within {self.timeout_s} s") from None
        finally:
            self._waiting.pop(rid, None)

    async def register_dataset(self, name: str, path: str) -> None:
        rid = next(self._ids)
        await self._call(P.encode(P.RegisterDataset(request_id=rid, name=name, path=str(path))), rid)

    async def load_samples(self, dataset: str, sample_ids: np.ndarray) -> None:
        ids = _ids(sample_ids)
        rid = next(self._ids)
        await self._call(P.encode(P.LoadSamples(request_id=rid, dataset=dataset, num_samples=len(ids))), rid, (ids,))

    async def unload_samples(self, dataset: str, sample_ids: np.ndarray) -> None:
        ids = _ids(sample_ids)
        rid = next(self._ids)
        await self._call(P.encode(P.UnloadSamples(request_id=rid, dataset=dataset, num_samples=len(ids))), rid, (ids,))

    async def infer_by_ref(self, dataset: str, sample_ids: np.ndarray, deadline_s: float | None = None) -> np.ndarray:
        ids = _ids(sample_ids)
        rid = next(self._ids)
        hdr = P.encode(P.InferByRef(request_id=rid, dataset=dataset, num_samples=len(ids), deadline_s=deadline_s))
        return await self._call(hdr, rid, (ids,))

    async def infer_by_value(self, dense: np.ndarray, sparse: np.ndarray,
                             deadline_s: float | None = None) -> np.ndarray:
        rid = next(self._ids)
        return await self._call(_by_value_header(rid, dense, sparse, deadline_s), rid, (_frame(dense), _frame(sparse)))

    async def status(self) -> dict:
        rid = next(self._ids)
        return await self._call(P.encode(P.GetStatus(request_id=rid)), rid)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(0)


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer for PipelinedClient: predictions (read-only float32) or a typed error."""

    request_id: int
    predictions: np.ndarray | None
    error: DaemonError | None


class PipelinedClient:
    """For drivers: send without waiting (request ids are the caller's), collect many replies per poll.

    Not thread-safe: use it from one thread (ZeroMQ sockets are single-threaded)."""

    def __init__(self, endpoint: str, curve: ClientCurve | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 1_000_000)
        self._sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self._sock.setsockopt(zmq.SNDBUF, 8 << 20)  # see the dispatcher: MB-sized replies
        self._sock.setsockopt(zmq.RCVBUF, 8 << 20)
        _apply_curve(self._sock, curve)
        self._sock.connect(endpoint)
        self._enc = msgspec.msgpack.Encoder()

    @property
    def socket(self) -> zmq.Socket:
        """The DEALER socket (e.g. to poll it together with other sockets)."""
        return self._sock

    def send_by_ref(self, request_id: int, dataset: str, sample_ids: np.ndarray,
                    deadline_s: float | None = None) -> None:
        ids = sample_ids if sample_ids.dtype == np.int64 and sample_ids.flags.c_contiguous else _ids(sample_ids)
        s = self._sock
        s.send(self._enc.encode(P.InferByRef(request_id, dataset, len(ids), deadline_s)), zmq.SNDMORE)
        s.send(ids, copy=ids.nbytes < _ZERO_COPY_MIN)

    def send_by_value(self, request_id: int, dense: np.ndarray, sparse: np.ndarray,
                      deadline_s: float | None = None) -> None:
        d, sp = _frame(dense), _frame(sparse)
        copy = d.nbytes + sp.nbytes < _ZERO_COPY_MIN
        self._sock.send_multipart([_by_value_header(request_id, d, sp, deadline_s), d, sp], copy=copy)

    def poll(self, timeout_ms: int) -> list[Reply]:
        """Every reply available now, waiting up to timeout_ms for the first one."""
        s = self._sock
        out: list[Reply] = []
        if not s.poll(timeout_ms):
            return out
        decode = P.reply_decoder.decode
        while True:
            try:
                frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            try:
                reply = decode(frames[0].buffer)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                out.append(Reply(-1, None, DaemonError(f"undecodable reply: {exc}")))
                continue
            t = type(reply)
            if t is P.InferResults and len(frames) == 2:
                preds = np.frombuffer(frames[1].buffer, np.float32)
                ends = np.cumsum(reply.num_pairs).tolist()
                if ends and ends[-1] == len(preds):
                    start = 0
                    for r, end in zip(reply.request_ids, ends):
                        out.append(Reply(r, preds[start:end], None))
                        start = end
                else:
                    out.append(Reply(-1, None, DaemonError("InferResults frame size does not match num_pairs")))
            elif t is P.InferResult and len(frames) == 2:
                out.append(Reply(reply.request_id, np.frombuffer(frames[1].buffer, np.float32), None))
            elif isinstance(reply, P.Error):
                out.append(Reply(reply.request_id, None, error_for(reply.code, reply.message)))
            else:
                out.append(Reply(reply.request_id, None, DaemonError(f"unexpected reply {type(reply).__name__}")))

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
            if status.get("state") == "serving":
                return status
        except DaemonError:
            pass
        time.sleep(0.1)
    raise ConnectionFailed(f"dlrm-daemon at {endpoint} did not report 'serving' within {timeout_s:g} s")
