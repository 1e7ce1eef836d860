"""The systemd notify protocol (sd_notify(3)), implemented here rather than through libsystemd.

A service of `Type=notify` gets the datagram socket's address in NOTIFY_SOCKET (a path, or an
abstract-namespace name starting with '@'); each message is newline-separated `KEY=VALUE` lines in
one datagram. With NOTIFY_SOCKET unset (not run by systemd, or in tests) every call is a no-op.
"""
from __future__ import annotations

import os
import time
import socket
import threading
from collections.abc import Mapping


class NotifyError(OSError):
    """Sending to NOTIFY_SOCKET failed; the message names the socket and the state sent."""


def _socket_address(value: str) -> str | bytes:
    if value.startswith("@"):
        # Abstract namespace: systemd writes '@', the kernel wants a leading NUL byte.
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to systemd; a no-op when there is no notify socket."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with '@', got {address!r}")
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (sd_notify / sd_watchdog_enabled rules)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC")
        if raw_usec:
            try:
                usec = int(raw_usec)
            except ValueError:
                raise ValueError(f"WATCHDOG_USEC is not an integer: {raw_usec!r}") from None
            if usec <= 0:
                usec = None
            raw_pid = env.get("WATCHDOG_PID")
            # The watchdog belongs to the main PID only; a child that inherited the env must not ping.
            if raw_pid and raw_pid.isdigit() and int(raw_pid) != os.getpid():
                usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval_s(self) -> float | None:
        """The watchdog timeout in seconds (ping at half of it), or None when no watchdog is set."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1e6

    def notify(self, state: str) -> None:
        """Send one raw state datagram (`KEY=VALUE` lines); raises NotifyError on failure."""
        if self.address is None:
            return
        data = state.encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, _socket_address(self.address))
            except OSError as exc:
                raise NotifyError(exc.errno, f"sd_notify to {self.address!r} failed sending "
                                             f"{state.splitlines()[0]!r}: {exc.strerror or exc}") from exc

    def ready(self, status: str | None = None) -> None:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        self.notify("\n".join(lines))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def reloading(self) -> None:
        """A reload starts (READY=1 follows when it ends, either way); MONOTONIC_USEC as systemd's
        Type=notify-reload wants it beside RELOADING=1."""
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more start/stop time (e.g. while loading a 24 GB model): EXTEND_TIMEOUT_USEC."""
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.splitlines())
