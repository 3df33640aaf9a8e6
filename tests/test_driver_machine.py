"""The driver's state machine, the telemetry hub and the report relay, without Ray: reports of every rank go
through the relay into a plain TelemetryHub, the machine drains them and walks the phases, persisting each
transition in run_state.json and the stage's records in the metric history."""

from __future__ import annotations

import math

import pytest

from pggan.config import load_config
from pggan.driver import StageMachine
from pggan.history import append_records, read_records
from pggan.hub import ReportRelay, RestartWatch, TelemetryHub, WorkersUnplaceable
from pggan.records import combine_ranks, stage_seconds, tick_record
from pggan.run_state import RunState
from pggan.schedule import stages
from pggan.storage import Storage

TINY = ["model.max_resolution=8", "model.latent_size=8", "model.fmap_base=32", "model.fmap_max=8",
        "schedule.fade_kimg=0.064", "schedule.stable_kimg=0.064", "schedule.fade_kimg_dict={}",
        "schedule.stable_kimg_dict={}", "schedule.minibatch_dict={}", "metrics.port=0"]


def _tick(st, nimg, rank=0, **extra):
    return tick_record(nimg=nimg, stage=st, total_nimg=192, img_per_s=100.0,
                       means={"loss_G": 1.0 + rank, "loss_D": -2.0 - rank, "gp": 0.5}, nonfinite_total=0,
                       checkpoints=[], checkpoint_retries=0, group_start_nimg=0, group_start_time=0.0,
                       node_id=f"node{rank}", **extra)


def _both_ranks(relay, st, nimg, **extra):
    relay.after_report(None, [_tick(st, nimg, 0, **extra), _tick(st, nimg, 1, **extra)], None)


def _gauge(hub: TelemetryHub, name: str) -> float:
    for line in hub.exporter.render().splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


@pytest.fixture
def setup():
    cfg = load_config(preset="demo", sets=TINY)
    storage, run_url = Storage(), "memory://machine-run"
    state = RunState()
    state.new_life()
    hub = TelemetryHub(port=0)
    seen: list[dict] = []
    machine = StageMachine(cfg, storage, run_url, state, hub, None, on_stage_end=seen.append)
    yield cfg, storage, run_url, state, hub, machine, ReportRelay(hub, cfg.run.name, None), seen
    storage.rm(run_url, recursive=True)


def test_reports_walk_the_phases_and_persist_every_transition(setup):
    cfg, storage, run_url, state, hub, machine, relay, seen = setup
    s0, s1, s2 = stages(cfg)  # 4 stable, 8 fade, 8 stable: 64 images each
    machine.begin_training(s0, 0)
    _both_ranks(relay, s0, 32)
    _both_ranks(relay, s0, 64, stage_done=True)
    machine.poll()
    assert (state.state, state.stage) == ("evaluating", s0.name)
    assert _gauge(hub, "pggan_images_seen") == 64
    assert _gauge(hub, "pggan_loss") in (1.5, -2.5)  # averaged over the two ranks
    record = {"event": "stage_end", "stage_index": 0, "stage": s0.name, "resolution": 4, "nimg": 64,
              "times": {"ready": 10.0, "first_step": 12.0, "trained": 20.0, "eval_start": 20.0, "evaluated": 21.5}}
    relay.after_report(None, [_tick(s0, 64, event="stage_end", record=record), _tick(s0, 64, 1, event="stage_end",
                                                                                         record=record)], None)
    machine.poll()
    assert (state.state, state.stage) == ("training", s1.name)
    saved = RunState.load(storage, run_url)
    assert [(h["state"], h["stage"]) for h in saved.history] == [
        ("pending", None), ("training", s0.name), ("evaluating", s0.name), ("training", s1.name)]
    hist = read_records(storage, run_url)
    assert [r["event"] for r in hist] == ["tick", "tick", "stage_end"]
    assert hist[0]["nimg"] == 32 and hist[0]["nodes"] == ["node0", "node1"] and "checkpoints" not in hist[0]
    assert hist[-1]["seconds"] == {"startup": 2.0, "train": 8.0, "eval": 1.5}  # from the stage's own ready time
    assert seen and seen[0]["stage"] == s0.name


def test_a_restarted_groups_first_tick_moves_the_machine_to_its_stage(setup):
    cfg, storage, run_url, state, hub, machine, relay, seen = setup
    s0, s1, s2 = stages(cfg)
    machine.begin_evaluating(s0)  # the previous life died while evaluating stage 0
    _both_ranks(relay, s2, 160)  # the new group restored a later checkpoint
    machine.poll()
    assert (state.state, state.stage, state.nimg) == ("training", s2.name, 160)


def test_a_fatal_report_is_kept_for_the_failure_message(setup):
    cfg, storage, run_url, state, hub, machine, relay, seen = setup
    s0 = stages(cfg)[0]
    machine.begin_training(s0, 0)
    _both_ranks(relay, s0, 48, fatal="stage 00-4-stable: losses were non-finite", fatal_kind="nonfinite")
    machine.poll()
    assert machine.fatal.startswith("stage 00-4-stable: losses were non-finite")
    machine.fail(machine.fatal, s0)
    saved = RunState.load(storage, run_url)
    assert saved.state == "failed" and "non-finite" in saved.message
    assert [r["nimg"] for r in read_records(storage, run_url)] == [48]  # the ticks of the failing stage are kept


def test_worker_restarts_and_checkpoint_retries_reach_the_hub(setup):
    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState

    cfg, storage, run_url, state, hub, machine, relay, seen = setup
    s0 = stages(cfg)[0]
    lost = _worker_group_error()
    RestartWatch(hub, cfg.run.name, None).after_controller_state_update(RunningState(), RestartingState(lost))
    relay.after_exception(None, {0: RuntimeError("lost")})  # seen on every poll: counts nothing
    relay.after_report(None, [_tick(s0, 16) | {"checkpoint_retries": 2}], None)
    machine.begin_training(s0, 0)
    assert state.worker_restarts == 1 and state.preemptions == 0
    assert _gauge(hub, "pggan_worker_restarts_total") == 1
    assert _gauge(hub, "pggan_preemptions_total") == 0
    assert _gauge(hub, "pggan_checkpoint_failures_total") == 2


def _worker_group_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("rank 1 died", {1: RuntimeError("lost")})


def test_restarts_are_counted_by_cause_and_a_placement_timeout_is_made_final(setup):
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.controller.state import (ErroredState, PreemptingState, ReschedulingState,
                                                                   RestartingState, RunningState, SchedulingState)
    from ray.train.v2.api.exceptions import ControllerError, PreemptionError
    from ray.train.v2.api.preemption import PreemptionInfo

    cfg, storage, run_url, state, hub, machine, relay, seen = setup
    watch = RestartWatch(hub, cfg.run.name, None)
    info = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"n1": [1]})
    watch.after_controller_state_update(RunningState(), PreemptingState(info, 0.0))  # a notice: no restart yet
    watch.after_controller_state_update(PreemptingState(info, 0.0), RestartingState(PreemptionError(info)))
    start_failed = ControllerError(WorkerGroupStartupFailedError("a worker died while the group started"))
    watch.after_controller_state_update(SchedulingState(None), ReschedulingState(start_failed))
    watch.after_controller_state_update(RunningState(), ErroredState(_worker_group_error()))  # final: no retry
    assert hub.get_restarts(cfg.run.name, None) == 1 and hub.get_preemptions(cfg.run.name, None) == 1
    with pytest.raises(WorkersUnplaceable):
        timeout = ControllerError(WorkerGroupStartupTimeoutError(2))
        watch.after_controller_state_update(SchedulingState(None), ReschedulingState(timeout))
    assert hub.get_restarts(cfg.run.name, None) == 1
    machine.begin_training(stages(cfg)[0], 0)
    assert (state.worker_restarts, state.preemptions) == (1, 1)
    assert RunState.load(storage, run_url).preemptions == 1
    assert _gauge(hub, "pggan_preemptions_total") == 1


def test_a_collective_error_after_a_preemption_notice_is_held_until_the_deadline_passes(monkeypatch, capsys):
    # Raised at once, a survivor's failed all-reduce would reach Ray Train before the preempted rank's death and
    # be charged as an ordinary failure; held, Ray Train tears the group down at the deadline (the drill kills
    # the node for real: tests/test_chaos.py). Here nobody tears it down: it gives up past deadline + grace.
    from types import SimpleNamespace

    from ray.train.v2.api.preemption import PreemptionInfo

    from pggan import worker

    naps: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr(worker.time, "time", lambda: clock[0])
    monkeypatch.setattr(worker.time, "sleep", lambda s: (naps.append(s), clock.__setitem__(0, clock[0] + s)))
    run = SimpleNamespace(preemption=None, rank=1, stage=SimpleNamespace(name="03-16-fade"))
    worker._WorkerRun.hold_error_through_preemption(run, RuntimeError("Connection reset by peer"))
    assert naps == [] and capsys.readouterr().out == ""  # no notice: an ordinary failure, raised at once

    run.preemption = PreemptionInfo(deadline_ms=1010_000, preempted_node_to_ranks={"n0": [0]})
    worker._WorkerRun.hold_error_through_preemption(run, RuntimeError("Connection reset by peer"))
    assert clock[0] == pytest.approx(1010 + worker.PREEMPTION_HOLD_GRACE_S)  # the deadline, then the grace
    assert "rank 1: RuntimeError after the preemption notice" in capsys.readouterr().out

    clock[0] = 2000.0
    run.preemption = PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"n0": [0]})
    worker._WorkerRun.hold_error_through_preemption(run, RuntimeError("Connection reset by peer"))
    assert clock[0] == pytest.approx(2000 + worker.PREEMPTION_HOLD_NO_DEADLINE_S + worker.PREEMPTION_HOLD_GRACE_S)


def test_combine_ranks_averages_finite_losses_only():
    a = {"loss_G": 1.0, "loss_D": float("nan"), "gp": 0.2, "node_id": "a"}
    b = {"loss_G": 3.0, "loss_D": 4.0, "gp": 0.4, "node_id": "b"}
    out = combine_ranks([a, b])
    assert out["loss_G"] == 2.0 and out["loss_D"] == 4.0 and math.isclose(out["gp"], 0.3)
    assert out["nodes"] == ["a", "b"]


def test_stage_seconds_count_a_fits_startup_from_the_fit_start():
    t = {"times": {"ready": 100.0, "first_step": 130.0, "trained": 200.0, "eval_start": 200.0, "evaluated": 210.0}}
    assert stage_seconds(t, fit_start=90.0) == {"startup": 40.0, "train": 70.0, "eval": 10.0}
    assert stage_seconds(t, fit_start=None)["startup"] == 30.0


def test_history_appends_objects_and_reads_them_back_in_order():
    storage, run = Storage(), "memory://history-run"
    storage.write_bytes(f"{run}/metrics.jsonl", b'{"event": "tick", "nimg": 1}\n')  # a run from before
    for i in range(2, 13):
        append_records(storage, run, [{"event": "tick", "nimg": i}])
    append_records(storage, run, [])
    assert [r["nimg"] for r in read_records(storage, run)] == list(range(1, 13))
    assert len(storage.listdir(f"{run}/history")) == 11  # one object per append, none rewritten
    storage.rm(run, recursive=True)
