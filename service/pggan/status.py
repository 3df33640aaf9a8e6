"""Where a run is, read from its run directory alone: `launch.py status RUN_URL [--json] [--watch]`.

Everything comes from what the run has written (config.json, run_state.json, the metric history, the
checkpoints' meta.json), so it works on a run that is training elsewhere, on a stopped one and on a
finished one in a bucket, from any machine that can read the storage. No torch, no ray: it is quick.

The ETA walks the rest of the schedule: each remaining stage's images at the img/s measured at its
resolution (the median of its ticks); a resolution that has not run yet gets the rate of the highest
measured one, scaled by the ratio of the networks' cost per image at the two resolutions (3x3-conv
multiply-adds of G and D up to that resolution). Each remaining stage end adds the measured per-stage
overhead (evaluation, and worker start-up where the history records it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .history import read_records
from .run_state import TERMINAL, RunState
from .storage import Storage, explain_storage_error, join, normalize

RATE_TICKS = 5  # "img/s over the last ticks"


# ---- reading the run directory ------------------------------------------------------------------

@dataclass
class RunView:
    """The raw contents of a run directory that status and report read (one listing pass)."""

    run_url: str
    config: Any                       # RunConfig, or None when config.json is missing or no longer validates
    config_problem: str               # why config is None ("" when it is not)
    state: RunState
    has_state: bool                   # run_state.json exists
    records: list[dict[str, Any]]     # the metric history, oldest first
    checkpoints: list[int]            # committed checkpoints' image counts, oldest first
    checkpoint_meta: dict[str, Any]   # meta.json of the newest ({} if none)
    samples: list[str]                # file names under samples/
    raw_state: dict[str, Any]         # run_state.json as written, extra fields included


def load_run(storage: Storage, run_url: str) -> RunView:
    """Read a run directory; a URL with neither config.json nor run_state.json is a UserError (no run there)."""
    from .config import ConfigError, from_json

    run_url = normalize(run_url)
    try:
        has_cfg = storage.exists(join(run_url, "config.json"))
        has_state = storage.exists(join(run_url, "run_state.json"))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing bucket, no credentials, no endpoint: one message
        raise UserError(explain_storage_error(run_url, e)) from None
    if not has_cfg and not has_state:
        raise UserError(f"no run at {run_url}: neither config.json nor run_state.json is there "
                        "(check the URL and run name; for S3-compatible stores pass --endpoint-url)")
    cfg, problem = None, ""
    if has_cfg:
        try:
            cfg = from_json(storage.read_json(join(run_url, "config.json")))
        except ConfigError as e:
            problem = "config.json does not validate with this version: " + "; ".join(e.lines())
        except ValueError as e:
            problem = f"config.json is unreadable: {e}"
    else:
        problem = "config.json is missing"
    raw_state: dict[str, Any] = storage.read_json(join(run_url, "run_state.json")) if has_state else {}
    known = set(RunState.__dataclass_fields__)
    state = RunState(**{k: v for k, v in raw_state.items() if k in known})
    ckpts = committed_checkpoints(storage, run_url)
    meta: dict[str, Any] = {}
    if ckpts:
        try:
            meta = storage.read_json(join(run_url, "checkpoints", f"ckpt-{ckpts[-1]:012d}", "meta.json"))
        except (FileNotFoundError, ValueError):  # pruned between the listing and the read
            meta = {}
    samples = [n for n in storage.listdir(join(run_url, "samples")) if n.endswith(".png")]
    return RunView(run_url=run_url, config=cfg, config_problem=problem, state=state, has_state=has_state,
                   records=read_records(storage, run_url), checkpoints=ckpts, checkpoint_meta=meta, samples=samples,
                   raw_state=raw_state)


_CKPT_RE = re.compile(r"^ckpt-(\d{12})$")


def committed_checkpoints(storage: Storage, run_url: str) -> list[int]:
    """Image counts of the committed checkpoints (meta.json present), oldest first: checkpoint.list_checkpoints
    restated, because importing pggan.checkpoint imports torch (seconds a status should not take)."""
    base = join(run_url, "checkpoints")
    return sorted(int(m.group(1)) for m in map(_CKPT_RE.match, storage.listdir(base))
                  if m and storage.exists(join(base, m.group(0), "meta.json")))


# ---- throughput and the ETA ---------------------------------------------------------------------

def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def network_cost(res: int, model: Any) -> float:
    """Multiply-adds per image of G and D's convolutions up to ``res`` (relative units: only ratios are used).

    Channels follow the networks' rule min(fmap_base / 2^(log2(r) - 1), fmap_max) (models.networks.num_channels,
    restated here to keep status free of torch). Per resolution r >= 8 a block has two 3x3 convs at r x r
    (ch(r/2) -> ch(r), ch(r) -> ch(r)); the 4x4 block a dense layer from the latent and one 3x3 conv. D mirrors G.
    """
    def ch(r: int) -> int:
        return max(1, min(int(model.fmap_base / 2.0 ** (int(math.log2(r)) - 1)), model.fmap_max))

    cost = float(model.latent_size * 16 * ch(4) + 9 * 16 * ch(4) * ch(4))
    r = 8
    while r <= res:
        cost += 9 * r * r * (ch(r // 2) * ch(r) + ch(r) * ch(r))
        r *= 2
    return 2 * cost  # G and D


def measured_rates(ticks: list[dict[str, Any]]) -> dict[int, float]:
    """img/s per resolution: the median over its ticks, leaving out each worker group's first tick (it holds
    the start-up: data loading, DDP setup, compilation) where the resolution has later ones."""
    by_res: dict[int, list[float]] = {}
    firsts: dict[int, list[float]] = {}
    seen_groups: set[Any] = set()
    for t in ticks:
        rate, res = t.get("img_per_s"), t.get("resolution")
        if not _finite(rate) or rate <= 0 or not isinstance(res, int):
            continue
        group = (t.get("group_start_nimg"), t.get("group_start_time"))
        first = group not in seen_groups and group != (None, None)
        seen_groups.add(group)
        (firsts if first else by_res).setdefault(res, []).append(float(rate))
    out = {}
    for res in set(by_res) | set(firsts):
        out[res] = statistics.median(by_res.get(res) or firsts[res])
    return out


def stage_overhead_s(stage_ends: list[dict[str, Any]]) -> float:
    """Seconds per stage outside training: the median evaluation time, plus the median worker start-up where the
    records say (``seconds.startup``). The first stage's start-up is left out: it holds the one-off cluster start
    and the first worker group's placement, which the stages after it do not repeat."""
    evals, startups = [], []
    for r in stage_ends:
        sec = r.get("seconds") if isinstance(r.get("seconds"), dict) else {}
        ev = sec.get("eval", r.get("eval_seconds"))
        if _finite(ev):
            evals.append(float(ev))
        if _finite(sec.get("startup")) and r.get("stage_index") != 0:
            startups.append(float(sec["startup"]))
    return (statistics.median(evals) if evals else 0.0) + (statistics.median(startups) if startups else 0.0)


def estimate_eta(stages: list[Any], nimg: int, rates: dict[int, float], model: Any,
                 overhead_s: float, evaluated: set[int] = frozenset()) -> dict[str, Any]:
    """Seconds left: the remaining images of every stage at its resolution's rate, plus one ``overhead_s`` per
    stage not evaluated yet (``evaluated``: indices of the stages with a stage-end record)."""
    if not rates:
        return {"eta_s": None, "train_s": None, "overhead_s": None, "estimated_resolutions": [],
                "why": "no img/s measured yet"}
    ref = max(rates)
    est: dict[int, float] = {}

    def rate(res: int) -> float:
        if res in rates:
            return rates[res]
        est[res] = rates[ref] * network_cost(ref, model) / network_cost(res, model)
        return est[res]

    train_s = 0.0
    ends = 0
    for st in stages:
        left = max(st.end - max(nimg, st.start), 0)
        if left:
            train_s += left / rate(st.resolution)
        if st.index not in evaluated:
            ends += 1
    overhead = ends * overhead_s
    return {"eta_s": train_s + overhead, "train_s": train_s, "overhead_s": overhead,
            "estimated_resolutions": sorted(est), "estimated_from": ref if est else None,
            "rates_img_per_s": {str(k): v for k, v in sorted((rates | est).items())}}


# ---- the status ---------------------------------------------------------------------------------

def gather(storage: Storage, run_url: str, now: float | None = None) -> dict[str, Any]:
    """The status of the run at ``run_url`` as plain JSON-able data (what `status --json` prints)."""
    return summarize(load_run(storage, run_url), now)


def summarize(view: RunView, now: float | None = None) -> dict[str, Any]:
    """The status of a run read with :func:`load_run` (see :func:`gather`); ``now`` for the ages (default: now)."""
    now = time.time() if now is None else now
    st, cfg, records = view.state, view.config, view.records
    ticks = [r for r in records if r.get("event") == "tick"]
    ends = [r for r in records if r.get("event") == "stage_end"]
    baseline = next((r for r in reversed(records) if r.get("event") == "baseline"), None)
    all_stages = []
    if cfg is not None:
        from .schedule import stages as schedule_stages

        all_stages = schedule_stages(cfg)
    total = all_stages[-1].end if all_stages else int(st.total_nimg or 0)
    nimg = _current_nimg(view, ticks, total)
    out: dict[str, Any] = {
        "run_url": view.run_url,
        "run_name": cfg.run.name if cfg is not None else view.run_url.rstrip("/").rsplit("/", 1)[-1],
        "state": st.state if view.has_state else "unknown",
        "message": st.message,
        "nimg": nimg, "kimg": nimg / 1000, "total_nimg": total, "total_kimg": total / 1000,
        "progress": nimg / total if total else None,
        "config_problem": view.config_problem or None,
        "time": now,
    }
    out["stage"] = _phase(st, all_stages, nimg, total)
    rates = measured_rates(ticks)
    out.update(_speed(ticks, rates, now))
    out["eta"] = _eta(view, all_stages, ends, nimg, total, rates)
    out["eta_s"] = out["eta"]["eta_s"]
    out["checkpoint"] = _checkpoint(view, now)
    out.update(_failures(view, ticks))
    out["swd"] = swd_summary(ends, baseline)
    out["stages"] = [_stage_row(s, nimg, ends, rates) for s in all_stages]
    out["samples"] = sorted(view.samples)
    return out


def _current_nimg(view: RunView, ticks: list[dict[str, Any]], total: int) -> int:
    """Where the run is, in images: run_state.json moves at transitions; ticks and checkpoints land in between
    (so a run still going is at the newest of the three), never past the schedule's end."""
    st = view.state
    nimg = int(st.nimg or 0)
    if st.state not in TERMINAL:
        if ticks and _finite(ticks[-1].get("nimg")):
            nimg = max(nimg, int(ticks[-1]["nimg"]))
        if view.checkpoints:
            nimg = max(nimg, view.checkpoints[-1])
    return min(nimg, total) if total else nimg


def _phase(st: RunState, all_stages: list[Any], nimg: int, total: int) -> dict[str, Any] | None:
    """The stage: the schedule's view at nimg (the state machine's stage while it evaluates or once completed);
    without a schedule, what run_state.json names."""
    if all_stages:
        from .schedule import current_stage

        cur = current_stage(min(nimg, total - 1) if total else 0, all_stages)
        if st.state in ("evaluating", "completed") and st.stage_index is not None \
                and 0 <= st.stage_index < len(all_stages):
            cur = all_stages[st.stage_index]
        return {"index": cur.index, "count": len(all_stages), "name": cur.name, "resolution": cur.resolution,
                "kind": cur.kind, "alpha": cur.alpha(nimg), "start_kimg": cur.start / 1000,
                "end_kimg": cur.end / 1000, "progress": min(max((nimg - cur.start) / cur.nimg, 0.0), 1.0)}
    if st.stage is not None:
        return {"index": st.stage_index, "count": None, "name": st.stage, "resolution": None, "kind": None,
                "alpha": None, "progress": None}
    return None


def _speed(ticks: list[dict[str, Any]], rates: dict[int, float], now: float) -> dict[str, Any]:
    """Throughput: over the last ticks, per resolution (``rates``, what the ETA uses), and the last tick itself."""
    recent = [float(t["img_per_s"]) for t in ticks[-RATE_TICKS:] if _finite(t.get("img_per_s")) and t["img_per_s"] > 0]
    last_tick = ticks[-1] if ticks else None
    return {
        # Harmonic mean: images over time for ticks of equal images (one quick tick does not lift it much).
        "img_per_s": len(recent) / sum(1 / r for r in recent) if recent else None,
        "img_per_s_ticks": len(recent),
        "img_per_s_by_resolution": {str(k): v for k, v in sorted(rates.items())},
        "last_tick": None if last_tick is None else {
            "nimg": last_tick.get("nimg"), "time": last_tick.get("time"),
            "age_s": now - last_tick["time"] if _finite(last_tick.get("time")) else None,
            **{k: last_tick.get(k) for k in ("loss_G", "loss_D", "gp", "img_per_s")}},
    }


def _eta(view: RunView, all_stages: list[Any], ends: list[dict[str, Any]], nimg: int, total: int,
         rates: dict[int, float]) -> dict[str, Any]:
    """The ETA: none once completed; a stopped or failed run gets the time it would take if resumed."""
    st = view.state
    if st.state == "completed" or (total and nimg >= total and len(ends) >= len(all_stages) > 0):
        eta: dict[str, Any] = {"eta_s": 0.0, "train_s": 0.0, "overhead_s": 0.0, "estimated_resolutions": []}
    elif all_stages:
        evaluated = {r["stage_index"] for r in ends if isinstance(r.get("stage_index"), int)}
        eta = estimate_eta(all_stages, nimg, rates, view.config.model, stage_overhead_s(ends), evaluated)
    else:
        eta = {"eta_s": None, "why": view.config_problem or "no schedule"}
    eta["if_resumed"] = st.state in ("failed", "stopped")
    return eta


def _checkpoint(view: RunView, now: float) -> dict[str, Any] | None:
    """The newest committed checkpoint (None when there is none yet)."""
    if not view.checkpoints:
        return None
    meta = view.checkpoint_meta
    written = meta.get("written_at")
    return {"nimg": view.checkpoints[-1], "kimg": view.checkpoints[-1] / 1000, "count": len(view.checkpoints),
            "stage": meta.get("stage"), "size": meta.get("size"),
            "written_at": written, "age_s": now - written if _finite(written) else None,
            "url": join(view.run_url, "checkpoints", f"ckpt-{view.checkpoints[-1]:012d}")}


def _failures(view: RunView, ticks: list[dict[str, Any]]) -> dict[str, Any]:
    """Failures recovered from (worker restarts, non-finite steps, preemptions, checkpoint retries), the driver's
    lives."""
    st = view.state
    nonfinite = max([int(st.nonfinite_steps or 0)] + [int(t["nonfinite_total"]) for t in ticks
                                                      if _finite(t.get("nonfinite_total"))])
    return {
        "worker_restarts": int(st.worker_restarts or 0),
        "nonfinite_steps": nonfinite,
        "preemptions": _extra(view, "preemptions"),
        "checkpoint_retries": max([0] + [int(t["checkpoint_retries"]) for t in ticks
                                         if _finite(t.get("checkpoint_retries"))]),
        "lives": [{k: life.get(k) for k in ("id", "host", "pid", "started")} for life in st.lives],
        "driver_lives": len(st.lives),
    }


def _extra(view: RunView, key: str) -> Any:
    """A run_state.json field RunState may not model (None when absent)."""
    return view.raw_state.get(key)


def _stage_row(s: Any, nimg: int, ends: list[dict[str, Any]], rates: dict[int, float]) -> dict[str, Any]:
    end = next((r for r in reversed(ends) if r.get("stage_index") == s.index), None)
    status = "done" if end is not None and nimg >= s.end else "current" if s.start <= nimg < s.end else (
        "trained" if nimg >= s.end else "todo")
    row = {"index": s.index, "name": s.name, "resolution": s.resolution, "kind": s.kind,
           "start_kimg": s.start / 1000, "end_kimg": s.end / 1000, "minibatch": s.minibatch, "status": status,
           "img_per_s": rates.get(s.resolution)}
    if end is not None:
        row["swd_avg"] = (end.get("swd") or {}).get("avg")
        if isinstance(end.get("seconds"), dict):
            row["seconds"] = end["seconds"]
    return row


def swd_summary(ends: list[dict[str, Any]], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """SWD x1e3 so far: one row per evaluated stage end, the newest real-vs-real floor, the untrained baseline."""
    rows = [{"stage": r.get("stage"), "resolution": r.get("resolution"), "kimg": r.get("kimg"),
             "swd_x1e3": dict(r["swd"].get("swd_x1e3", {})), "avg": r["swd"].get("avg")}
            for r in ends if isinstance(r.get("swd"), dict)]
    floor_rec = next((r for r in reversed(ends) if isinstance(r.get("swd_floor"), dict)), None)
    floor = None if floor_rec is None else {"resolution": floor_rec.get("resolution"),
                                            "swd_x1e3": dict(floor_rec["swd_floor"].get("swd_x1e3", {})),
                                            "avg": floor_rec["swd_floor"].get("avg")}
    base = None
    if baseline is not None and isinstance(baseline.get("swd"), dict):
        base = {"resolution": baseline.get("resolution"), "swd_x1e3": dict(baseline["swd"].get("swd_x1e3", {})),
                "avg": baseline["swd"].get("avg")}
    levels = sorted({int(k) for r in rows + [x for x in (floor, base) if x] for k in r["swd_x1e3"]}, reverse=True)
    return {"levels": levels, "rows": rows, "floor": floor, "baseline": base}


# ---- text ---------------------------------------------------------------------------------------

def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _num(x: Any, spec: str) -> str:
    return format(x, spec) if _finite(x) else "-"


def swd_table_text(swd: dict[str, Any], kd: int = 1) -> list[str]:
    if not swd["rows"] and not swd["baseline"]:
        return ["SWD: none measured yet"]
    levels = swd["levels"]
    head = f"{'stage':<16}{'res':>5}{'kimg':>8}" + "".join(f"{lv:>8}" for lv in levels) + f"{'avg':>8}"
    lines = ["SWD x1e3 (lower is better; G_ema vs reals)", head]

    def row(name: str, res: Any, kimg: Any, vals: dict[str, Any], avg: Any) -> str:
        cells = "".join(f"{_num(vals.get(str(lv)), '8.2f')}" if str(lv) in vals else f"{'':>8}" for lv in levels)
        return f"{name:<16}{res if res is not None else '':>5}{_num(kimg, f'8.{kd}f') if kimg is not None else '':>8}" \
               f"{cells}{_num(avg, '8.2f')}"

    for r in swd["rows"]:
        lines.append(row(r["stage"] or "?", r["resolution"], r["kimg"], r["swd_x1e3"], r["avg"]))
    if swd["floor"]:
        f = swd["floor"]
        lines.append(row("real vs real", f["resolution"], None, f["swd_x1e3"], f["avg"]))
    if swd["baseline"]:
        b = swd["baseline"]
        lines.append(row("untrained G", b["resolution"], None, b["swd_x1e3"], b["avg"]))
    return lines


def format_status(s: dict[str, Any]) -> str:
    """The human-readable status (what `status` prints)."""
    kd = 1 if (s["total_kimg"] or 0) >= 10 else 3  # kimg decimals: tiny test runs have stages of 0.1 kimg
    lines = [f"run        {s['run_name']}  ({s['run_url']})", f"state      {_state_text(s)}"]
    if s["message"]:
        lines.append(f"message    {s['message']}")
    lines += _phase_lines(s["stage"], kd)
    pct = f" ({100 * s['progress']:.1f}%)" if s["progress"] is not None else ""
    lines.append(f"progress   {s['kimg']:.{kd}f} / {s['total_kimg']:.{kd}f} kimg{pct}")
    lines += _speed_lines(s)
    lines.append(f"ETA        {_eta_text(s)}")
    lt = s["last_tick"]
    if lt:
        lines.append(f"losses     G {_num(lt.get('loss_G'), '+.4f')}  D {_num(lt.get('loss_D'), '+.4f')}  "
                     f"gp {_num(lt.get('gp'), '.4f')}  (last tick, at {(lt.get('nimg') or 0) / 1000:.{kd}f} kimg)")
    ck = s["checkpoint"]
    if ck:
        age = f", {fmt_duration(ck['age_s'])} ago" if ck.get("age_s") is not None else ""
        lines.append(f"checkpoint ckpt-{ck['nimg']:012d} at {ck['kimg']:.{kd}f} kimg{age} ({ck['count']} kept)")
    else:
        lines.append("checkpoint none yet")
    lines.append(f"failures   {_failures_text(s)}")
    if s.get("config_problem"):
        lines.append(f"note       {s['config_problem']}")
    lines.append("")
    lines += swd_table_text(s["swd"], kd)
    return "\n".join(lines)


def _state_text(s: dict[str, Any]) -> str:
    """The state, with the current driver life (its number, host and start) where the run records one."""
    state = s["state"]
    if s["lives"]:
        life = s["lives"][-1]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(life["started"])) \
            if _finite(life.get("started")) else "?"
        state += f"  (driver life {len(s['lives'])}, host {life.get('host')}, started {started})"
    return state


def _phase_lines(st: dict[str, Any] | None, kd: int) -> list[str]:
    """The phase line: stage n/N, resolution, fade-in or stable, alpha and progress (just the name without a
    schedule; nothing without a stage)."""
    if st and st.get("count"):
        phase = (f"stage {st['index'] + 1}/{st['count']} {st['name']}: {st['resolution']}x{st['resolution']} "
                 f"{'fade-in' if st['kind'] == 'fade' else 'stable'}, alpha {st['alpha']:.3f}, "
                 f"{100 * st['progress']:.0f}% of {st['start_kimg']:.{kd}f}..{st['end_kimg']:.{kd}f} kimg")
        return [f"phase      {phase}"]
    if st:
        return [f"phase      {st['name']}"]
    return []


def _speed_lines(s: dict[str, Any]) -> list[str]:
    """img/s over the last ticks (and the last tick's age), then img/s per resolution."""
    if s["img_per_s"] is None:
        return ["speed      no ticks recorded yet"]
    speed = f"{s['img_per_s']:.1f} img/s over the last {s['img_per_s_ticks']} ticks"
    lt = s["last_tick"]
    if lt and lt.get("age_s") is not None:
        speed += f" (last tick {fmt_duration(lt['age_s'])} ago)"
    by = ", ".join(f"{r}x{r} {v:.0f}" for r, v in ((int(k), v) for k, v in s["img_per_s_by_resolution"].items()))
    return [f"speed      {speed}", f"img/s      by resolution: {by}"]


def _eta_text(s: dict[str, Any]) -> str:
    """The ETA: done, the time left (training + stage ends, which resolutions are estimated), or why unknown."""
    eta = s["eta"]
    if s["state"] == "completed":
        return "done"
    if eta.get("eta_s") is None:
        return f"unknown ({eta.get('why', '')})"
    text = f"{fmt_duration(eta['eta_s'])} (training {fmt_duration(eta['train_s'])}"
    if eta.get("overhead_s"):
        text += f" + stage ends {fmt_duration(eta['overhead_s'])}"
    text += ")"
    if eta.get("estimated_resolutions"):
        ests = ", ".join(f"{r}x{r}" for r in eta["estimated_resolutions"])
        text += f"; {ests} estimated from {eta['estimated_from']}x{eta['estimated_from']} by network cost"
    if eta.get("if_resumed"):
        text += f"; if resumed (the run is {s['state']})"
    return text


def _failures_text(s: dict[str, Any]) -> str:
    """Worker restarts, non-finite steps, preemptions and checkpoint retries where recorded, driver lives."""
    fail = f"worker restarts {s['worker_restarts']}, non-finite steps {s['nonfinite_steps']}"
    if s.get("preemptions") is not None:
        fail += f", preemptions {s['preemptions']}"
    if s.get("checkpoint_retries"):
        fail += f", checkpoint retries {s['checkpoint_retries']}"
    return fail + f", driver lives {s['driver_lives']}"


# ---- the command --------------------------------------------------------------------------------

def resolve_run(args: argparse.Namespace) -> tuple[Storage, str]:
    """(storage, run URL) from `RUN_URL` or from --config/--preset/--set naming the run (storage.url/run.name).

    Reads use a short retry budget: a status should answer in seconds, not wait out a training's 120 s."""
    named = args.config or args.preset or args.sets
    if named:
        from .config import load_config

        cfg = load_config(args.config, args.preset, args.sets)
        storage = Storage.from_config(cfg.storage)
        url = args.source or join(normalize(cfg.storage.url), cfg.run.name)
    elif args.source:
        storage, url = Storage(), args.source
    else:
        raise UserError(f"{args.command}: name a run: RUN_URL, or --config/--set giving storage.url and run.name")
    endpoint = args.endpoint_url or storage.endpoint_url
    return Storage(endpoint_url=endpoint, options=storage.options, retry_attempts=3, retry_max_wait_s=15.0), url


def cli_status(args: argparse.Namespace) -> int:
    """`launch.py status RUN_URL [--json] [--watch [--every SECONDS]]`."""
    storage, url = resolve_run(args)
    if not args.watch:
        s = gather(storage, url)
        print(json.dumps(s, indent=2, sort_keys=True) if args.json else format_status(s))
        return 0
    tty = sys.stdout.isatty() and not args.json
    try:
        while True:
            s = gather(storage, url)
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # home + clear: refresh in place
            print(json.dumps(s, sort_keys=True) if args.json else format_status(s), flush=True)
            if s["state"] in TERMINAL:
                return 0
            time.sleep(max(args.every, 0.0))
    except KeyboardInterrupt:
        return 0
