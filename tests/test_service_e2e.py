"""End to end on real components: `ray job submit` to a local Ray cluster, 2 workers, run directory on moto's S3.

One tiny run 4x4 -> 16x16 (five stages), then the same command again (already complete: trains nothing),
then a larger total (resumes from the final checkpoint at the exact image count).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from tiny import tiny_config

pytestmark = pytest.mark.integration

TINY = tiny_config({"run": {"name": "e2e"}})


def _submit(cluster: dict, cfg_file: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(ROOT),
           "--", "python", "service/launch.py", "--config", str(cfg_file), *extra]
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False)


def test_ray_job_submit_trains_every_stage_on_s3_then_is_complete_then_resumes_a_larger_total(
        ray_cluster, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    cfg = tiny_config(TINY)
    cfg["storage"] = {"url": f"s3://{bucket}/runs", "endpoint_url": endpoint}
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = f"{bucket}/runs/e2e"
    fs = _fs(endpoint)

    # ---- 1. a whole run --------------------------------------------------------------------------
    out = _submit(ray_cluster, cfg_file)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "] res    4 alpha" in log              # the workers' progress lines reach the job's log ...
    assert "Reporting training result" not in log  # ... without Ray Train's INFO line per report
    state = json.loads(fs.cat_file(f"{run}/run_state.json"))
    assert state["state"] == "completed"
    stage_names = ["00-4-stable", "01-8-fade", "02-8-stable", "03-16-fade", "04-16-stable"]
    trained = [h["stage"] for h in state["history"] if h["state"] == "training"]
    evaluated = [h["stage"] for h in state["history"] if h["state"] == "evaluating"]
    assert trained == stage_names and evaluated == stage_names
    total = state["total_nimg"]
    assert state["nimg"] == total == 5 * 128
    ckpts = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints"))
    assert ckpts == [f"ckpt-{total - 64:012d}", f"ckpt-{total:012d}"]  # keep=2, every 64 images
    for c in ckpts:
        assert fs.exists(f"{run}/checkpoints/{c}/meta.json") and fs.exists(f"{run}/checkpoints/{c}/state.pt")
    grids = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/samples"))
    assert grids == [f"{s}.png" for s in stage_names]
    assert fs.cat_file(f"{run}/samples/04-16-stable.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert fs.exists(f"{run}/final/generator.pt")
    parts = sorted(fs.ls(f"{run}/history", detail=False))
    records = [json.loads(x) for p in parts for x in fs.cat_file(p).decode().splitlines()]
    ends = [r for r in records if r["event"] == "stage_end"]
    assert [r["stage"] for r in ends] == stage_names
    assert all("swd" in r for r in ends if r["resolution"] >= 8)
    ticks = [r for r in records if r["event"] == "tick"]
    assert ticks and ticks[-1]["nimg"] == total
    assert "[04-16-stable] res   16" in log  # per-tick progress lines from rank 0

    # ---- 2. the same command again: complete, trains nothing --------------------------------------
    out = _submit(ray_cluster, cfg_file)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "already complete" in out.stdout + out.stderr
    again = json.loads(fs.cat_file(f"{run}/run_state.json"))
    assert [h["stage"] for h in again["history"] if h["state"] == "training"] == stage_names
    assert len(again["lives"]) == 2

    # ---- 3. a larger total resumes from the final checkpoint at the exact image count -------------
    out = _submit(ray_cluster, cfg_file, "--set", "schedule.total_kimg=0.768")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    more = json.loads(fs.cat_file(f"{run}/run_state.json"))
    assert more["state"] == "completed" and more["nimg"] == 768
    third_life = more["lives"][-1]["id"]
    trained3 = [h for h in more["history"] if h["state"] == "training" and h["life"] == third_life]
    assert [h["stage"] for h in trained3] == ["04-16-stable"]
    assert trained3[0]["nimg"] == total  # resumed where the first run ended, not from scratch
    assert f"resuming at {total / 1000:.1f} kimg" in log
    assert f"ckpt-{768:012d}" in [p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoints")]


def test_ctrl_c_on_a_local_run_marks_it_stopped_and_leaves_no_ray_process(tmp_path):
    """`python service/launch.py` with Ray started in-process, Ctrl-C (SIGINT to the terminal's process group)
    mid-stage: exit 130, run_state "stopped" with the resume hint, and the local Ray processes gone."""
    import os
    import signal
    import time

    cfg = tiny_config(TINY)
    cfg["run"]["name"] = "ctrl-c"
    cfg["storage"] = {"url": str(tmp_path / "runs")}
    cfg["schedule"]["stable_kimg_dict"] = {4: 50}          # long enough to be interrupted mid-stage
    cfg["cluster"].update(num_workers=1, cpus_per_worker=1)
    cfg["metrics"].update(swd_images=0, tick_kimg=0.032)
    cfg_file = tmp_path / "ctrl-c.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "service/launch.py", "--config", str(cfg_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        for line in proc.stdout:  # until the first progress line: the stage is training
            lines.append(line)
            if "[00-4-stable] res    4" in line or time.monotonic() > deadline:
                break
        assert any("[00-4-stable] res    4" in x for x in lines), "".join(lines)[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines) + rest
    assert proc.returncode == 130, log[-3000:]
    assert "stopped; start the same command again to resume" in log
    state = json.loads((tmp_path / "runs" / "ctrl-c" / "run_state.json").read_text())
    assert state["state"] == "stopped" and state["stage"] == "00-4-stable"
    deadline = time.monotonic() + 30  # Ray's own processes (same session) end with the driver
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("processes of the interrupted run's session are still alive")
