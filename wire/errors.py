"""Error codes (what travels on the wire) and the typed errors clients raise for them."""
from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The `code` of an Error reply."""

    BAD_REQUEST = "BAD_REQUEST"  # the request is malformed or names something unknown
    OVERLOADED = "OVERLOADED"  # the queue bound would be passed: retry later
    ENGINE_FAILED = "ENGINE_FAILED"  # no engine could compute it
    TIMEOUT = "TIMEOUT"  # its deadline passed
    SHUTTING_DOWN = "SHUTTING_DOWN"  # the daemon is draining
    CLIENT_NOT_READING = "CLIENT_NOT_READING"  # this client's unread replies passed the daemon's bound
    RELOAD_FAILED = "RELOAD_FAILED"  # a reload was refused or its model failed a check: the old one serves


class DaemonError(Exception):
    """An error the daemon reported for one request (or the client could not reach it)."""

    code: str = "DAEMON_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.code}: {message}")
        self.message = message


class BadRequest(DaemonError):
    code = ErrorCode.BAD_REQUEST


class Overloaded(DaemonError):
    code = ErrorCode.OVERLOADED


class EngineFailed(DaemonError):
    code = ErrorCode.ENGINE_FAILED


class Timeout(DaemonError):
    code = ErrorCode.TIMEOUT


class ShuttingDown(DaemonError):
    code = ErrorCode.SHUTTING_DOWN


class ClientNotReading(DaemonError):
    """The client left more than max_client_backlog_bytes of replies unread: its results were
    replaced by this error (read replies as they come)."""

    code = ErrorCode.CLIENT_NOT_READING


class ReloadFailed(DaemonError):
    """The reload did not happen (config, artifact, load or canary check failed, or another reload runs);
    the model served before is still served."""

    code = ErrorCode.RELOAD_FAILED


class ConnectionFailed(DaemonError):
    """Client side only: the daemon is unreachable or did not answer in time."""

    code = "CONNECTION_FAILED"


_BY_CODE: dict[str, type[DaemonError]] = {
    c.code: c for c in (BadRequest, Overloaded, EngineFailed, Timeout, ShuttingDown, ClientNotReading,
                        ReloadFailed, ConnectionFailed)
}


def error_for(code: str, message: str) -> DaemonError:
    """The exception for a wire error code (an unknown code keeps its text)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return DaemonError(f"[{code}] {message}")
    return cls(message)
