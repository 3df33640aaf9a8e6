"""Reliability and security drills on real components (issue 7): a local Ray cluster (`ray start`), moto's S3
server, real signals and real sockets. Nothing is mocked.

Each drill is a test; all share one Ray cluster (the session fixture) and run one tiny single-stage (or
two-stage) run each, on its own bucket. Timings (recovery after a kill, images trained twice, outage lengths) are
measured and written to /tmp/drills/figures-<time>.json, never asserted.

    .venv/bin/python -m pytest -q tests/test_drills.py
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import FAKE_SECRET, free_port
from drill_support import (Driver, MetricsPoller, RunDir, TcpProxy, alive_actors, driver_cmd, job_id_of,
                           last_logged_nimg, live_placement_groups, s3fs_for, submit_cmd, train_worker_pids,
                           wait_until)
from tiny import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIGURES_DIR = Path("/tmp/drills")

# A tiny network and one 4x4 stage of 4096 images: 300-600 images/s on two CPU workers, so a stage trains for
# 7-15 s, long enough to kill something in the middle of it.
TINY: dict[str, Any] = tiny_config({
    "run": {"name": "drill"},
    "model": {"max_resolution": 4},
    "schedule": {"fade_kimg": 0.512, "stable_kimg": 4.096},
    "cluster": {"start_timeout_s": 90},
    "checkpoint": {"every_kimg": 0.512, "keep": 3},
    "metrics": {"tick_kimg": 0.128, "tick_kimg_dict": {}, "swd_images": 0, "host": "127.0.0.1", "grid_size": 2},
})
CKPT = 512  # checkpoint.every_kimg in images
TICK = 128  # metrics.tick_kimg in images
RUN_TIMEOUT = 420  # generous bound on one driver life on a loaded 2-core machine


def tiny(name: str, endpoint: str, bucket: str, **over: Any) -> dict[str, Any]:
    return tiny_config(TINY, {"run": {"name": name}, "storage": {"url": f"s3://{bucket}/runs", "endpoint_url": endpoint}},
                       over)


def schedule_total(cfg: dict[str, Any]) -> int:
    from pggan.config import validate
    from pggan.schedule import total_nimg

    return total_nimg(validate(cfg))


def no_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" not in text


def own_lines(text: str) -> str:
    """The driver's own output: without the worker and actor logs Ray forwards ("(RayTrainWorker pid=..) ...")."""
    return "\n".join(x for x in text.splitlines() if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", x))


# ---- module fixtures: figures, evidence for the secrets drill, cleanup of what the drills started -----------

@pytest.fixture(scope="module")
def figures():
    """Measured figures of this run of the drill file, written to /tmp/drills/ at the end."""
    figs: dict[str, Any] = {"started": time.time(), "drills": {}}
    yield figs
    figs["finished"] = time.time()
    figs["wall_s"] = round(figs["finished"] - figs["started"], 1)
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (FIGURES_DIR / f"figures-{stamp}.json").write_text(json.dumps(figs, indent=2, sort_keys=True))
    with open(FIGURES_DIR / "history.jsonl", "a") as f:
        f.write(json.dumps(figs, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def evidence():
    """Text the drills saw (driver and job output, /metrics scrapes) for the secrets drill to grep."""
    return {"texts": [], "submitted_jobs": 0}


@pytest.fixture
def lives(ray_cluster, tmp_path, evidence, request):
    """Starts driver lives; kills any still running at the end of the test (only those started here).
    Every life's output, with a timestamp per line, is kept under /tmp/drills/logs/<test>/."""
    started: list[Driver] = []

    def start(cmd: list[str], env: dict[str, str] | None = None, label: str = "life") -> Driver:
        d = Driver(cmd, env or ray_cluster["env"], tmp_path / f"{label}-{len(started)}.log")
        started.append(d)
        return d

    yield start
    logs = FIGURES_DIR / "logs" / request.node.name[:80]
    logs.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(started):
        if d.alive():
            d.kill_group()
        evidence["texts"].append((f"driver output {d.cmd[-4:]}", d.text()))
        (logs / f"{i}-{d.log_path.stem}.log").write_text(" ".join(d.cmd) + "\n" + d.text(with_time=True))


def record(figures: dict[str, Any], drill: str, **values: Any) -> None:
    figures["drills"].setdefault(drill, {}).update(values)
    print(f"[drill figures] {drill}: {json.dumps(values, sort_keys=True, default=str)}")


def write_cfg(tmp_path: Path, cfg: dict[str, Any], name: str = "drill.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(cfg))
    return f


def wait_mid_stage(run: RunDir, poller: MetricsPoller | None, life: Driver, after_ckpts: int = 1,
                   extra: int = 192, timeout: float = 240) -> int:
    """Wait until `after_ckpts` checkpoints are committed and (with a poller) training went `extra` images past
    the newest; returns the image count seen last (0 without a poller)."""
    wait_until(lambda: len(run.committed()) >= after_ckpts, timeout, f"{after_ckpts} committed checkpoint(s)",
               interval=0.5, alive=life.alive)
    if poller is None:
        return 0
    target = run.committed()[-1] + extra
    return int(wait_until(lambda: (v := poller.value("pggan_images_seen", run.name)) is not None
                          and v >= target and v, timeout, f"{target} images seen", alive=life.alive))


def first_tick_after(ticks: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """The first tick of a worker group started after time t (ticks carry group_start_time)."""
    later = [x for x in ticks if x.get("group_start_time", 0) > t]
    return min(later, key=lambda x: x["time"]) if later else None


def all_tensors_finite(obj: Any) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, dict):
        return all(all_tensors_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_tensors_finite(v) for v in obj)
    if isinstance(obj, float):
        return obj == obj and obj not in (float("inf"), float("-inf"))
    return True


# ================================================================================================================
# Drill 7: misconfiguration fails fast and clearly, before any training
# ================================================================================================================

def test_a_missing_bucket_fails_fast_with_one_clear_line_before_any_cluster_work(
        ray_cluster, s3_server, tmp_path, lives, figures):
    cfg = tiny("nobucket", s3_server, "drill-no-such-bucket")
    t0 = time.time()
    life = lives(driver_cmd(write_cfg(tmp_path, cfg), ray_cluster["address"]))
    rc = life.wait(timeout=120)
    out = life.text()
    assert rc == 2, out[-3000:]
    assert "error: storage s3://drill-no-such-bucket/runs/nobucket: the bucket does not exist" in life.text("err")
    assert no_traceback(out) and "Connected to Ray cluster" not in out, out[-3000:]
    record(figures, "7-misconfig", missing_bucket_s=round(time.time() - t0, 1), missing_bucket_message=out.strip())


def test_b_absent_credentials_fail_fast_with_one_clear_line(ray_cluster, s3_bucket, tmp_path, lives, figures):
    endpoint, bucket = s3_bucket
    env = {k: v for k, v in ray_cluster["env"].items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    t0 = time.time()
    life = lives(driver_cmd(write_cfg(tmp_path, tiny("nocreds", endpoint, bucket)), ray_cluster["address"]), env=env)
    rc = life.wait(timeout=120)
    out = life.text()
    assert rc == 2, out[-3000:]
    assert "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in life.text("err"), out[-3000:]
    assert no_traceback(out) and "Connected to Ray cluster" not in out
    assert s3fs_for(endpoint).find(bucket) == []  # nothing written
    record(figures, "7-misconfig", absent_credentials_s=round(time.time() - t0, 1),
           absent_credentials_message=out.strip())


def test_c_wrong_credentials_fail_fast_with_one_clear_line(ray_cluster, tmp_path, lives, figures):
    """moto checks signatures once INITIAL_NO_AUTH_ACTION_COUNT unauthenticated actions are used up: its own
    server process here, so the shared S3 server stays open for the other drills."""
    import boto3

    port = free_port()
    moto_bin = Path(sys.executable).with_name("moto_server")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"}
    proc = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        wait_until(lambda: _try(lambda: s3.create_bucket(Bucket="drill-auth")), 30, "moto auth server")
        wrong = {**ray_cluster["env"], "AWS_ACCESS_KEY_ID": "AKIAPGGANWRONGKEY000",
                 "AWS_SECRET_ACCESS_KEY": "wrong-secret-for-the-drill"}
        t0 = time.time()
        life = lives(driver_cmd(write_cfg(tmp_path, tiny("wrongcreds", endpoint, "drill-auth")),
                                ray_cluster["address"]), env=wrong)
        rc = life.wait(timeout=120)
        out = life.text()
        assert rc == 2, out[-3000:]
        assert "access denied; check the credentials in the environment" in life.text("err"), out[-3000:]
        assert no_traceback(out) and "Connected to Ray cluster" not in out
        assert "wrong-secret-for-the-drill" not in out
        record(figures, "7-misconfig", wrong_credentials_s=round(time.time() - t0, 1),
               wrong_credentials_message=out.strip())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _try(fn: Any) -> bool:
    try:
        fn()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def test_d_more_workers_than_the_cluster_has_fail_after_a_bounded_wait(ray_cluster, s3_bucket, tmp_path, lives,
                                                                       figures):
    endpoint, bucket = s3_bucket
    cfg = tiny("toomany", endpoint, bucket, cluster={"num_workers": 4, "cpus_per_worker": 1, "start_timeout_s": 10})
    run = RunDir(endpoint, bucket, "toomany")
    t0 = time.time()
    life = lives(driver_cmd(write_cfg(tmp_path, cfg), ray_cluster["address"]))
    rc = life.wait(timeout=240)  # bounded: start_timeout_s 15 plus startup, never an endless retry
    elapsed = time.time() - t0
    out, err = life.text(), life.text("err")
    assert rc == 1, out[-3000:]
    assert "cluster.start_timeout_s" in err and "fewer workers" in err, err[-3000:]
    assert no_traceback(own_lines(out)), own_lines(out)[-3000:]
    state = run.run_state()
    assert state["state"] == "failed" and "cluster.start_timeout_s" in state["message"]
    assert run.committed() == [] and "res    4" not in out  # no training step ran
    wait_until(lambda: not live_placement_groups(ray_cluster["dashboard"]), 60, "its placement group removed")
    record(figures, "7-misconfig", too_many_workers_s=round(elapsed, 1),
           too_many_workers_message=[x for x in err.splitlines() if x.startswith("error:")])


# ================================================================================================================
# Drill 1: a training worker SIGKILLed mid-stage
# ================================================================================================================

def test_worker_sigkill_mid_stage_resumes_from_its_checkpoint_and_counts_images_and_restarts_exactly(
        ray_cluster, s3_bucket, tmp_path, lives, figures, evidence):
    endpoint, bucket = s3_bucket
    port = free_port()
    cfg = tiny("wkill", endpoint, bucket, metrics={"port": port})
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, "wkill")
    life = lives(driver_cmd(write_cfg(tmp_path, cfg), ray_cluster["address"]))
    poller = MetricsPoller(port)
    try:
        nimg_seen = wait_mid_stage(run, poller, life)
        pids = train_worker_pids(ray_cluster["dashboard"])
        assert len(pids) == 2, pids
        ckpt_at_kill = run.committed()[-1]
        nimg_at_kill = int(poller.value("pggan_images_seen", "wkill"))
        t_kill = time.time()
        os.kill(pids[0], signal.SIGKILL)
        # The driver-side exporter counts the restart while the run is alive.
        wait_until(lambda: (poller.value("pggan_worker_restarts_total", "wkill") or 0) >= 1, 180,
                   "pggan_worker_restarts_total >= 1", alive=life.alive)
        rc = life.wait(timeout=RUN_TIMEOUT)
    finally:
        poller.stop()
    out = life.text()
    assert rc == 0, out[-5000:]
    state = run.run_state()
    assert state["state"] == "completed"
    assert state["nimg"] == state["total_nimg"] == total  # exactly the schedule's images, not one more or less
    assert state["worker_restarts"] == 1
    assert poller.value("pggan_worker_restarts_total", "wkill") == 1
    # Resumed from a committed checkpoint at least as new as the newest one at the kill.
    resumed = [(t, int(m.group(1))) for t, m in life.find(r"resuming at .* from ckpt-(\d{12})", after=t_kill)]
    assert resumed, out[-5000:]
    assert ckpt_at_kill <= resumed[0][1] <= nimg_at_kill + 2 * CKPT
    ticks = [r for r in run.metrics() if r.get("event") == "tick"]
    assert ticks[-1]["nimg"] == total
    first = first_tick_after(ticks, t_kill)
    assert first is not None and first["group_start_nimg"] == resumed[0][1]
    # The killed group's last reported tick (Ray may have lost a report or two: a lower bound).
    reached = max(r["nimg"] for r in ticks if r["group_start_time"] < t_kill)
    evidence["texts"].extend((f"metrics wkill {t:.0f}", text) for t, text in poller.scrapes)
    record(figures, "1-worker-sigkill", passed=True, killed_pid=pids[0], nimg_seen_at_kill=nimg_at_kill,
           newest_checkpoint_at_kill=ckpt_at_kill, resumed_from=resumed[0][1], killed_group_reached=reached,
           images_trained_twice=reached - resumed[0][1],
           recovery_s=round(first["group_start_time"] - t_kill, 2),
           kill_to_resume_log_s=round(resumed[0][0] - t_kill, 2), total_nimg=total, poll_nimg=nimg_seen)


# ================================================================================================================
# Drill 2: the driver SIGKILLed mid-stage, then the same command again
# ================================================================================================================

def test_driver_sigkill_mid_stage_then_the_same_command_resumes_from_s3_and_completes(
        ray_cluster, s3_bucket, tmp_path, lives, figures, evidence):
    endpoint, bucket = s3_bucket
    port = free_port()
    cfg = tiny("dkill", endpoint, bucket, metrics={"port": port})
    cfg_file = write_cfg(tmp_path, cfg)
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, "dkill")
    cmd = driver_cmd(cfg_file, ray_cluster["address"])
    life1 = lives(cmd, label="life1")
    poller = MetricsPoller(port)
    try:
        wait_mid_stage(run, poller, life1)
        pid = run.run_state()["lives"][-1]["pid"]
        assert pid == life1.pid
        job1 = job_id_of(ray_cluster["dashboard"], driver_pid=pid)
        assert job1
        nimg_at_kill = int(poller.value("pggan_images_seen", "dkill"))
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        assert life1.wait(timeout=30) == -signal.SIGKILL
    finally:
        poller.stop()
    life2 = lives(cmd, label="life2")  # at once, as a user or a supervisor would
    # Ray reaps the dead driver's controller and workers; until then rank 0 may still commit a checkpoint.
    wait_until(lambda: not alive_actors(ray_cluster["dashboard"], job1, "RayTrainWorker"), 60,
               "the killed driver's workers gone")
    workers_gone_s = time.time() - t_kill
    ckpt_at_restart = run.committed()[-1]
    rc = life2.wait(timeout=RUN_TIMEOUT)
    out = life2.text()
    assert rc == 0, out[-5000:]
    state = run.run_state()
    assert state["state"] == "completed" and state["nimg"] == state["total_nimg"] == total
    assert [x["pid"] for x in state["lives"]] == [life1.pid, life2.pid]
    first_life, second_life = (x["id"] for x in state["lives"])
    assert any(h["life"] == first_life and h["state"] == "training" for h in state["history"])
    assert any(h["life"] == second_life and "driver restarted" in h["note"] for h in state["history"])
    assert f"resuming at {ckpt_at_restart / 1000:.1f} kimg" in out
    resumed = [int(m.group(1)) for _, m in life2.find(r"resuming at .* from ckpt-(\d{12})")]
    assert resumed and resumed[0] == ckpt_at_restart
    ticks = [r for r in run.metrics() if r.get("event") == "tick"]
    first = first_tick_after(ticks, t_kill)
    assert first is not None and first["group_start_nimg"] == ckpt_at_restart and ticks[-1]["nimg"] == total
    # Where the killed life's workers got to, from their own logs (its tick records died with the driver).
    reached = last_logged_nimg(ray_cluster["temp"], job1, TICK) or nimg_at_kill
    record(figures, "2-driver-sigkill", passed=True, nimg_seen_at_kill=nimg_at_kill, resumed_from=ckpt_at_restart,
           killed_life_reached=reached, images_trained_twice=max(reached, ckpt_at_restart) - ckpt_at_restart,
           old_workers_gone_s=round(workers_gone_s, 1),
           recovery_s=round(first["group_start_time"] - t_kill, 2), total_nimg=total)


# ================================================================================================================
# Drill 3: `ray job stop` during training
# ================================================================================================================

def test_ray_job_stop_marks_the_run_stopped_leaves_nothing_behind_and_a_later_start_resumes(
        ray_cluster, s3_bucket, tmp_path, lives, figures, evidence):
    endpoint, bucket = s3_bucket
    dash = ray_cluster["dashboard"]
    cfg = tiny("jobstop", endpoint, bucket, schedule={"stable_kimg": 8.192})  # `ray job stop` takes seconds
    cfg_file = write_cfg(tmp_path, cfg)
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, "jobstop")
    sid = f"drill-stop-{uuid.uuid4().hex[:8]}"
    sub = lives(submit_cmd(dash, cfg_file, sid, True), label="submit")
    assert sub.wait(timeout=120) == 0, sub.text()[-3000:]
    evidence["submitted_jobs"] += 1
    wait_until(lambda: len(run.committed()) >= 1, 240, "a committed checkpoint", interval=0.5)
    job_id = job_id_of(dash, submission_id=sid)
    assert job_id
    assert alive_actors(dash, job_id, "RayTrainWorker")  # training, mid-stage
    t_stop = time.time()
    stop = lives([str(Path(sys.executable).with_name("ray")), "job", "stop", "--address", dash, sid], label="stop")
    assert stop.wait(timeout=120) == 0, stop.text()[-3000:]
    state = run.run_state()
    assert state["state"] == "stopped", state["history"][-3:]
    assert "resume" in state["message"]
    logs = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "logs", "--address", dash, sid],
                          env=ray_cluster["env"], capture_output=True, text=True, timeout=60).stdout
    evidence["texts"].append(("job logs " + sid, logs))
    # Nothing of the run is left: no live actor of its job, no placement group (bounded wait for Ray's cleanup).
    try:
        wait_until(lambda: not alive_actors(dash, job_id) and not live_placement_groups(dash, job_id), 60,
                   "the job's actors and placement groups gone")
    except AssertionError:
        left = [(a.class_name, a.state, a.is_detached) for a in alive_actors(dash, job_id)]
        pgs = [(p.placement_group_id, p.state) for p in live_placement_groups(dash, job_id)]
        raise AssertionError(f"left behind after ray job stop: actors {left}, placement groups {pgs}") from None
    cleaned_s = time.time() - t_stop
    ckpt_at_stop = run.committed()[-1]
    # A later start resumes and completes (here from the head node, not through the job API).
    again = lives(driver_cmd(cfg_file, ray_cluster["address"]), label="restart")
    rc = again.wait(timeout=RUN_TIMEOUT)
    out = again.text()
    assert rc == 0, out[-5000:]
    state = run.run_state()
    assert state["state"] == "completed" and state["nimg"] == total and len(state["lives"]) == 2
    assert any(h["state"] == "stopped" for h in state["history"])
    assert f"resuming at {ckpt_at_stop / 1000:.1f} kimg" in out
    record(figures, "3-ray-job-stop", passed=True, stop_to_clean_s=round(cleaned_s, 1), resumed_from=ckpt_at_stop)


# ================================================================================================================
# Drill 4: S3 unavailable
# ================================================================================================================

def test_s3_outage_of_30s_during_a_checkpoint_is_retried_counted_and_the_run_completes(
        ray_cluster, s3_bucket, tmp_path, lives, figures, evidence):
    endpoint, bucket = s3_bucket
    proxy = TcpProxy.to_url(endpoint)
    port = free_port()
    # The exporter stays up 15 s past the end (metrics.linger_s, as in production): a run that finishes soon
    # after the outage still shows its final failure count to a scrape.
    cfg = tiny("outage", proxy.url, bucket, metrics={"port": port, "linger_s": 15},
               storage={"retry_attempts": 30, "retry_max_wait_s": 240})
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, "outage")  # read directly from moto, not through the proxy
    life = lives(driver_cmd(write_cfg(tmp_path, cfg), ray_cluster["address"]))
    poller = MetricsPoller(port)
    try:
        wait_mid_stage(run, poller, life, extra=64)
        before = run.committed()
        t_cut = time.time()
        proxy.cut()
        time.sleep(30)
        proxy.restore()
        t_back = time.time()
        # While the run is alive the exporter shows the failed attempts.
        failures = wait_until(lambda: poller.value("pggan_checkpoint_failures_total", "outage"), 180,
                              "pggan_checkpoint_failures_total > 0", alive=life.alive)
        rc = life.wait(timeout=RUN_TIMEOUT)
    finally:
        poller.stop()
        proxy.close()
    out = life.text()
    assert rc == 0, out[-5000:]
    state = run.run_state()
    assert state["state"] == "completed" and state["nimg"] == total and state["worker_restarts"] == 0
    retry_lines = life.find(r"checkpoint at [\d.]+ kimg: storage error \(\w+\), retry (\d+)")
    assert retry_lines, out[-5000:]  # the writer said it was retrying
    gaps = [round(b[0] - a[0], 1) for a, b in zip(retry_lines, retry_lines[1:])]  # the backoff between attempts
    ticks = [r for r in run.metrics() if r.get("event") == "tick"]
    retries = max(r.get("checkpoint_retries", 0) for r in ticks)
    assert retries > 0 and failures >= 1
    # The checkpoint due during the outage landed after it, and every committed checkpoint loads.
    assert run.committed()[-1] == total and len(run.committed()) >= 1
    from pggan.checkpoint.store import load_checkpoint_at

    for n in run.committed():
        load_checkpoint_at(run.storage(), run.url, n)
    evidence["texts"].extend((f"metrics outage {t:.0f}", text) for t, text in poller.scrapes)
    record(figures, "4a-s3-outage", passed=True, outage_s=round(t_back - t_cut, 1), checkpoint_retries=retries,
           checkpoint_failures_metric=failures, committed_before_cut=before, connections_reset=proxy.reset_count,
           retry_gaps_s=gaps)


def test_storage_down_past_the_retry_budget_stops_the_run_cleanly_and_nothing_half_written_counts(
        ray_cluster, s3_bucket, tmp_path, lives, figures):
    endpoint, bucket = s3_bucket
    proxy = TcpProxy.to_url(endpoint)
    # max_failures 0: with restarts, each new worker group waits the retry budget again at its restore.
    cfg = tiny("down", proxy.url, bucket, storage={"retry_attempts": 3, "retry_max_wait_s": 4},
               checkpoint={"keep": 4}, cluster={"max_failures": 0}, schedule={"stable_kimg": 6.144})
    cfg_file = write_cfg(tmp_path, cfg)
    run = RunDir(endpoint, bucket, "down")
    life = lives(driver_cmd(cfg_file, ray_cluster["address"]))
    try:
        wait_mid_stage(run, None, life, after_ckpts=4, timeout=300)
        t_cut = time.time()
        proxy.cut()  # and it stays down
        rc = life.wait(timeout=RUN_TIMEOUT)
        t_end = time.time()
    finally:
        proxy.close()
    out, err = life.text(), life.text("err")
    assert rc == 1, out[-5000:]
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "storage" in errors[0] and "retry_max_wait_s" in errors[0], err[-5000:]
    assert "run the same command again" in errors[0].lower()
    assert own_lines(err).rstrip().splitlines()[-1] == errors[0] and no_traceback(own_lines(out)), own_lines(out)
    # Storage is back (reads go straight to moto): every committed checkpoint loads, none is half-written.
    from pggan.checkpoint.store import load_checkpoint_at, load_latest

    committed = run.committed()
    assert len(committed) >= 4
    for n in committed:
        load_checkpoint_at(run.storage(), run.url, n)
    assert load_latest(run.storage(), run.url).nimg == committed[-1]
    half_written = run.uncommitted()  # if the cut fell between state.pt and meta.json: present, never loaded
    assert all(n > committed[-1] for n in half_written)
    record(figures, "4b-storage-down", passed=True, cut_to_exit_s=round(t_end - t_cut, 1), committed=committed,
           error_line=errors[0], output_lines=len(out.splitlines()), uncommitted_left=half_written,
           forwarded_worker_tracebacks=out.count("Traceback (most recent call last)"))


# ================================================================================================================
# Drill 5: broken checkpoints: the newest truncated, deleted or tampered with
# ================================================================================================================

class _Pwn:
    """An object whose unpickling would run code (here: create a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _killed_mid_stage(ray_cluster, s3_bucket, tmp_path, lives, name: str, checkpoints: int,
                      **over: Any) -> tuple[dict[str, Any], RunDir]:
    """A run whose driver was SIGKILLed mid-stage after ``checkpoints`` committed checkpoints, its workers gone:
    (config, run directory). What a drill that restarts a broken run starts from, set up by the drill itself."""
    endpoint, bucket = s3_bucket
    cfg = tiny(name, endpoint, bucket, **over)
    run = RunDir(endpoint, bucket, name)
    life = lives(driver_cmd(write_cfg(tmp_path, cfg, f"{name}-setup.yaml"), ray_cluster["address"]), label="setup")
    wait_mid_stage(run, None, life, after_ckpts=checkpoints, timeout=300)
    job = job_id_of(ray_cluster["dashboard"], driver_pid=life.pid)
    os.kill(life.pid, signal.SIGKILL)
    assert life.wait(timeout=30) == -signal.SIGKILL
    wait_until(lambda: not alive_actors(ray_cluster["dashboard"], job, "RayTrainWorker"), 60,
               "the killed driver's workers gone")  # until then rank 0 may still commit a checkpoint
    return cfg, run


def test_broken_newest_checkpoints_are_skipped_with_a_message_and_a_tampered_pickle_is_refused(
        ray_cluster, s3_bucket, tmp_path, lives, figures):
    import hashlib

    import torch

    from pggan.checkpoint.store import CheckpointError, load_checkpoint_at

    cfg, run = _killed_mid_stage(ray_cluster, s3_bucket, tmp_path, lives, "broken", checkpoints=4,
                                 checkpoint={"keep": 4}, schedule={"stable_kimg": 6.144})
    c = run.committed()[-4:]
    assert len(c) == 4
    good, deleted, truncated, tampered = c
    marker = tmp_path / "pwned"
    # The newest: a checksum-consistent pickle that would run code when unpickled.
    buf = io.BytesIO()
    torch.save({"trainer": _Pwn(str(marker)), "nimg": tampered}, buf)
    data = buf.getvalue()
    meta = json.loads(run.fs.cat_file(f"{run.ckpt_path(tampered)}/meta.json"))
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    run.fs.pipe_file(f"{run.ckpt_path(tampered)}/state.pt", data)
    run.fs.pipe_file(f"{run.ckpt_path(tampered)}/meta.json", json.dumps(meta).encode())
    # The next: truncated. The next: its state.pt deleted.
    whole = run.fs.cat_file(f"{run.ckpt_path(truncated)}/state.pt")
    run.fs.pipe_file(f"{run.ckpt_path(truncated)}/state.pt", whole[: len(whole) // 2])
    run.fs.rm(f"{run.ckpt_path(deleted)}/state.pt")

    with pytest.raises(CheckpointError, match="refused to load state.pt safely"):
        load_checkpoint_at(run.storage(), run.url, tampered)
    assert not marker.exists()

    life = lives(driver_cmd(write_cfg(tmp_path, cfg), ray_cluster["address"]))
    rc = life.wait(timeout=RUN_TIMEOUT)
    out = life.text()
    assert rc == 0, out[-5000:]
    assert not marker.exists()  # no code ran, on the driver or any worker
    for n, why in ((tampered, "refused to load state.pt safely"), (truncated, "does not match meta.json"),
                   (deleted, "missing file")):
        said = [m.group(0) for _, m in life.find(rf"\[pggan\] checkpoint \S*ckpt-{n:012d} is unusable: .*")]
        assert said and why in said[0] and "falling back" in said[0], out[-5000:]
    assert f"resuming at {good / 1000:.1f} kimg" in out  # the driver names the checkpoint it resumes from
    resumed = [int(m.group(1)) for _, m in life.find(r"resuming at .* from ckpt-(\d{12})")]
    assert resumed == [good]
    state = run.run_state()
    assert state["state"] == "completed" and state["nimg"] == state["total_nimg"]
    assert any("driver restarted" in h["note"] for h in state["history"])  # the killed life could not record
    record(figures, "5-broken-checkpoints", passed=True, resumed_from=good, skipped=[tampered, truncated, deleted])


# ================================================================================================================
# Drill 6: losses going non-finite
# ================================================================================================================

def test_persistent_non_finite_losses_roll_back_once_then_fail_naming_the_stage_and_never_checkpoint_nan(
        ray_cluster, s3_bucket, tmp_path, lives, figures):
    endpoint, bucket = s3_bucket
    # Stage 0 (4x4) trains normally; stage 1 (8x8 fade-in) has an absurd learning rate.
    cfg = tiny("nan", endpoint, bucket,
               model={"max_resolution": 8},
               schedule={"stable_kimg": 0.512, "fade_kimg": 0.512, "lr_dict": {8: 1.0e30}},
               optim={"max_nonfinite_in_row": 5})
    run = RunDir(endpoint, bucket, "nan")
    life = lives(driver_cmd(write_cfg(tmp_path, cfg), ray_cluster["address"]))
    rc = life.wait(timeout=RUN_TIMEOUT)
    out, err = life.text(), life.text("err")
    assert rc == 1, out[-5000:]
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and no_traceback(own_lines(out)), err[-5000:]
    assert "stage 01-8-fade" in errors[0] and "lower the learning rate" in errors[0] and "non-finite" in errors[0]
    assert len(life.find(r"\[01-8-fade\] \d+ non-finite steps in a row .* rolling back")) == 1
    # The stage starts in the same worker group right after 4x4, then the rollback restores its first checkpoint.
    assert len(life.find(r"\[01-8-fade\] starting at 0\.5 kimg .* from the previous stage")) == 1
    assert len(life.find(r"\[01-8-fade\] starting at 0\.5 kimg .* from ckpt-000000000512")) == 1
    state = run.run_state()
    assert state["state"] == "failed" and "01-8-fade" in state["message"]
    assert "lower the learning rate" in state["message"]
    ticks = [r for r in run.metrics() if r.get("event") == "tick"]
    assert max(r["nonfinite_total"] for r in ticks) >= 5 and state["nonfinite_steps"] >= 5
    # No checkpoint in the run directory holds a non-finite tensor.
    import torch

    checked = []
    for n in run.committed():
        state_pt = run.fs.cat_file(f"{run.ckpt_path(n)}/state.pt")
        assert all_tensors_finite(torch.load(io.BytesIO(state_pt), weights_only=True)), n
        checked.append(n)
    assert 512 in checked
    record(figures, "6-non-finite", passed=True, error_line=errors[0], checkpoints_checked=checked,
           nonfinite_steps=state["nonfinite_steps"])


# ================================================================================================================
# Drill 8: the secret appears nowhere
# ================================================================================================================

def test_the_secret_key_appears_in_no_object_log_or_metric(ray_cluster, s3_bucket, tmp_path, lives, figures,
                                                           evidence):
    endpoint, bucket = s3_bucket
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") == FAKE_SECRET == ray_cluster["env"]["AWS_SECRET_ACCESS_KEY"]
    # One tiny job to S3 through `ray job submit` with the exporter on, unless the other drills ran jobs (and
    # scraped /metrics) already.
    texts = list(evidence["texts"])
    if not evidence["submitted_jobs"] or not any(label.startswith("metrics") for label, _ in texts):
        port = free_port()
        cfg = tiny("secret", endpoint, bucket, schedule={"stable_kimg": 0.256}, metrics={"port": port})
        sid = f"drill-secret-{uuid.uuid4().hex[:8]}"
        job = lives(submit_cmd(ray_cluster["dashboard"], write_cfg(tmp_path, cfg), sid), label="secret")
        poller = MetricsPoller(port)
        try:
            rc = job.wait(timeout=RUN_TIMEOUT)
        finally:
            poller.stop()
        assert rc == 0, job.text()[-5000:]
        assert poller.scrapes, "the exporter was never scraped"
        texts += [("driver secret", job.text())] + [("metrics secret", t) for _, t in poller.scrapes]
    secret = FAKE_SECRET.encode()
    hits: list[str] = []
    # Every object in every bucket (all drills' run directories).
    fs = s3fs_for(endpoint)
    n_objects = 0
    for b in fs.ls(""):
        for key in fs.find(b):
            n_objects += 1
            if secret in fs.cat_file(key):
                hits.append(f"s3://{key}")
    # Every file of the Ray session (driver, worker, job, raylet, GCS logs), except the uploaded working directory
    # (a copy of this repository, whose tests/conftest.py defines the fake secret).
    n_files = 0
    for p in Path(ray_cluster["temp"]).rglob("*"):
        if p.is_file() and "runtime_resources" not in p.parts and not p.is_symlink():
            n_files += 1
            try:
                if secret in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    # Ray Train's local storage of the S3 runs.
    for p in (Path.home() / "ray_results" / "pggan").rglob("*"):
        if p.is_file() and secret in p.read_bytes():
            hits.append(str(p))
    # Driver and job output, `ray job logs`, and /metrics.
    hits += [label for label, text in texts if FAKE_SECRET in text]
    assert hits == []
    assert n_objects > 0 and n_files > 0
    record(figures, "8-secrets", passed=True, objects_scanned=n_objects, ray_files_scanned=n_files,
           texts_scanned=len(texts))
