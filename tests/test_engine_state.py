"""daemon/engine_state.py: the engine lifecycle, as a table, checked on random event sequences."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.engine_state import SERVING, TRANSITIONS, EngineEvent, EngineLifecycle, InvalidTransition
from wire.messages import EngineState as S

EVENTS = list(EngineEvent)


def test_a_served_life() -> None:
    lc = EngineLifecycle()
    path = [EngineEvent.SPAWN, EngineEvent.READY, EngineEvent.DISPATCH, EngineEvent.SILENT, EngineEvent.HEARD,
            EngineEvent.DISPATCH, EngineEvent.IDLE, EngineEvent.HUNG, EngineEvent.EXIT, EngineEvent.RESTART_DUE,
            EngineEvent.LOAD_FAILED, EngineEvent.EXIT, EngineEvent.RESTART_DUE, EngineEvent.READY, EngineEvent.STOP]
    states = [lc.apply(e) for e in path]
    assert states == [S.STARTING, S.READY, S.BUSY, S.STARVED, S.READY, S.BUSY, S.READY, S.HUNG, S.RESTARTING,
                      S.STARTING, S.FAILED, S.FAILED, S.STARTING, S.READY, S.STOPPED]


def test_impossible_events_raise() -> None:
    lc = EngineLifecycle()
    with pytest.raises(InvalidTransition, match="stopped cannot take event dispatch"):
        lc.apply(EngineEvent.DISPATCH)  # no batch goes to an engine that was never started
    lc.apply(EngineEvent.SPAWN)
    for event in (EngineEvent.DISPATCH, EngineEvent.IDLE, EngineEvent.SILENT):
        assert not lc.can(event)  # a loading engine takes no batches and is not judged starved
    assert lc.state is S.STARTING


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(EVENTS), max_size=60))
def test_random_sequences_keep_the_invariants(events: list[EngineEvent]) -> None:
    lc = EngineLifecycle()
    ever_ready = False
    for event in events:
        before = lc.state
        if not lc.can(event):
            with pytest.raises(InvalidTransition):
                lc.apply(event)
            assert lc.state is before  # a refused event changes nothing
            continue
        after = lc.apply(event)
        assert after is TRANSITIONS[(before, event)]
        if event is EngineEvent.STOP:
            assert after is S.STOPPED
        if after in SERVING and before not in SERVING:
            assert event is EngineEvent.READY  # serving starts only with an EngineReady
            ever_ready = True
        if event is EngineEvent.EXIT:
            assert after in (S.RESTARTING, S.FAILED)  # a process gone is never serving
        if after is S.RESTARTING:
            assert ever_ready  # only an engine that served is "restarting"; one that never did "failed"
        assert lc.serving == (after in SERVING)


def test_every_state_can_stop_and_every_lost_state_can_restart() -> None:
    for state in S:
        assert TRANSITIONS[(state, EngineEvent.STOP)] is S.STOPPED
    for state in (S.RESTARTING, S.FAILED):
        assert TRANSITIONS[(state, EngineEvent.RESTART_DUE)] is S.STARTING
