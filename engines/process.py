"""The engine process shell: control socket, heartbeats, shared-memory slots around any backend.

Started by the supervisor as `python -m engines.process` (a fresh interpreter: never a fork of the
dispatcher, which CUDA would not survive); its msgspec-encoded `EngineSpec` arrives on stdin. Threads:
  main thread  owns the PAIR control socket to the dispatcher, relays messages and sends heartbeats
               every `heartbeat_interval_s`, even while a batch computes or the model loads;
  work thread  loads the backend, then submits batches and runs dataset registrations in arrival order;
  done thread  waits for each submitted batch in order (a GPU backend keeps several in flight) and
               hands results back to the main thread over an inproc PAIR socket.
Exit codes (wire/exitcodes.py): OK after Shutdown, ENGINE_LOAD_FAILURE if the backend cannot be
created, RUNTIME_FAILURE when its dispatcher is gone.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from engines.backend import EngineBackend, PendingBatch
from engines.canary import run_canary
from engines.factory import create_backend, device_name
from wire import messages as P
from wire.exitcodes import ExitCode
from wire.output_region import MappedOutputs
from wire.shm import Region

log = logging.getLogger("dlrm.engine")


@dataclass
class _InFlight:
    """A submitted batch (or a ready reply) waiting for the completion thread, in submission order."""

    started: float  # time.monotonic() at submit: the heartbeat's busy_s
    t0: float  # time.perf_counter() at submit: BatchDone.compute_s
    msg: Any  # the BatchReady it answers, a reply that is already made, or a ReleaseOutput to act on
    pending: PendingBatch | None = None
    # output-region segments to fill from the slot once the batch is done: (region view, slot view)
    scatter: list[tuple[Any, Any]] = field(default_factory=list)


def _scatter(item: _InFlight) -> None:
    """Copy a done batch's region segments out of its slot, and drop the views (a region is unmapped
    only once no view of it is left)."""
    for region_view, slot_view in item.scatter:
        region_view[:] = slot_view
    item.scatter.clear()


class _Completions:
    """Batches in flight between the work thread (put) and the completion thread (peek, pop)."""

    def __init__(self) -> None:
        self._items: deque[_InFlight | None] = deque()
        self._cv = threading.Condition()

    def put(self, item: _InFlight | None) -> None:
        with self._cv:
            self._items.append(item)
            self._cv.notify()

    def peek(self) -> _InFlight | None:
        with self._cv:
            while not self._items:
                self._cv.wait()
            return self._items[0]

    def pop(self) -> None:
        with self._cv:
            self._items.popleft()

    def oldest_start(self) -> float:
        with self._cv:
            item = self._items[0] if self._items else None
        return item.started if item is not None else 0.0


class _Worker(threading.Thread):
    """Loads the backend, then submits batches in arrival order; a completion thread answers them.

    With a pipelining backend (GPU) the work thread prepares and enqueues batch i+1 while the GPU
    computes batch i, and the completion thread waits for batch i (releasing the GIL) and replies. All
    replies after EngineReady leave through the completion thread, the only user of the relay socket.
    """

    def __init__(self, spec: P.EngineSpec, ctx: zmq.Context, region: Region) -> None:
        super().__init__(name=f"engine-{spec.name}-work", daemon=True)
        self.spec = spec
        self.region = region
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.out = ctx.socket(zmq.PAIR)
        self.out.connect(f"inproc://relay-{id(self)}")
        self.completions = _Completions()
        self.batches_done = 0
        self.backend: EngineBackend | None = None
        self._completer_tid = 0
        self._completer_started = threading.Event()
        self.datasets = dict(spec.datasets)  # name -> path of every dataset registered here
        # Output regions batches name (wire/output_region.py): opened by this thread at a batch's
        # submit, released by the completion thread after the batches sent before the release.
        self.outputs = MappedOutputs()
        self._outputs_lock = threading.Lock()

    @property
    def busy_since(self) -> float:
        """time.monotonic() when the oldest batch in flight was submitted; 0 when idle."""
        return self.completions.oldest_start()

    def _send(self, msg: Any) -> None:
        self.out.send(P.encode(msg))

    def run(self) -> None:
        try:
            backend = create_backend(self.spec.device, self.spec.artifact, gpu_part=self.spec.gpu_part,
                                     max_batch_pairs=self.spec.max_batch_pairs, inflight=self.spec.slots,
                                     mlp_precision=self.spec.gpu_mlp_precision, host_rows=self.spec.host_rows,
                                     cold_row_gather=self.spec.cold_row_gather)
            if backend.pin_host_memory(self.region.whole()):
                log.info("engine %s: shared-memory region page-locked (%d bytes)", self.spec.name,
                         self.region.size)
            for name, path in self.spec.datasets.items():
                backend.register_dataset(name, Path(path))
            backend.warm_up()  # before EngineReady: nothing compiles inside a measured run
        except BaseException as exc:  # any load failure must reach the dispatcher as text
            log.exception("engine %s: backend failed to load", self.spec.name)
            self._send(P.EngineLoadFailed(message=f"{type(exc).__name__}: {exc}"))
            return
        self.backend = backend
        completer = threading.Thread(target=self._complete, name=f"engine-{self.spec.name}-done", daemon=True)
        completer.start()
        self._completer_started.wait()
        log.info("engine %s ready on %s (model %s, %d dataset(s))", self.spec.name, self.spec.device,
                 self.spec.artifact, len(self.spec.datasets))
        tuned = getattr(backend, "tuned_keys", None)
        if tuned:  # launch choices measured for this card and kept with the artifact (formats/kernel_tuning.py)
            log.info("engine %s: kernel tuning from the artifact: %s", self.spec.name, ", ".join(tuned))
        self._send(P.EngineReady(device=self.spec.device, pid=os.getpid(),
                                 device_memory_bytes=int(backend.device_memory_bytes()),
                                 device_name=device_name(self.spec.device),
                                 work_tids=[threading.get_native_id(), self._completer_tid]))
        while True:
            msg = self.inbox.get()
            if msg is None:
                break
            if isinstance(msg, P.BatchReady):
                self._submit(backend, msg)
            elif isinstance(msg, P.AddDataset):
                try:
                    backend.register_dataset(msg.name, Path(msg.path))
                    self.datasets[msg.name] = msg.path
                    reply: Any = P.DatasetAdded(name=msg.name, error="")
                except Exception as exc:
                    reply = P.DatasetAdded(name=msg.name, error=f"{type(exc).__name__}: {exc}")
                self.completions.put(_InFlight(time.monotonic(), time.perf_counter(), reply))
            elif isinstance(msg, P.ReleaseOutput):
                self.completions.put(_InFlight(time.monotonic(), time.perf_counter(), msg))
            elif isinstance(msg, P.RunCanary):
                # after the batches submitted before it (the completion thread answers in order)
                done = run_canary(backend, self.spec, self.datasets, msg, msg.reference)
                self.completions.put(_InFlight(time.monotonic(), time.perf_counter(), done))
        self.completions.put(None)
        completer.join()
        backend.close()
        self.outputs.close()

    def _submit(self, backend: EngineBackend, msg: P.BatchReady) -> None:
        item = _InFlight(time.monotonic(), time.perf_counter(), msg)
        try:
            v = self.region.slots[msg.slot]
            n = msg.num_pairs
            out = v.out[:n]
            if msg.outputs:
                out = self._outputs_of(msg, out, item)
            if msg.kind is P.BatchKind.REF:
                r = msg.num_ranges
                item.pending = backend.submit_by_ref(msg.dataset, v.starts[:r], v.counts[:r], out)
            else:
                item.pending = backend.submit_by_value(v.dense[:n], v.sparse[:n], out)
        except Exception as exc:
            log.exception("engine %s: batch %d failed", self.spec.name, msg.batch_id)
            item.msg = P.BatchFailed(batch_id=msg.batch_id, slot=msg.slot, message=f"{type(exc).__name__}: {exc}")
        self.completions.put(item)

    def _outputs_of(self, msg: P.BatchReady, slot_out: Any, item: _InFlight) -> Any:
        """Where the backend writes the batch: straight into an output region when one segment takes
        the whole batch, else into the slot, with the region segments copied out when it is done."""
        with self._outputs_lock:
            if len(msg.outputs) == 1 and msg.outputs[0][0]:
                path, start, k = msg.outputs[0]
                if k != msg.num_pairs:
                    raise ValueError(f"output segments cover {k} of the batch's {msg.num_pairs} pairs")
                return self.outputs.view(path, start, k)
            pos = 0
            for path, start, k in msg.outputs:
                if path:
                    item.scatter.append((self.outputs.view(path, start, k), slot_out[pos:pos + k]))
                pos += k
            if pos != msg.num_pairs:
                raise ValueError(f"output segments cover {pos} of the batch's {msg.num_pairs} pairs")
        return slot_out

    def _complete(self) -> None:
        self._completer_tid = threading.get_native_id()
        self._completer_started.set()
        while (item := self.completions.peek()) is not None:
            reply = item.msg
            if isinstance(reply, P.ReleaseOutput):
                with self._outputs_lock:
                    self.outputs.release(reply.path)
                self.completions.pop()
                continue
            if item.pending is not None:
                msg = item.msg
                try:
                    stats = item.pending.wait()
                    _scatter(item)
                    reply = P.BatchDone(batch_id=msg.batch_id, slot=msg.slot, num_pairs=msg.num_pairs,
                                        hot_lookups=int(stats.hot_lookups), cold_lookups=int(stats.cold_lookups),
                                        compute_s=time.perf_counter() - item.t0)
                except Exception as exc:
                    log.exception("engine %s: batch %d failed", self.spec.name, msg.batch_id)
                    reply = P.BatchFailed(batch_id=msg.batch_id, slot=msg.slot,
                                          message=f"{type(exc).__name__}: {exc}")
            if isinstance(reply, (P.BatchDone, P.BatchFailed)):
                self.batches_done += 1
            self.completions.pop()
            self._send(reply)


def run_engine(spec: P.EngineSpec) -> int:
    ctx = zmq.Context()
    ctrl = ctx.socket(zmq.PAIR)
    ctrl.setsockopt(zmq.LINGER, 1000)
    ctrl.connect(spec.control_endpoint)
    region = Region(Path(spec.shm_path), spec.slots, spec.max_batch_pairs, owner=False)
    relay = ctx.socket(zmq.PAIR)
    worker = _Worker(spec, ctx, region)
    relay.bind(f"inproc://relay-{id(worker)}")
    worker.start()
    poller = zmq.Poller()
    poller.register(ctrl, zmq.POLLIN)
    poller.register(relay, zmq.POLLIN)
    interval_ms = max(1, int(spec.heartbeat_interval_s * 1000))
    next_hb = 0.0
    seq = 0
    code = ExitCode.OK

    def heartbeat(now: float) -> None:
        nonlocal seq, next_hb
        busy = worker.busy_since
        ctrl.send(P.encode(P.Heartbeat(seq=seq, busy_s=now - busy if busy else 0.0,
                                       batches_done=worker.batches_done, sent_at=now)))
        seq += 1
        next_hb = now + spec.heartbeat_interval_s

    try:
        while True:
            now = time.monotonic()
            if now >= next_hb:
                heartbeat(now)
                if os.getppid() != spec.parent_pid:
                    log.error("engine %s: dispatcher is gone, exiting", spec.name)
                    code = ExitCode.RUNTIME_FAILURE
                    break
            events = dict(poller.poll(min(interval_ms, max(0, int((next_hb - now) * 1000)) + 1)))
            if relay in events:
                while True:
                    try:
                        data = relay.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    ctrl.send(data)
                    # Relaying can go on for long under load (every pyzmq call gives up the GIL to
                    # a busy work thread): keep the heartbeat due time inside this loop too.
                    if (now := time.monotonic()) >= next_hb:
                        heartbeat(now)
                    if isinstance(P.control_decoder.decode(data), P.EngineLoadFailed):
                        code = ExitCode.ENGINE_LOAD_FAILURE
                if code:
                    break
            if ctrl in events:
                stop = False
                while True:
                    try:
                        msg = P.control_decoder.decode(ctrl.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if isinstance(msg, P.Shutdown):
                        stop = True
                        break
                    worker.inbox.put(msg)
                if stop:
                    break
    finally:
        worker.inbox.put(None)
        worker.join(timeout=5.0)
        region.close()
        ctx.destroy(linger=1000)
    return code


def main() -> int:
    """`python -m engines.process`: the EngineSpec on stdin (msgpack), serve, return the exit code."""
    spec = P.spec_decoder.decode(sys.stdin.buffer.read())
    # The dispatcher owns our lifecycle (Shutdown, or we notice it is gone): a Ctrl-C or SIGTERM
    # sent to the whole process group must not kill batches that the dispatcher is draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format=f"%(asctime)s engine[{spec.name}] %(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1))))
    # Before torch loads libgomp: an OpenMP thread that waits at a barrier spins 30k rounds (tens of
    # microseconds), not the default 300k (milliseconds), then sleeps. On a loaded host a spinning
    # thread holds the core its descheduled peer needs, and every parallel region of a forward pays:
    # 2-core CPU engine beside two busy processes, one 270-pair query: p99 209 ms spinning by default,
    # 32 ms at 30k; idle p50 9.2 ms either way (BENCHMARKS.md "CPU engine on a loaded host").
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    return int(run_engine(spec))


if __name__ == "__main__":
    sys.exit(main())
