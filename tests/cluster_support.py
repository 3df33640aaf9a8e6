"""Helpers for the tests on the KubeRay-shaped local cluster (tests/test_cluster_shape.py, tests/test_chaos.py):
tiny run configs, where Ray placed the run's actors, what a run recorded, and the measured figures per drill."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from drill_support import Driver, RunDir, alive_actors, submit_cmd
from tiny import tiny_config

FIGURES_DIR = Path("/tmp/drills")

# The tiny run (tests/tiny.py) to 8x8: 4x4 stable, 8x8 fade-in, 8x8 stable; stage lengths are set per test.
SHAPE: dict[str, Any] = {
    "model": {"max_resolution": 8},
    "schedule": {"fade_kimg": 0.256, "stable_kimg": 0.512},
    "cluster": {"max_failures": 2, "start_timeout_s": 90},
    "checkpoint": {"every_kimg": 0.256, "keep": 3},
    "metrics": {"tick_kimg": 0.128, "tick_kimg_dict": {}, "host": "127.0.0.1", "grid_size": 2, "linger_s": 0},
}


def tiny(name: str, endpoint: str, bucket: str, **over: Any) -> dict[str, Any]:
    storage = {"url": f"s3://{bucket}/runs", "endpoint_url": endpoint}
    return tiny_config(SHAPE, {"run": {"name": name}, "storage": storage}, over)


def write_cfg(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    f = tmp_path / f"{cfg['run']['name']}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def schedule_total(cfg: dict[str, Any]) -> int:
    from pggan.config import validate
    from pggan.schedule import total_nimg

    return total_nimg(validate(cfg))


def actor_nodes(dashboard: str, class_name: str) -> dict[str, str]:
    """actor id -> node id of the live actors of a class (state API)."""
    return {a.actor_id: a.node_id for a in alive_actors(dashboard, class_name=class_name)
            if a.state == "ALIVE" and a.node_id}


def records(run: RunDir, event: str) -> list[dict[str, Any]]:
    return [r for r in run.metrics() if r.get("event") == event]


def assert_every_checkpoint_loads(run: RunDir) -> list[int]:
    """Every committed checkpoint in storage verifies and loads (weights only); returns their image counts."""
    from pggan.checkpoint.store import load_checkpoint_at

    storage, url = run.storage(), run.url
    done = run.committed()
    for n in done:
        ck = load_checkpoint_at(storage, url, n)
        assert ck.nimg == n and "trainer" in ck.state, n
    return done


def record_figures(drill: str, **values: Any) -> None:
    """Measured figures (never asserted) appended to /tmp/drills/history.jsonl and printed."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    row = {"drill": drill, "time": time.time(), **values}
    with open(FIGURES_DIR / "history.jsonl", "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
    print(f"[drill figures] {drill}: {json.dumps(values, sort_keys=True, default=str)}")


def recoveries(ticks: list[dict[str, Any]], kills: list[float]) -> list[dict[str, Any]]:
    """Per kill time: the first worker group started after it (its first training step: recovery time) and the
    images trained twice: at least the last tick before the kill minus where the next group started (ticks are
    what the history keeps), and an estimate adding the steps since that tick at its rate."""
    out = []
    for t in kills:
        before = [x for x in ticks if x["time"] <= t]
        after = [x for x in ticks if x.get("group_start_time", 0) > t]
        if not after:
            out.append({"kill": t, "recovered": False})
            continue
        nxt = min(after, key=lambda x: x["time"])
        last = max(before, key=lambda x: x["time"], default={"nimg": 0, "time": t, "img_per_s": 0.0})
        reached = last["nimg"]
        # Steps after the last tick are not in the history: estimated from that tick's rate (at most one tick).
        est = reached + min(last.get("img_per_s", 0.0) * max(t - last["time"], 0.0), ticks_gap(ticks))
        first_step = nxt.get("group_first_step_time") or nxt["time"]
        out.append({"kill": t, "recovered": True, "recovery_s": round(first_step - t, 2),
                    "resumed_at": nxt["group_start_nimg"], "last_tick_before": reached,
                    "images_trained_twice": max(reached - nxt["group_start_nimg"], 0),
                    "images_trained_twice_est": max(round(est) - nxt["group_start_nimg"], 0)})
    return out


def ticks_gap(ticks: list[dict[str, Any]]) -> int:
    """The smallest step between consecutive tick image counts (the tick length)."""
    gaps = [b["nimg"] - a["nimg"] for a, b in zip(ticks, ticks[1:]) if b["nimg"] > a["nimg"]]
    return min(gaps, default=0)


@pytest.fixture
def jobs(kuberay_cluster, tmp_path, request):
    """Starts `ray job submit` processes on the KubeRay-shaped cluster; kills any still running at the end (only
    those started here) and keeps each job's log under /tmp/drills/logs/<test>/."""
    started: list[Driver] = []

    def start(cfg_file: Any, label: str = "job") -> Driver:
        d = Driver(submit_cmd(kuberay_cluster.dashboard, cfg_file), kuberay_cluster.env,
                   tmp_path / f"{label}-{len(started)}.log")
        started.append(d)
        return d

    yield start
    logs = FIGURES_DIR / "logs" / request.node.name[:80]
    logs.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(started):
        if d.alive():
            d.kill_group()
        (logs / f"job-{i}.log").write_text(" ".join(d.cmd) + "\n" + d.text(with_time=True))
