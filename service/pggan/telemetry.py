"""Prometheus metrics of training runs, exported from one place per cluster (the telemetry hub on the head node).

Two objects:

- :class:`Exporter` owns one ``prometheus_client.CollectorRegistry`` and, when asked, one HTTP server that
  serves ``/metrics`` from it. Under Ray its owner is the :class:`pggan.hub.TelemetryHub` actor, fed by a Ray
  Train ``UserCallback`` (:class:`pggan.hub.ReportRelay`); Tune trials share it through the ``trial`` label.
- :class:`Telemetry` holds the metric values of one run (or one Tune trial of a run) and is what the hub
  calls: ``set_state``, ``on_tick``, ``on_checkpoint``, ``on_swd``, ``on_worker_restart``. Its series carry a
  ``run`` label, plus ``trial`` when one is given. Without an exporter it makes a private one.

The metric names are the product contract (DESIGN.md "Prometheus metrics"); the Grafana dashboard and the alert
rules in deploy/ query exactly these, and tests check that they agree. :data:`METRICS` lists them.

Values are kept as plain numbers and turned into metric families at scrape time by one custom collector. That
lets several runs with different label sets share a registry, lets ``pggan_images_seen`` be *set* from the
checkpointed count on resume, and keeps the counters below monotone within a process even when the totals the
workers report start again from zero (a fresh stage or a rollback): any decrease is taken as a restart of that
count, the way Prometheus' ``rate()`` reads a counter reset.

This module imports no ray and no torch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import start_http_server as _prom_start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .run_state import STATES


# Buckets of pggan_checkpoint_duration_seconds: a small model on local disk takes well under a second, a
# 1024x1024 train state (G, D, G_ema, two Adams: a few GB) to S3 takes minutes.
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)

# Exposed name -> (type, help). The family name of a counter or histogram is what a query uses for it here,
# e.g. pggan_worker_restarts_total, pggan_checkpoint_duration_seconds_bucket.
METRICS: dict[str, tuple[str, str]] = {
    "pggan_run_state": ("gauge", "Run state machine: one series per state, 1 for the current state."),
    "pggan_resolution": ("gauge", "Resolution being trained (pixels per side)."),
    "pggan_stage_index": ("gauge", "Index of the current stage (0 = first stable stage; fade-in and stable stages alternate)."),
    "pggan_fade_alpha": ("gauge", "Fade-in blend factor of the new block: 0..1 in a fade-in stage, 1 in a stable stage."),
    "pggan_images_seen": ("gauge", "Real images shown to D so far (set from the checkpoint on resume; goes down on rollback)."),
    "pggan_stage_progress_ratio": ("gauge", "Fraction of the current stage done, 0..1."),
    "pggan_train_images_per_second": ("gauge", "Training throughput over the last tick, images per second (all workers)."),
    "pggan_loss": ("gauge", "Loss of the last tick, by network (net=G|D)."),
    "pggan_gradient_penalty": ("gauge", "WGAN-GP gradient penalty term of the last tick."),
    "pggan_swd_x1e3": ("gauge", "Sliced Wasserstein distance x1e3 of G_ema at the last evaluation, per Laplacian level (level=<res>) and level=avg."),
    "pggan_checkpoint_last_success_timestamp_seconds": ("gauge", "Unix time of the last checkpoint completely written."),
    "pggan_checkpoint_duration_seconds": ("histogram", "Time to write a checkpoint that succeeded."),
    "pggan_checkpoint_failures_total": ("counter", "Failed checkpoint write attempts (retried or final)."),
    "pggan_worker_restarts_total": ("counter", "Ray Train worker-group restarts."),
    "pggan_nonfinite_steps_total": ("counter", "Training steps skipped because a loss or gradient was not finite."),
}

# Exported beyond the DESIGN.md contract above (which tests keep METRICS equal to): spot preemptions are
# counted apart from failures, so a preempted node neither reads as a fault nor fires the restart alerts.
EXTRA_METRICS: dict[str, tuple[str, str]] = {
    "pggan_preemptions_total": ("counter", "Worker-group restarts after a node preemption (spot reclaim, drain); "
                                           "not failures: they do not use up cluster.max_failures."),
}

# Exposed series names, including the histogram's _bucket/_sum/_count: what a PromQL query may refer to.
SERIES_NAMES: frozenset[str] = frozenset(
    [n for n, (t, _) in {**METRICS, **EXTRA_METRICS}.items() if t != "histogram"]
    + [f"{n}{s}" for n, (t, _) in METRICS.items() if t == "histogram" for s in ("_bucket", "_sum", "_count")])

TICK_KEYS = ("nimg", "resolution", "stage_index", "alpha", "progress", "img_per_s",
             "loss_G", "loss_D", "gp", "nonfinite_total")


class Exporter:
    """One registry and at most one ``/metrics`` HTTP server, shared by every :class:`Telemetry` attached to it.

    Create one per process (the driver, or the sweep for all its trials) and pass it to each Telemetry.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str | None], Telemetry] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None
        self.registry.register(_Collector(self))

    # -- runs -----------------------------------------------------------------------------------------------

    def _attach(self, t: Telemetry) -> None:
        key = (t.run, t.trial)
        with self._lock:
            if key in self._runs:
                raise ValueError(f"telemetry for run={t.run!r} trial={t.trial!r} is already registered with this exporter")
            self._runs[key] = t

    def _detach(self, t: Telemetry) -> None:
        with self._lock:
            if self._runs.get((t.run, t.trial)) is t:
                del self._runs[(t.run, t.trial)]

    def _snapshot(self) -> list[Telemetry]:
        with self._lock:
            return list(self._runs.values())

    # -- serving --------------------------------------------------------------------------------------------

    def start_http_server(self, host: str = "0.0.0.0", port: int = 0) -> int:
        """Serve ``/metrics`` on host:port (0 = any free port) in a daemon thread; returns the bound port.

        Idempotent: when already serving on this host and the same port (or port 0 is asked), returns that
        port. Asking for a different address while serving is an error (one server per process).
        """
        with self._lock:
            if self._server is not None:
                bound_host, bound_port = self._address  # type: ignore[misc]
                if host == bound_host and port in (0, bound_port):
                    return bound_port
                raise RuntimeError(f"the exporter already serves on {bound_host}:{bound_port}; "
                                   f"cannot also serve on {host}:{port}")
            server, thread = _prom_start_http_server(port, addr=host, registry=self.registry)
            self._server, self._thread = server, thread
            self._address = (host, int(server.server_port))
            return self._address[1]

    def stop(self) -> None:
        """Shut the HTTP server down (if running) and free its port. The registry keeps its values."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = self._address = None
        if server is not None:
            server.shutdown()
            server.server_close()
            if thread is not None:
                thread.join(timeout=5)

    def render(self) -> str:
        """The current exposition (Prometheus text format), as a scrape would see it."""
        return generate_latest(self.registry).decode("utf-8")


class Telemetry:
    """Metric values of one run, labelled ``run`` (and ``trial`` for a Tune trial).

    One run (private exporter)::

        telemetry = Telemetry("celeba")
        port = telemetry.start_http_server("0.0.0.0", cfg.metrics.port)
        telemetry.set_state("training"); telemetry.on_tick(tick); ...; telemetry.stop()

    Several trials in one process share an exporter::

        exporter = Exporter(); exporter.start_http_server(host, port)
        trial_telemetry = Telemetry(run, trial=trial_id, exporter=exporter)
    """

    def __init__(self, run: str, trial: str | None = None, exporter: Exporter | None = None) -> None:
        if not run:
            raise ValueError("run must be a non-empty string")
        if trial is not None and not trial:
            raise ValueError("trial must be None or a non-empty string")
        self.run = run
        self.trial = trial
        self.labels: dict[str, str] = {"run": run} if trial is None else {"run": run, "trial": trial}
        self._owns_exporter = exporter is None
        self.exporter = exporter if exporter is not None else Exporter()
        self._lock = threading.Lock()
        self._state = "pending"
        self._gauges: dict[str, float] = {}        # gauges labelled by run (and trial) only: name -> value
        self._loss: dict[str, float] = {}          # net -> value
        self._swd: dict[str, float] = {}           # level -> value
        self._failures = 0.0
        self._restarts = 0.0
        self._preemptions = 0.0
        self._nonfinite = 0.0                      # exported, monotone in this process
        self._nonfinite_reported: float | None = None  # last cumulative total the driver passed in
        self._ckpt_bucket_counts = [0] * len(CHECKPOINT_BUCKETS)
        self._ckpt_sum = 0.0
        self._ckpt_count = 0
        self.exporter._attach(self)

    @property
    def registry(self) -> CollectorRegistry:
        return self.exporter.registry

    @property
    def state(self) -> str:
        return self._state

    # -- what the driver calls ------------------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        """Move the run to ``state`` (one of :data:`STATES`); exactly one state series reads 1."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {', '.join(STATES)}")
        with self._lock:
            self._state = state

    def on_tick(self, tick: Mapping[str, Any]) -> None:
        """Record one progress tick. Keys: :data:`TICK_KEYS` (others are ignored); ``gp`` may be None (LSGAN has
        no penalty), and so may a loss that no rank could compute (its series is then left out).

        ``nimg`` is the absolute image count (from the checkpoint after a resume) and ``nonfinite_total`` the
        cumulative count of skipped non-finite steps as the workers report it.
        """
        missing = [k for k in TICK_KEYS if k not in tick]
        if missing:
            raise ValueError(f"tick is missing {', '.join(missing)}")
        with self._lock:
            g = self._gauges
            g["pggan_images_seen"] = float(tick["nimg"])
            g["pggan_resolution"] = float(tick["resolution"])
            g["pggan_stage_index"] = float(tick["stage_index"])
            g["pggan_fade_alpha"] = float(tick["alpha"])
            g["pggan_stage_progress_ratio"] = float(tick["progress"])
            g["pggan_train_images_per_second"] = float(tick["img_per_s"])
            for net in ("G", "D"):
                if tick[f"loss_{net}"] is None:
                    self._loss.pop(net, None)
                else:
                    self._loss[net] = float(tick[f"loss_{net}"])
            if tick["gp"] is None:
                g.pop("pggan_gradient_penalty", None)
            else:
                g["pggan_gradient_penalty"] = float(tick["gp"])
            self._count_nonfinite(float(tick["nonfinite_total"]))

    def set_images_seen(self, nimg: int) -> None:
        """Set the image count before the first tick, e.g. right after resuming from a checkpoint."""
        if nimg < 0:
            raise ValueError("nimg must be >= 0")
        with self._lock:
            self._gauges["pggan_images_seen"] = float(nimg)

    def on_checkpoint(self, ok: bool, duration_s: float, timestamp: float) -> None:
        """A checkpoint write ended. Success: its time becomes the last-success timestamp and its duration is
        observed in the histogram. Failure: the failure counter goes up (the duration is not observed)."""
        with self._lock:
            if not ok:
                self._failures += 1
                return
            self._gauges["pggan_checkpoint_last_success_timestamp_seconds"] = float(timestamp)
            self._ckpt_sum += float(duration_s)
            self._ckpt_count += 1
            for i, le in enumerate(CHECKPOINT_BUCKETS):
                if duration_s <= le:
                    self._ckpt_bucket_counts[i] += 1

    def on_swd(self, per_level: Mapping[int | str, float], avg: float) -> None:
        """SWD of an evaluation, already x1e3 (the paper's unit), per Laplacian level (keyed by resolution)
        and averaged. Replaces the previous evaluation's levels."""
        with self._lock:
            self._swd = {str(int(res)): float(v) for res, v in per_level.items()}
            self._swd["avg"] = float(avg)

    def on_worker_restart(self, n: int = 1) -> None:
        """The worker group was restarted ``n`` times (Ray Train failure handling)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._restarts += n

    def on_preemption(self, n: int = 1) -> None:
        """The worker group was restarted ``n`` times because a node was preempted (not a failure)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._preemptions += n

    # -- serving --------------------------------------------------------------------------------------------

    def start_http_server(self, host: str = "0.0.0.0", port: int = 0) -> int:
        """Serve ``/metrics`` through this telemetry's exporter; returns the bound port (port 0 = a free one)."""
        return self.exporter.start_http_server(host, port)

    def stop(self) -> None:
        """Stop the HTTP server if this telemetry owns its exporter. A shared exporter is stopped by its owner
        (``Exporter.stop``); this run's series stay exported until :meth:`close`."""
        if self._owns_exporter:
            self.exporter.stop()

    def close(self) -> None:
        """Stop exporting this run's series (and stop the server of a private exporter)."""
        self.exporter._detach(self)
        self.stop()

    def render(self) -> str:
        """Exposition text of the whole registry this telemetry is in (all runs of a shared exporter)."""
        return self.exporter.render()

    # -- internals ------------------------------------------------------------------------------------------

    def _count_nonfinite(self, total: float) -> None:
        last = self._nonfinite_reported
        if last is None:
            self._nonfinite += total
        elif total >= last:
            self._nonfinite += total - last
        else:  # the reported count started again (new stage, rollback, new worker group)
            self._nonfinite += total
        self._nonfinite_reported = total

    def _families(self) -> list[tuple[str, list[tuple[str, dict[str, str], float]]]]:
        """(family name, [(sample name, labels, value)]) for every family this run has values for."""
        lab = self.labels
        h = "pggan_checkpoint_duration_seconds"
        with self._lock:
            out = [("pggan_run_state", [("pggan_run_state", {**lab, "state": s}, 1.0 if s == self._state else 0.0)
                                        for s in STATES])]
            out += [(name, [(name, lab, v)]) for name, v in self._gauges.items()]
            if self._loss:
                out.append(("pggan_loss", [("pggan_loss", {**lab, "net": net}, v) for net, v in self._loss.items()]))
            if self._swd:
                out.append(("pggan_swd_x1e3",
                            [("pggan_swd_x1e3", {**lab, "level": lv}, v) for lv, v in self._swd.items()]))
            out += [(name, [(name, lab, v)]) for name, v in (("pggan_checkpoint_failures_total", self._failures),
                                                             ("pggan_worker_restarts_total", self._restarts),
                                                             ("pggan_preemptions_total", self._preemptions),
                                                             ("pggan_nonfinite_steps_total", self._nonfinite))]
            hist = [(f"{h}_bucket", {**lab, "le": _le(le)}, float(c))
                    for le, c in zip(CHECKPOINT_BUCKETS, self._ckpt_bucket_counts)]
            hist += [(f"{h}_sum", lab, self._ckpt_sum), (f"{h}_count", lab, float(self._ckpt_count))]
            out.append((h, hist))
        return out


def _le(x: float) -> str:
    return "+Inf" if math.isinf(x) else repr(float(x))


class _Collector(Collector):
    """Builds the metric families of every run attached to an exporter, at scrape time."""

    def __init__(self, exporter: Exporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for t in self._exporter._snapshot():
            for name, samples in t._families():
                merged.setdefault(name, []).extend(samples)
        for name, (typ, doc) in {**METRICS, **EXTRA_METRICS}.items():
            if name not in merged:
                continue
            # A counter family is named without _total; its sample keeps it (prometheus_client's convention).
            family = Metric(name.removesuffix("_total") if typ == "counter" else name, doc, typ)
            for sample_name, labels, value in merged[name]:
                family.add_sample(sample_name, labels, value)
            yield family
