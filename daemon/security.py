"""Network exposure rules, ZeroMQ CURVE authentication and runtime-dir hygiene.

* Loopback or ipc:// by default: a tcp endpoint (or metrics_host) beyond loopback is refused by
  config validation unless `allow_remote = true` is set explicitly.
* CURVE: with `curve_secret_key_file` (the daemon's key pair, ZeroMQ's certificate text format as
  written by `dlrm-daemon keygen`) the client socket is a CURVE server; a ZAP handler (pyzmq's
  ThreadAuthenticator) admits only clients whose public key file lies in `curve_authorized_keys_dir`.
  A client without an authorized key never gets a reply (the handshake fails): it sees a timeout,
  `ConnectionFailed`, on the client side.
* Key files are parsed as text by zmq.auth (nothing is unpickled or evaluated); secret files 0600.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import zmq

from wire.curve import load_key_pair

log = logging.getLogger("dlrm.security")
_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def host_is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; every other address or interface name is remote."""
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a DNS name: may reach the network


def endpoint_is_local(endpoint: str) -> bool:
    """ipc:// / inproc:// or a tcp:// endpoint on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    return host_is_loopback(host)


def exposure_problem(endpoint: str, metrics_host: str, metrics_port: int, allow_remote: bool) -> tuple[str, str] | None:
    """(key, message) if the config would listen beyond loopback without `allow_remote`."""
    if allow_remote:
        return None
    if not endpoint_is_local(endpoint):
        return ("endpoint", f"{endpoint!r} listens beyond loopback; set allow_remote = true to allow it "
                            "(and curve_secret_key_file to authenticate clients)")
    if metrics_port and not host_is_loopback(metrics_host):
        return ("metrics_host", f"{metrics_host!r} is not a loopback address; set allow_remote = true to "
                                "expose the metrics exporter")
    return None


def oip_exposure_problem(host: str, port: int, allow_remote: bool) -> tuple[str, str] | None:
    """(key, message) if the Open Inference Protocol front end would listen beyond loopback without
    `allow_remote` (it has no authentication of its own: put it behind a gateway or KServe)."""
    if port and not allow_remote and not host_is_loopback(host):
        return ("oip_host", f"{host!r} is not a loopback address; set allow_remote = true to expose the Open "
                            "Inference Protocol front end (it does not authenticate clients)")
    return None


def curve_problem(secret_key_file: str, authorized_dir: str) -> tuple[str, str] | None:
    """(key, message) if the CURVE settings are incomplete or unreadable."""
    if not secret_key_file and not authorized_dir:
        return None
    if not secret_key_file:
        return ("curve_secret_key_file", "required when curve_authorized_keys_dir is set")
    if not authorized_dir:
        return ("curve_authorized_keys_dir", "required when curve_secret_key_file is set (clients' public keys)")
    if not zmq.has("curve"):
        return ("curve_secret_key_file", "this libzmq was built without CURVE support")
    try:
        pub, sec = load_key_pair(secret_key_file)
    except (OSError, ValueError) as exc:
        return ("curve_secret_key_file", f"cannot read key pair from {secret_key_file}: {exc}")
    if not Path(authorized_dir).is_dir():
        return ("curve_authorized_keys_dir", f"{authorized_dir} is not a directory")
    return None


class ServerCurve:
    """CURVE on the dispatcher's client socket plus the ZAP thread that checks client keys."""

    def __init__(self, ctx: zmq.Context, secret_key_file: str, authorized_dir: str) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.public, self.secret = load_key_pair(secret_key_file)
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("dlrm.zap"))
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(authorized_dir))
        n = len(list(Path(authorized_dir).glob("*.key")))
        log.info("CURVE on: %d authorized client key(s) in %s", n, authorized_dir)

    def apply(self, sock: zmq.Socket) -> None:
        """Before bind: make `sock` a CURVE server with the daemon's key pair."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def close(self) -> None:
        self.auth.stop()


def maybe_server_curve(ctx: zmq.Context, cfg: Any) -> ServerCurve | None:
    """The dispatcher's hook: a ServerCurve when the config names a key pair, else None."""
    if not getattr(cfg, "curve_secret_key_file", ""):
        return None
    return ServerCurve(ctx, cfg.curve_secret_key_file, cfg.curve_authorized_keys_dir)


def remove_stale_sockets(runtime_dir: str | os.PathLike[str]) -> list[Path]:
    """Engine control sockets left by a killed dispatcher (call while holding the runtime-dir lock:
    no live daemon uses them then)."""
    removed = []
    for p in Path(runtime_dir).glob("engine-*.sock"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    if removed:
        log.warning("removed %d stale engine socket(s) from %s", len(removed), runtime_dir)
    return removed
