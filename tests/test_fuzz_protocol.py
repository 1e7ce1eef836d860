"""Fuzz the client wire protocol against one live daemon (hypothesis; a few hundred cases in CI,
bench/fuzz_protocol.py runs 100,000+). Every message, however malformed, gets exactly one typed
reply, and the daemon keeps serving correct answers afterwards."""
from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from wire import messages as P
from wire.errors import ErrorCode
from test_daemon_support import DaemonProc, expected_null_by_ref, make_dataset

_TAGS = ["InferByRef", "InferByValue", "LoadSamples", "UnloadSamples", "RegisterDataset", "GetStatus",
         "InferResult", "Error", "Status", "BatchReady", "Shutdown", "Nope", ""]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.integers(-5, 400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20),
    st.sampled_from(["ds", "<i8", "<i4", "<f4", "|u1", ">i8", "/nonexistent", "/etc", "../ds"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def _header(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=64))  # arbitrary bytes
    if kind == 1:
        return msgspec.msgpack.encode(draw(_values))  # valid msgpack, any shape
    fields = draw(st.lists(_values, max_size=7))
    if kind == 3:  # a plausible request: known tag, small ints where ints are expected
        fields = [draw(st.integers(-3, 2**31))] + fields
    return msgspec.msgpack.encode([draw(st.sampled_from(_TAGS)), *fields])


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=256))
    n = draw(st.integers(0, 40))
    if kind == 1:
        return np.asarray(draw(st.lists(st.integers(-3, 400), min_size=n, max_size=n)), np.int64).tobytes()
    return np.zeros((n, 13 if draw(st.booleans()) else 26), np.float32).tobytes()


_messages = st.tuples(_header(), st.lists(_frame(), max_size=3))


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("fuzz")
    sizes = np.random.default_rng(5).integers(1, 30, size=300)
    ds = make_dataset(d / "ds", sizes)
    art = d / "art"
    write_model_description(art, DLRMConfig((50,) * 26))
    daemon = DaemonProc({"engines": ["null"], "model": str(art), "datasets": {"ds": str(ds)},
                         "max_batch_pairs": 2000, "max_message_bytes": 1 << 16, "max_pairs_per_query": 5000,
                         "max_queue_pairs": 20000})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        daemon.wait_serving()
        sock.connect(daemon.endpoint)
        yield daemon, sock, np.concatenate([[0], np.cumsum(sizes)])
    finally:
        sock.close()
        assert daemon.terminate() == 0, daemon.log()


def check_reply(frames: list[bytes]) -> str:
    """The reply must decode as a Reply; errors must carry a known code. Returns the outcome."""
    reply = P.reply_decoder.decode(frames[0])
    if isinstance(reply, P.Error):
        assert reply.code in tuple(ErrorCode), reply
        assert reply.message
        return reply.code
    return type(reply).__name__


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(msg=_messages)
def test_every_malformed_message_gets_one_typed_reply(fuzz_daemon, msg: tuple[bytes, list[bytes]]) -> None:  # type: ignore[no-untyped-def]
    daemon, sock, _ = fuzz_daemon
    header, frames = msg
    sock.send_multipart([header, *frames])
    assert sock.poll(10_000), f"no reply to {[header, *frames]!r}"
    check_reply(sock.recv_multipart())
    assert not sock.poll(0) or check_reply(sock.recv_multipart()) is None, "more than one reply"
    assert daemon.proc.poll() is None


def test_still_correct_after_fuzzing(fuzz_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    daemon, _, offsets = fuzz_daemon
    ids = np.array([3, 299, 0, 17])
    with daemon.client() as c:
        c.load_samples("ds", np.arange(300))  # the fuzzer may have unloaded some
        np.testing.assert_array_equal(c.infer_by_ref("ds", ids), expected_null_by_ref(offsets, ids))
        st_ = c.status()
    assert st_["state"] == "serving" and st_["totals"].get("BAD_REQUEST", 0) > 0
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
