"""Typed errors shared by the daemon and its clients; `code` is what travels on the wire."""
from __future__ import annotations

BAD_REQUEST = "BAD_REQUEST"
OVERLOADED = "OVERLOADED"
ENGINE_FAILED = "ENGINE_FAILED"
TIMEOUT = "TIMEOUT"
SHUTTING_DOWN = "SHUTTING_DOWN"
CODES = (BAD_REQUEST, OVERLOADED, ENGINE_FAILED, TIMEOUT, SHUTTING_DOWN)


class DaemonError(Exception):
    """An error the daemon reported for one request (or the client could not reach it)."""

    code: str = "DAEMON_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.code}: {message}")
        self.message = message


class BadRequest(DaemonError):
    code = BAD_REQUEST


class Overloaded(DaemonError):
    code = OVERLOADED


class EngineFailed(DaemonError):
    code = ENGINE_FAILED


class Timeout(DaemonError):
    code = TIMEOUT


class ShuttingDown(DaemonError):
    code = SHUTTING_DOWN


class ConnectionFailed(DaemonError):
    """Client side only: the daemon is unreachable or did not answer in time."""

    code = "CONNECTION_FAILED"


_BY_CODE: dict[str, type[DaemonError]] = {
    c.code: c for c in (BadRequest, Overloaded, EngineFailed, Timeout, ShuttingDown, ConnectionFailed)
}


def error_for(code: str, message: str) -> DaemonError:
    """The exception class for a wire error code (unknown codes keep their text)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return DaemonError(f"[{code}] {message}")
    return cls(message)
