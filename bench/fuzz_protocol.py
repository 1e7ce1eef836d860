"""Protocol fuzz benchmark: N random / malformed / mutated client messages against a live daemon.

Each case is one multipart message drawn from: random bytes; random msgpack values; a known or
unknown tag followed by random fields; and mutations (bit flips, truncation, extension, dropped or
extra frames) of valid requests. Messages are pipelined (a window of --window in flight); every
message must get exactly one reply that decodes as a Reply with a known error code. Reports cases/s,
replies by type/code, the daemon's RSS after warm-up and at the end, and the daemon's exit code.

    .venv/bin/python bench/fuzz_protocol.py --cases 100000
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from formats.model_config import DLRMConfig
from formats.artifact import write_model_description
from wire import messages as P  # noqa: E402
from wire.client import Client, wait_until_serving  # noqa: E402
from wire.errors import ErrorCode  # noqa: E402
from formats.dataset import write_dataset  # noqa: E402

TAGS = ["InferByRef", "InferByValue", "LoadSamples", "UnloadSamples", "RegisterDataset", "GetStatus",
        "InferResult", "Error", "BatchReady", "Shutdown", "Nope", ""]
STRINGS = ["ds", "<i8", "<i4", "<f4", ">i8", "|u1", "/nonexistent", "/etc", "..", "", "x" * 300]


def _value(rng: np.random.Generator, depth: int = 0) -> object:
    k = int(rng.integers(0, 10 if depth < 2 else 8))
    if k == 0:
        return None
    if k == 1:
        return bool(rng.integers(0, 2))
    if k == 2:
        return int(rng.integers(-5, 400))
    if k == 3:
        return [-2**63, 2**63 - 1, 2**64 - 1, -1, 0, 2**31][int(rng.integers(0, 6))]
    if k == 4:
        return [float('nan'), float('inf'), -float('inf'), -1.0, 0.0, 1e-9, 1e300][int(rng.integers(0, 7))]
    if k == 5:
        return STRINGS[int(rng.integers(0, len(STRINGS)))]
    if k == 6:
        return rng.bytes(int(rng.integers(0, 16)))
    if k == 7:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, size=int(rng.integers(0, 8))))
    if k == 8:
        return [_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(i): _value(rng, depth + 1) for i in range(int(rng.integers(0, 3)))}


def _valid(rng: np.random.Generator, rid: int) -> list[bytes]:
    k = int(rng.integers(0, 4))
    if k == 0:
        ids = rng.integers(0, 300, size=int(rng.integers(1, 10)))
        return [P.encode(P.InferByRef(rid, "ds", len(ids))), ids.astype(np.int64).tobytes()]
    if k == 1:
        n = int(rng.integers(1, 20))
        return [P.encode(P.InferByValue(rid, n)), rng.random((n, 13), dtype=np.float32).tobytes(),
                rng.integers(0, 50, size=(n, 26)).astype(np.int32).tobytes()]
    if k == 2:
        return [P.encode(P.GetStatus(rid))]
    ids = rng.integers(0, 300, size=3)
    return [P.encode(P.LoadSamples(rid, "ds", 3)), ids.astype(np.int64).tobytes()]


def _mutate(rng: np.random.Generator, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    i = int(rng.integers(0, len(frames)))
    b = bytearray(frames[i])
    k = int(rng.integers(0, 5))
    if k == 0 and b:
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    elif k == 1:
        b = b[:int(rng.integers(0, len(b) + 1))]
    elif k == 2:
        b += rng.bytes(int(rng.integers(1, 64)))
    elif k == 3 and len(frames) > 1:
        frames.pop(int(rng.integers(1, len(frames))))
        return frames
    else:
        frames.append(rng.bytes(int(rng.integers(0, 128))))
        return frames
    frames[i] = bytes(b)
    return frames


def random_message(rng: np.random.Generator, rid: int) -> list[bytes]:
    k = int(rng.integers(0, 5))
    if k == 0:
        return [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
    if k == 1:
        return [msgspec.msgpack.encode(_value(rng))]
    if k == 2:
        fields = [rid] + [_value(rng) for _ in range(int(rng.integers(0, 7)))]
        extra = [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(0, 3)))]
        return [msgspec.msgpack.encode([TAGS[int(rng.integers(0, len(TAGS)))], *fields]), *extra]
    if k == 3:
        return _mutate(rng, _valid(rng, rid))
    return _valid(rng, rid)  # valid traffic mixed in: the daemon must keep answering it correctly


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=5000, help="cases before the baseline RSS is taken")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dlrmf-", dir="/tmp"))
    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(1, 30, size=300)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    write_dataset(work / "ds", np.zeros(n, np.float32), np.zeros((n, 13), np.float32),
                  rng.integers(0, 50, size=(n, 26)).astype(np.int32), offsets, (50,) * 26, "fuzz")
    write_model_description(work / "art", DLRMConfig((50,) * 26))
    (work / "d.toml").write_text(
        f'runtime_dir = "{work}/rt"\nengines = ["null"]\nmodel = "{work}/art"\nmax_batch_pairs = 2000\n'
        f'max_message_bytes = 65536\nmax_pairs_per_query = 5000\nmax_queue_pairs = 20000\n'
        f'[datasets]\nds = "{work}/ds"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(work / "d.toml")], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"ipc://{work}/rt/dlrm.sock"
    wait_until_serving(endpoint, 30, daemon)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    outcomes: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    sent = got = 0
    rss0 = 0
    t0 = time.monotonic()
    t_warm = t0
    while got < args.cases:
        while sent < args.cases and sent - got < args.window:
            sock.send_multipart(random_message(rng, sent))
            sent += 1
        if not sock.poll(10_000):
            bad.append(f"no reply within 10 s after {got} replies (daemon exit {daemon.poll()})")
            break
        while sock.poll(0):
            frames = sock.recv_multipart()
            got += 1
            try:
                reply = P.reply_decoder.decode(frames[0])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                bad.append(f"undecodable reply: {exc}")
                continue
            if isinstance(reply, P.Error):
                if reply.code not in tuple(ErrorCode) or not reply.message:
                    bad.append(f"bad error reply {reply}")
                outcomes[reply.code] += 1
            elif isinstance(reply, P.InferResults):  # one message answers several requests
                outcomes["InferResult"] += len(reply.request_ids)
                got += len(reply.request_ids) - 1
            else:
                outcomes[type(reply).__name__] += 1
            if rss0 == 0 and got >= args.warmup:
                rss0, t_warm = _rss_kb(daemon.pid), time.monotonic()
    elapsed = time.monotonic() - t0
    rss1 = _rss_kb(daemon.pid) if daemon.poll() is None else 0
    with Client(endpoint, timeout_s=5) as c:
        alive_status = c.status()["state"]
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(60)
    log.close()
    tracebacks = (work / "daemon.log").read_text(errors="replace").count("Traceback")
    result = {"cases": got, "seconds": round(elapsed, 1), "cases_per_s": round(got / elapsed),
              "outcomes": dict(outcomes.most_common()), "protocol_violations": len(bad), "first": bad[:3],
              "rss_kb_after_warmup": rss0, "rss_kb_end": rss1,
              "rss_growth_kb_per_10k_cases": round((rss1 - rss0) / max(1, got - args.warmup) * 1e4, 1),
              "state_at_end": alive_status, "daemon_exit": code, "tracebacks_in_log": tracebacks,
              "after_warmup_s": round(time.monotonic() - t_warm, 1)}
    print(json.dumps(result, indent=1))
    return 0 if not bad and code == 0 and tracebacks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
