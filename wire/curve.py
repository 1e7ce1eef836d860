"""ZeroMQ CURVE key files and a client's CURVE settings (the daemon's side: daemon/security.py).

Key files are ZeroMQ's certificate text format (`dlrm-daemon keygen` writes them), parsed as text by
zmq.auth: nothing is unpickled or evaluated. Secret files are mode 0600.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import zmq


def load_key_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `*.key_secret` certificate file; ValueError if it has no secret."""
    import zmq.auth

    try:
        pub, sec = zmq.auth.load_certificate(path)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{path}: not a ZeroMQ certificate ({exc})") from None
    if not sec:
        raise ValueError(f"{path}: holds no secret key (use the .key_secret file)")
    return pub, sec


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    import zmq.auth

    try:
        pub, _ = zmq.auth.load_certificate(path)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{path}: not a ZeroMQ certificate ({exc})") from None
    return pub


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, share it) and NAME.key_secret (0600) in `directory` (created 0700)."""
    import zmq.auth

    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file must never be readable by others, not even briefly
    try:
        pub, sec = zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(sec, 0o600)
    os.chmod(pub, 0o644)
    return Path(pub), Path(sec)


@dataclass(frozen=True)
class ClientCurve:
    """Client side of CURVE: the daemon's public key file and this client's key pair file."""

    server_public_key_file: str
    client_secret_key_file: str

    def apply(self, sock: zmq.Socket) -> None:
        """Before connect."""
        pub, sec = load_key_pair(self.client_secret_key_file)
        sock.curve_secretkey = sec
        sock.curve_publickey = pub
        sock.curve_serverkey = load_public_key(self.server_public_key_file)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ClientCurve | None":
        """DLRM_CURVE_SERVER_KEY + DLRM_CURVE_CLIENT_KEY (file paths), or None when unset."""
        env = os.environ if env is None else env
        server, client = env.get("DLRM_CURVE_SERVER_KEY", ""), env.get("DLRM_CURVE_CLIENT_KEY", "")
        return cls(server, client) if server and client else None
