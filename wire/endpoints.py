"""Where the daemon listens by default, defined once for the daemon and for its clients.

The daemon binds `ipc://RUNTIME_DIR/dlrm.sock`, RUNTIME_DIR being (in this order) `$RUNTIME_DIRECTORY`
(systemd's RuntimeDirectory=, /run/dlrm-daemon under the shipped unit), `$XDG_RUNTIME_DIR/dlrm-daemon`,
or `/tmp/dlrm-daemon-UID`. A client (loadgen_driver, `dlrm-daemon status`) does not run inside the
unit, so it cannot see the unit's RUNTIME_DIRECTORY: it takes `$DLRM_ENDPOINT`, else
`$DLRM_RUNTIME_DIR/dlrm.sock`, else the first of the same places (with the unit's /run/dlrm-daemon
among them) where a socket exists, else the daemon's own default.
"""
from __future__ import annotations

import os
import stat
from typing import Mapping

SOCKET_NAME = "dlrm.sock"
SYSTEMD_RUNTIME_DIR = "/run/dlrm-daemon"  # RuntimeDirectory=dlrm-daemon in systemd/dlrm-daemon.service


def default_runtime_dir(env: Mapping[str, str]) -> str:
    """The daemon's runtime directory when `runtime_dir` is not configured."""
    if env.get("RUNTIME_DIRECTORY"):  # systemd RuntimeDirectory=
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "dlrm-daemon")
    return f"/tmp/dlrm-daemon-{os.getuid()}"


def endpoint_in(runtime_dir: str) -> str:
    """The client endpoint of a daemon whose runtime directory is `runtime_dir`."""
    return f"ipc://{os.path.abspath(runtime_dir)}/{SOCKET_NAME}"


def default_endpoint(env: Mapping[str, str]) -> str:
    """The endpoint the daemon binds when neither `endpoint` nor `runtime_dir` is configured."""
    return endpoint_in(default_runtime_dir(env))


def client_endpoint(env: Mapping[str, str] | None = None) -> str:
    """The endpoint a client connects to when it is given none (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("DLRM_ENDPOINT"):
        return env["DLRM_ENDPOINT"]
    if env.get("DLRM_RUNTIME_DIR"):
        return endpoint_in(env["DLRM_RUNTIME_DIR"])
    candidates = [default_runtime_dir(env), SYSTEMD_RUNTIME_DIR]
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(env["XDG_RUNTIME_DIR"], "dlrm-daemon"))
    candidates.append(f"/tmp/dlrm-daemon-{os.getuid()}")
    for d in candidates:
        try:
            if stat.S_ISSOCK(os.stat(os.path.join(d, SOCKET_NAME)).st_mode):
                return endpoint_in(d)
        except OSError:
            continue
    return default_endpoint(env)
