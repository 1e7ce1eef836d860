"""The file descriptor and pending input of a ZeroMQ socket, typed (pyzmq's getsockopt returns int | bytes).

ZeroMQ's FD is edge-like: it signals that the socket's state changed, not that a message waits; after
each pass the dispatcher asks `has_input` again before it sleeps.
"""
from __future__ import annotations

from typing import Any

import zmq


def fd_of(sock: zmq.Socket[Any]) -> int:
    return int(sock.getsockopt(zmq.FD))


def has_input(sock: zmq.Socket[Any]) -> bool:
    return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)
