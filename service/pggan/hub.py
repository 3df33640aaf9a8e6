"""The head-node side of telemetry under Ray: one exporter actor fed by a Ray Train UserCallback.

Workers open no ports. Each fit's TorchTrainer carries a :class:`ReportRelay` callback; it runs in the
Train controller and forwards every report to the :class:`TelemetryHub` actor, which lives on the driver's
node, owns the Prometheus exporter (one per cluster, shared by Tune trials through the ``trial`` label)
and buffers the tick records the driver writes to the run's metric history.
"""

from __future__ import annotations

from typing import Any

import ray  # 1. Ray core: the hub actor
from ray.train import UserCallback  # 2. Ray Train: controller-side callback
# 3. Ray Train (DeveloperAPI): the controller's state transitions, the one place that sees every restart with its cause
from ray.train.v2._internal.execution.callback import ControllerCallback

from .records import combine_ranks
from .telemetry import Exporter, Telemetry

HUB_NAME = "pggan-telemetry-hub"


class TelemetryHub:
    """Plain class wrapped with ray.remote below (testable without Ray).

    Every report of a run (ticks, stage ends, the baseline, fatal errors) updates the run's metrics here and
    waits in a queue until the driver drains it (:meth:`drain`), which is how the driver's state machine
    learns of stage ends and how tick records reach the metric history.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 0):
        self.exporter = Exporter()
        self.port = self.exporter.start_http_server(host, port) if port else None
        self.telemetry: dict[tuple[str, str | None], Telemetry] = {}
        self.queue: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        self.latest: dict[tuple[str, str | None], dict[str, Any]] = {}
        self.restarts: dict[tuple[str, str | None], int] = {}
        self.preemptions: dict[tuple[str, str | None], int] = {}
        self.retries_seen: dict[tuple[str, str | None], int] = {}

    def _t(self, run: str, trial: str | None) -> Telemetry:
        key = (run, trial)
        if key not in self.telemetry:
            self.telemetry[key] = Telemetry(run, trial, exporter=self.exporter)
        return self.telemetry[key]

    def get_port(self) -> int | None:
        return self.port

    def set_state(self, run: str, trial: str | None, state: str) -> None:
        self._t(run, trial).set_state(state)

    def set_images_seen(self, run: str, trial: str | None, nimg: int) -> None:
        self._t(run, trial).set_images_seen(nimg)

    def on_report(self, run: str, trial: str | None, report: dict[str, Any]) -> None:
        """One report of every rank, combined by the relay (see :mod:`pggan.records`)."""
        key = (run, trial)
        t = self._t(run, trial)
        if report.get("event", "tick") == "tick":
            t.on_tick(report)
            self.latest[key] = report
        for ck in report.get("checkpoints", []):
            t.on_checkpoint(ck["ok"], ck["seconds"], ck["time"])
        # A failed write attempt that is retried counts as a failure too, so an outage shows while it lasts
        # (pggan_checkpoint_failures_total), not only once the write gives up. The count starts again at 0
        # with every new worker group.
        retries, seen = int(report.get("checkpoint_retries", 0)), self.retries_seen.get(key, 0)
        for _ in range(retries - seen if retries >= seen else retries):
            t.on_checkpoint(False, 0.0, float(report.get("time", 0.0)))
        self.retries_seen[key] = retries
        swd = (report.get("record") or {}).get("swd") if report.get("event") == "stage_end" else None
        if swd and swd.get("swd_x1e3"):
            t.on_swd(swd["swd_x1e3"], swd["avg"])
        self.queue.setdefault(key, []).append(report)

    def on_worker_restart(self, run: str, trial: str | None, n: int = 1) -> None:
        self._t(run, trial).on_worker_restart(n)
        self.restarts[(run, trial)] = self.restarts.get((run, trial), 0) + n

    def on_preemption(self, run: str, trial: str | None, n: int = 1) -> None:
        self._t(run, trial).on_preemption(n)
        self.preemptions[(run, trial)] = self.preemptions.get((run, trial), 0) + n

    def drain(self, run: str, trial: str | None) -> list[dict[str, Any]]:
        """The reports received since the last drain, oldest first."""
        return self.queue.pop((run, trial), [])

    def get_latest(self, run: str, trial: str | None) -> dict[str, Any] | None:
        return self.latest.get((run, trial))

    def get_restarts(self, run: str, trial: str | None) -> int:
        return self.restarts.get((run, trial), 0)

    def get_preemptions(self, run: str, trial: str | None) -> int:
        return self.preemptions.get((run, trial), 0)


def call(hub: Any, method: str, *args: Any) -> Any:
    """hub.method(*args) on the actor (waiting for the result) or on a plain TelemetryHub (unit tests)."""
    fn = getattr(hub, method)
    return ray.get(fn.remote(*args)) if hasattr(fn, "remote") else fn(*args)


def get_hub(host: str, port: int) -> Any:
    """The cluster's hub actor, created on this (the driver's) node on first use."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(TelemetryHub)
    return actor_cls.options(
        name=HUB_NAME, get_if_exists=True, lifetime=None,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(host, port)


class ReportRelay(UserCallback):
    """Runs in the Train controller: forwards each report (rank 0's, losses averaged over ranks) to the hub."""

    def __init__(self, hub: Any, run: str, trial: str | None):
        self.hub, self.run, self.trial = hub, run, trial

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            report = combine_ranks(metrics)
            if isinstance(report.get("record"), dict) and "nodes" in report["record"]:
                # Every rank evaluates its share: the evaluation record names every rank's node, not rank 0's only.
                report["record"] = {**report["record"], "nodes": report["nodes"]}
            fn = self.hub.on_report
            (fn.remote if hasattr(fn, "remote") else fn)(self.run, self.trial, report)

    # Restarts are counted by RestartWatch: after_exception runs on every poll that sees a dead worker (again and
    # again while a preempted node drains) and never for a worker that dies while the group starts.


class WorkersUnplaceable(RuntimeError):
    """The cluster could not place the worker group within cluster.start_timeout_s. Not retried: unlike a
    worker that dies while the group starts, waiting longer does not help (the driver's message says what does)."""


class RestartWatch(ControllerCallback):
    """Runs in the Train controller: counts every worker-group restart by its cause, and makes a placement timeout
    final.

    Ray Train restarts the group from three kinds of failure, each with its own budget (FailureConfig):
    a worker lost while training or evaluating (WorkerGroupError: max_failures), a worker lost while the group
    starts (ControllerError(WorkerGroupStartupFailedError): controller_failure_limit) and a preempted node
    (PreemptionError: max_preemption_failures). Each retry is a transition into RestartingState or
    ReschedulingState carrying the error, so counting here covers every moment once. A placement timeout
    (WorkerGroupStartupTimeoutError) is retryable in Ray's policy too; raising here turns it into a
    non-retryable controller error, so a cluster that cannot place the workers fails after start_timeout_s
    instead of retrying it controller_failure_limit times."""

    def __init__(self, hub: Any, run: str, trial: str | None):
        self.hub, self.run, self.trial = hub, run, trial

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        error = getattr(current_state, "training_failed_error", None)
        if error is None or type(current_state).__name__ not in ("RestartingState", "ReschedulingState"):
            return
        cause = restart_cause(error)
        if cause == "unplaceable":
            raise WorkersUnplaceable(str(getattr(error, "controller_failure", error)))
        fn = getattr(self.hub, "on_preemption" if cause == "preemption" else "on_worker_restart")
        (fn.remote if hasattr(fn, "remote") else fn)(self.run, self.trial, 1)


def restart_cause(error: BaseException) -> str:
    """"preemption", "unplaceable" or "failure" for the error Ray Train is about to retry."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError, PreemptionError

    if isinstance(error, ControllerError) and isinstance(error.controller_failure, WorkerGroupStartupTimeoutError):
        return "unplaceable"
    try:  # Ray's own test, so the count agrees with the budget Ray charges (max_preemption_failures)
        from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure

        preempted = _is_preemption_failure(error)
    except ImportError:  # pragma: no cover - Ray moved it
        preempted = isinstance(error, PreemptionError)
    return "preemption" if preempted else "failure"
