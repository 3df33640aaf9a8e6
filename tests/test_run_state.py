"""run_state.json: the driver's state machine, its transitions and its lives."""

from __future__ import annotations

import pytest

from pggan.run_state import RunState, TransitionError
from pggan.storage import Storage


def test_states_and_history_survive_a_new_driver_life():
    storage, url = Storage(), "memory://rs-lives"
    st = RunState.load(storage, url)
    first = st.new_life()
    st.transition("training", stage_index=0, stage="00-4-stable", nimg=0)
    st.save(storage, url)
    # The driver dies here; a new one loads the state and registers a second life.
    st2 = RunState.load(storage, url)
    second = st2.new_life()
    assert first != second and [life["id"] for life in st2.lives] == [first, second]
    st2.transition("evaluating", stage_index=0, stage="00-4-stable", nimg=1000)
    st2.transition("completed", nimg=1000)
    st2.save(storage, url)
    back = RunState.load(storage, url)
    assert back.state == "completed"
    assert [h["state"] for h in back.history] == ["pending", "training", "pending", "evaluating", "completed"]
    assert {h["life"] for h in back.history} == {first, second}
    assert "driver restarted" in back.history[2]["note"]
    storage.rm(url, recursive=True)


def test_terminal_states_are_left_only_through_a_new_life():
    st = RunState()
    st.new_life()
    st.transition("failed", note="boom")
    assert st.message == "boom"
    with pytest.raises(TransitionError):
        st.transition("training")
    st.new_life()
    assert st.state == "pending" and "resumed from failed" in st.history[-1]["note"]
    st.transition("training", stage_index=1, stage="01-8-fade")
    assert st.stage == "01-8-fade"


def test_unknown_state_is_rejected():
    with pytest.raises(TransitionError):
        RunState().transition("flying")
