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

    def drain(self, run: str, trial: str | None) -> list[dict[str, Any]]:
        """The reports received since the last drain, oldest first."""
        return self.queue.pop((run, trial), [])

    def get_latest(self, run: str, trial: str | None) -> dict[str, Any] | None:
        return self.latest.get((run, trial))

    def get_restarts(self, run: str, trial: str | None) -> int:
        return self.restarts.get((run, trial), 0)


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
            fn = self.hub.on_report
            (fn.remote if hasattr(fn, "remote") else fn)(self.run, self.trial, combine_ranks(metrics))

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        fn = self.hub.on_worker_restart
        (fn.remote if hasattr(fn, "remote") else fn)(self.run, self.trial, 1)
