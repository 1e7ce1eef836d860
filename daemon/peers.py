"""Client disconnect detection for the ROUTER socket, so a vanished client's queued work is dropped.

ZeroMQ hides connections behind routing ids; this joins the two views:
  * the first message of each routing id tells its connection's fd (`zmq.SRCFD` of the frame);
  * a socket monitor reports EVENT_DISCONNECTED with the fd of the connection that closed.
A DEALER connection carries exactly one routing id, so when a *new* id shows up on an fd that still
has an owner, the old owner is gone too (the kernel reused the fd before we read the monitor event);
that owner is reported at once and its pending DISCONNECTED event is skipped.
Residual race, documented: a client that connected and vanished without ever sending, whose fd is
reused by a new client before its DISCONNECTED event is read (the dispatcher reads them at the top
of every I/O pass), would make that event cancel the new client's queued queries; that client then
sees its own timeout (ConnectionFailed), never a wrong answer.
"""
from __future__ import annotations

import logging
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("dlrm.peers")
_SRCFD = int(getattr(zmq, "SRCFD", 2))


class PeerWatch:
    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self._mon: zmq.Socket | None = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._owner: dict[int, bytes] = {}  # fd -> routing id
        self._fd: dict[bytes, int] = {}  # routing id -> fd
        self._skip: dict[int, int] = {}  # fd -> DISCONNECTED events already accounted for
        self._gone: list[bytes] = []

    def note(self, frames: list[Any]) -> None:
        """Called with every received message (frames[0] = routing id); cheap after the first."""
        client = frames[0].bytes
        if client in self._fd or len(frames) < 2:
            return
        try:
            fd = int(frames[1].get(_SRCFD))
        except (zmq.ZMQError, ValueError, TypeError):
            return
        old = self._owner.get(fd)
        if old is not None:  # fd reused: `old` disconnected, its event is still on its way
            self._gone.append(old)
            self._fd.pop(old, None)
            self._skip[fd] = self._skip.get(fd, 0) + 1
        self._owner[fd] = client
        self._fd[client] = fd

    def take_gone(self) -> list[bytes]:
        """Routing ids whose connection closed since the last call."""
        mon = self._mon
        while mon is not None and mon.poll(0):
            try:
                ev = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except (zmq.Again, ValueError):
                break
            if ev["event"] != zmq.EVENT_DISCONNECTED:
                continue
            fd = int(ev["value"])
            if self._skip.get(fd):
                self._skip[fd] -= 1
                continue
            client = self._owner.pop(fd, None)
            if client is not None:
                self._fd.pop(client, None)
                self._gone.append(client)
        gone, self._gone = self._gone, []
        return gone

    @property
    def known(self) -> int:
        return len(self._fd)

    def close(self) -> None:
        if self._mon is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._mon.close(0)
            self._mon = None
