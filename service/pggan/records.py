"""The report a worker sends every tick, one type from the worker through the relay to the hub, the exporter
and the metric history. Pure (no torch, no Ray).

A report is a plain dict (Ray Train carries dicts) with the keys of :class:`TickRecord`; ``event`` says what
else it carries: ``tick`` (progress; ``stage_done`` on the last tick of a stage), ``stage_end`` and
``baseline`` (an evaluation ``record``), ``rollback``, or a ``fatal`` message.
"""

from __future__ import annotations

import math
import time
from typing import Any, NotRequired, TypedDict

from .schedule import Stage


class TickRecord(TypedDict):
    event: str                  # tick | stage_end | baseline | rollback
    nimg: int                   # images shown to D so far (whole run)
    kimg: float                 # nimg / 1000
    stage_index: int
    stage: str                  # e.g. "03-16-fade"
    resolution: int             # pixels per side
    alpha: float                # fade-in blend, 0..1 (1 in stable stages)
    progress: float             # fraction of the stage done, 0..1
    total_nimg: int             # images of the whole schedule
    img_per_s: float            # over this tick, all ranks together
    loss_G: float               # mean over the tick's steps (and over ranks, by the relay)
    loss_D: float
    gp: float                   # unweighted gradient penalty, mean over the tick
    nonfinite_total: int        # non-finite steps skipped since the run began
    time: float                 # unix seconds at the report
    checkpoints: list[dict[str, Any]]  # rank 0's writes finished since the last report: nimg, ok, seconds, bytes, time
    checkpoint_retries: int     # failed write attempts retried by this worker group
    group_start_nimg: int       # where this worker group (re)started
    group_start_time: float     # unix seconds
    node_id: str                # the Ray node of the reporting rank
    stage_done: NotRequired[bool]
    record: NotRequired[dict[str, Any]]   # stage_end / baseline: the evaluation record
    fatal: NotRequired[str]
    fatal_kind: NotRequired[str]
    nodes: NotRequired[list[str]]         # added by the relay: every rank's node


def tick_record(*, nimg: int, stage: Stage, total_nimg: int, img_per_s: float, means: dict[str, float],
                nonfinite_total: int, checkpoints: list[dict[str, Any]], checkpoint_retries: int,
                group_start_nimg: int, group_start_time: float, node_id: str, event: str = "tick",
                **extra: Any) -> TickRecord:
    rec: dict[str, Any] = {
        "event": event, "nimg": nimg, "kimg": nimg / 1000, "stage_index": stage.index, "stage": stage.name,
        "resolution": stage.resolution, "alpha": stage.alpha(nimg),
        "progress": min(max((nimg - stage.start) / stage.nimg, 0.0), 1.0), "total_nimg": total_nimg,
        "img_per_s": img_per_s, "loss_G": means.get("loss_G", float("nan")),
        "loss_D": means.get("loss_D", float("nan")), "gp": means.get("gp", 0.0), "nonfinite_total": nonfinite_total,
        "time": time.time(), "checkpoints": checkpoints, "checkpoint_retries": checkpoint_retries,
        "group_start_nimg": group_start_nimg, "group_start_time": group_start_time, "node_id": node_id, **extra}
    return rec  # type: ignore[return-value]


def combine_ranks(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from every rank's report of a tick: rank 0's, with losses averaged over the ranks whose value
    is finite, and every rank's node."""
    out = dict(reports[0])
    for key in ("loss_G", "loss_D", "gp"):
        finite = [r[key] for r in reports if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if finite:
            out[key] = sum(finite) / len(finite)
    out["nodes"] = [r.get("node_id", "") for r in reports]
    return out


def history_tick(report: dict[str, Any]) -> dict[str, Any]:
    """What the metric history keeps of a tick (checkpoint details go to the exporter only)."""
    return {k: v for k, v in report.items() if k not in ("checkpoints", "record")} | {"event": "tick"}


def stage_seconds(record: dict[str, Any], fit_start: float | None) -> dict[str, float]:
    """Where a stage's time went, from the worker's timestamps: start-up (fit start or previous stage's end ->
    first step done), training (first step -> last step), evaluation."""
    t = record.get("times") or {}
    out: dict[str, float] = {}
    begin = fit_start if fit_start is not None else t.get("ready")
    if begin is not None and "first_step" in t:
        out["startup"] = max(t["first_step"] - begin, 0.0)
    if "first_step" in t and "trained" in t:
        out["train"] = t["trained"] - t["first_step"]
    if "eval_start" in t and "evaluated" in t:
        out["eval"] = t["evaluated"] - t["eval_start"]
    return out
