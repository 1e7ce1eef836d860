"""An engine's lifecycle as one state machine: every transition in one table (pure logic, no clock).

The supervisor (daemon/supervisor.py) is the only writer: it turns what it sees (a process started, an
EngineReady message, a batch sent, silence, a verdict of hung, an exit, a restart timer) into events,
and asks `EngineLifecycle.apply` for the next state. A transition the table does not hold raises
`InvalidTransition`: a supervisor bug shows at once instead of as an odd state in `status`.

    STOPPED --SPAWN--> STARTING --READY--> READY <--IDLE-- BUSY
                          |                  |  --DISPATCH-->  |
                          | LOAD_FAILED      | SILENT           | SILENT
                          | EXIT             v                  v
                          v               STARVED --HEARD--> READY
                        FAILED             (HUNG from READY/BUSY/STARVED --> HUNG --EXIT--> RESTARTING)
    READY/BUSY/STARVED --EXIT--> RESTARTING;  RESTARTING/FAILED --RESTART_DUE--> STARTING
    anything --STOP--> STOPPED
"""
from __future__ import annotations

import enum

from wire.messages import EngineState

S = EngineState


class EngineEvent(enum.Enum):
    SPAWN = "spawn"  # its process was started
    SPAWN_FAILED = "spawn_failed"  # the process (or its socket) could not be started
    READY = "ready"  # EngineReady: model loaded, warmed
    LOAD_FAILED = "load_failed"  # EngineFailed: it cannot load (it exits next)
    DISPATCH = "dispatch"  # a batch was sent to it
    IDLE = "idle"  # its last batch in flight came back
    SILENT = "silent"  # no message for heartbeat_timeout_s, but its process progresses
    HEARD = "heard"  # a message again after SILENT
    HUNG = "hung"  # no progress: the supervisor kills it
    EXIT = "exit"  # its process is gone (exited, or reaped after a kill)
    RESTART_DUE = "restart_due"  # the backoff timer fired (SPAWN follows)
    STOP = "stop"  # the daemon shuts down


SERVING = frozenset((S.READY, S.BUSY, S.STARVED))  # states that take batches
_LIVE = (S.READY, S.BUSY, S.STARVED)

TRANSITIONS: dict[tuple[EngineState, EngineEvent], EngineState] = {
    (S.STOPPED, EngineEvent.SPAWN): S.STARTING,
    (S.STOPPED, EngineEvent.SPAWN_FAILED): S.FAILED,
    (S.STARTING, EngineEvent.READY): S.READY,
    (S.STARTING, EngineEvent.LOAD_FAILED): S.FAILED,
    (S.STARTING, EngineEvent.EXIT): S.FAILED,
    (S.STARTING, EngineEvent.HUNG): S.FAILED,
    (S.STARTING, EngineEvent.SPAWN_FAILED): S.FAILED,
    (S.FAILED, EngineEvent.LOAD_FAILED): S.FAILED,
    (S.FAILED, EngineEvent.EXIT): S.FAILED,
    (S.FAILED, EngineEvent.RESTART_DUE): S.STARTING,
    (S.FAILED, EngineEvent.SPAWN): S.STARTING,
    (S.FAILED, EngineEvent.SPAWN_FAILED): S.FAILED,
    (S.READY, EngineEvent.DISPATCH): S.BUSY,
    (S.READY, EngineEvent.IDLE): S.READY,
    (S.BUSY, EngineEvent.DISPATCH): S.BUSY,
    (S.BUSY, EngineEvent.IDLE): S.READY,
    (S.STARVED, EngineEvent.DISPATCH): S.STARVED,
    (S.STARVED, EngineEvent.IDLE): S.STARVED,
    (S.STARVED, EngineEvent.SILENT): S.STARVED,
    (S.STARVED, EngineEvent.HEARD): S.READY,
    (S.HUNG, EngineEvent.EXIT): S.RESTARTING,
    (S.RESTARTING, EngineEvent.EXIT): S.RESTARTING,
    (S.RESTARTING, EngineEvent.RESTART_DUE): S.STARTING,
    (S.RESTARTING, EngineEvent.SPAWN): S.STARTING,
    (S.RESTARTING, EngineEvent.SPAWN_FAILED): S.FAILED,
}
for _state in _LIVE:
    TRANSITIONS[(_state, EngineEvent.HUNG)] = S.HUNG
    TRANSITIONS[(_state, EngineEvent.EXIT)] = S.RESTARTING
    TRANSITIONS[(_state, EngineEvent.READY)] = _state  # a duplicate EngineReady changes nothing
for _state in (S.READY, S.BUSY):
    TRANSITIONS[(_state, EngineEvent.SILENT)] = S.STARVED
    TRANSITIONS[(_state, EngineEvent.HEARD)] = _state
for _state in EngineState:
    TRANSITIONS[(_state, EngineEvent.STOP)] = S.STOPPED


class InvalidTransition(RuntimeError):
    """An event the current state cannot take (a supervisor bug)."""


class EngineLifecycle:
    """The state of one engine, changed only through `apply`."""

    def __init__(self) -> None:
        self._state = S.STOPPED
        self.history: list[tuple[EngineState, EngineEvent, EngineState]] = []  # the last few, for logs

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def serving(self) -> bool:
        """Takes batches: READY, BUSY or STARVED."""
        return self._state in SERVING

    def can(self, event: EngineEvent) -> bool:
        return (self._state, event) in TRANSITIONS

    def apply(self, event: EngineEvent) -> EngineState:
        new = TRANSITIONS.get((self._state, event))
        if new is None:
            raise InvalidTransition(f"engine in state {self._state} cannot take event {event.value}")
        self.history = (self.history + [(self._state, event, new)])[-8:]
        self._state = new
        return new
