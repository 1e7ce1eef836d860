"""The Open Inference Protocol front end process: KServe's REST and gRPC servers over `DlrmModel`.

`python -m oip` reads its OipSpec (wire/messages.py) on stdin, as engines read theirs: the dispatcher's
endpoint, the model name, the address and ports to bind. REST is KServe's own FastAPI application on
uvicorn (live, ready, metadata and infer of the v2 protocol, with its binary-data extension); gRPC is
KServe's GRPCInferenceService servicer on a grpc.aio server. Both bind the configured address (KServe's
own ModelServer binds every interface, which the daemon allows only with allow_remote). The model is
ready while the daemon serves. SIGTERM (the dispatcher stopping it) ends both servers gracefully; the
process also ends when its dispatcher is gone.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from wire import messages as M

log = logging.getLogger("dlrm.oip")


async def serve(spec: M.OipSpec) -> int:
    # KServe's modules read their own command line at import (argparse): none is given to this process.
    import grpc
    import uvicorn
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    from oip.model import DlrmModel

    model = DlrmModel(spec.model_name, spec.endpoint)
    repository = ModelRepository()
    repository.update(model)
    dataplane = DataPlane(model_registry=repository)
    extension = ModelRepositoryExtension(model_registry=repository)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(model.watch_daemon()),
                                      asyncio.create_task(_watch_parent(spec.parent_pid, stop))]
    rest = None
    if spec.http_port:
        # KServe's application and endpoints, on a uvicorn server of our own: bound to `host` (KServe's
        # RESTServer binds every interface), stopped when we stop
        app = RESTServer("kserve.model_server:app", dataplane, extension, spec.http_port, grace_period=10)
        app.create_application()
        app.config.host = spec.host
        # (uvicorn takes SIGTERM while it serves, stops, then raises it again for our handler above)
        rest = uvicorn.Server(app.config)
        tasks.append(asyncio.create_task(rest.serve(sockets=[_listening_socket(spec, spec.http_port)])))
        log.info("Open Inference Protocol REST on http://%s:%d (model %s, worker %d/%d)", spec.host, spec.http_port,
                 spec.model_name, spec.worker + 1, spec.workers)
    grpc_server = None
    if spec.grpc_port:
        grpc_server = grpc.aio.server(interceptors=(ExceptionToStatusInterceptor(),),  # errors -> gRPC status codes
                                      options=[("grpc.max_send_message_length", 256 << 20),
                                               ("grpc.max_receive_message_length", 256 << 20),
                                               ("grpc.so_reuseport", int(spec.workers > 1))])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(dataplane, extension), grpc_server)
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        if grpc_server.add_insecure_port(f"{host}:{spec.grpc_port}") == 0:
            log.error("cannot bind gRPC %s:%d", spec.host, spec.grpc_port)
            return 1
        await grpc_server.start()
        log.info("Open Inference Protocol gRPC on %s:%d (model %s)", spec.host, spec.grpc_port, spec.model_name)
    await stop.wait()
    log.info("stopping")
    if grpc_server is not None:
        await grpc_server.stop(grace=5)
    if rest is not None:
        rest.should_exit = True  # uvicorn's graceful shutdown: in-flight requests finish
    for t in tasks[:2]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    model.close()
    return 0


def _listening_socket(spec: M.OipSpec, port: int) -> socket.socket:
    """The REST port's socket; shared by the workers (SO_REUSEPORT) when there are several (only processes
    of the same user can join it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if spec.workers > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((spec.host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def _watch_parent(pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if pid and os.getppid() != pid:  # reparented: the dispatcher is gone
            log.error("dispatcher %d is gone: exiting", pid)
            stop.set()
        await asyncio.sleep(1.0)


def main() -> int:
    spec = M.oip_spec_decoder.decode(sys.stdin.buffer.read())
    logging.basicConfig(level=spec.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # one line per request is the dispatcher's metrics' job, not the journal's
    for name in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the dispatcher stops us
    return asyncio.run(serve(spec))
