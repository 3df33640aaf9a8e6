"""The head-node side of telemetry under Ray: one exporter actor fed by a Ray Train UserCallback.

Workers open no ports. Each stage's TorchTrainer carries a :class:`ReportRelay` callback; it runs in the
Train controller and forwards every report to the :class:`TelemetryHub` actor, which lives on the driver's
node, owns the Prometheus exporter (one per cluster, shared by Tune trials through the ``trial`` label)
and buffers the tick records the driver writes to the run's metric history.
"""

from __future__ import annotations

import math
from typing import Any

import ray  # 1. Ray core: the hub actor
from ray.train import UserCallback  # 2. Ray Train: controller-side callback

from .telemetry import Exporter, Telemetry

HUB_NAME = "pggan-telemetry-hub"


class TelemetryHub:
    """Plain class wrapped with ray.remote below (testable without Ray)."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0):
        self.exporter = Exporter()
        self.port = self.exporter.start_http_server(host, port) if port else None
        self.telemetry: dict[tuple[str, str | None], Telemetry] = {}
        self.ticks: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
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

    def on_tick(self, run: str, trial: str | None, tick: dict[str, Any]) -> None:
        t = self._t(run, trial)
        t.on_tick(tick)
        for ck in tick.get("checkpoints", []):
            t.on_checkpoint(ck["ok"], ck["seconds"], ck["time"])
        key = (run, trial)
        # A failed write attempt that is retried counts as a failure too, so an outage shows while it lasts
        # (pggan_checkpoint_failures_total), not only once the write gives up. The count starts again at 0
        # with every new worker group.
        retries, seen = int(tick.get("checkpoint_retries", 0)), self.retries_seen.get(key, 0)
        for _ in range(retries - seen if retries >= seen else retries):
            t.on_checkpoint(False, 0.0, float(tick.get("time", 0.0)))
        self.retries_seen[key] = retries
        self.ticks.setdefault(key, []).append({k: v for k, v in tick.items() if k != "checkpoints"}
                                              | {"event": "tick"})
        self.latest[key] = tick

    def on_checkpoint_failure(self, run: str, trial: str | None, seconds: float, timestamp: float) -> None:
        self._t(run, trial).on_checkpoint(False, seconds, timestamp)

    def on_swd(self, run: str, trial: str | None, per_level: dict[str, float], avg: float) -> None:
        self._t(run, trial).on_swd(per_level, avg)

    def on_worker_restart(self, run: str, trial: str | None, n: int = 1) -> None:
        self._t(run, trial).on_worker_restart(n)
        self.restarts[(run, trial)] = self.restarts.get((run, trial), 0) + n

    def drain_ticks(self, run: str, trial: str | None) -> list[dict[str, Any]]:
        return self.ticks.pop((run, trial), [])

    def get_latest(self, run: str, trial: str | None) -> dict[str, Any] | None:
        return self.latest.get((run, trial))

    def get_restarts(self, run: str, trial: str | None) -> int:
        return self.restarts.get((run, trial), 0)

    def render(self) -> str:
        return self.exporter.render()

    def stop(self) -> None:
        self.exporter.stop()


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
        if not metrics:
            return
        tick = dict(metrics[0])
        for key in ("loss_G", "loss_D", "gp"):
            vals = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
            finite = [v for v in vals if math.isfinite(v)]
            if finite:
                tick[key] = sum(finite) / len(finite)
        self.hub.on_tick.remote(self.run, self.trial, tick)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.hub.on_worker_restart.remote(self.run, self.trial, 1)
