"""Sweeps end to end: `ray job submit -- python service/launch.py sweep` on a local 2-CPU Ray cluster, trial run
directories on moto's S3. Tiny networks 4x4 -> 8x8 (three stages of 128 images; SWD at the two 8x8 stage ends),
one 1-CPU worker per trial, trial actors holding no CPU: two trials train at once."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.integration

TINY = {
    "preset": "demo",
    "run": {"name": "sw", "seed": 3},
    "data": {"source": "synthetic:shapes", "synthetic_images": 256},
    "model": {"max_resolution": 8, "latent_size": 16, "fmap_base": 64, "fmap_max": 16, "mbstd_group_size": 4},
    "schedule": {"start_resolution": 4, "fade_kimg": 0.128, "stable_kimg": 0.128, "fade_kimg_dict": {},
                 "stable_kimg_dict": {}, "minibatch_base": 16, "minibatch_dict": {}, "lr_base": 0.002},
    "cluster": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 1, "start_timeout_s": 120},
    "checkpoint": {"every_kimg": 0.064, "keep": 2},
    "metrics": {"tick_kimg": 0.064, "swd_images": 64, "port": 0, "grid_size": 4, "linger_s": 0},
    "ema": {"half_life_kimg": 0.1, "rampup": None},
}
STAGES = ["00-4-stable", "01-8-fade", "02-8-stable"]


def _config(tmp_path: Path, s3_bucket: tuple[str, str], sweep: dict) -> tuple[Path, str]:
    endpoint, bucket = s3_bucket
    cfg = json.loads(json.dumps(TINY))
    cfg["storage"] = {"url": f"s3://{bucket}/runs", "endpoint_url": endpoint}
    cfg["sweep"] = sweep
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, f"{bucket}/runs"


def _cmd(cluster: dict, cfg_file: Path, *job_args: str) -> list[str]:
    ray_bin = Path(sys.executable).with_name("ray")
    return [str(ray_bin), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(ROOT), *job_args,
            "--", "python", "service/launch.py", "sweep", "--config", str(cfg_file)]


def _submit(cluster: dict, cfg_file: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(cluster, cfg_file), env=cluster["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False)


def _state(fs, url: str) -> dict:
    return json.loads(fs.cat_file(f"{url}/run_state.json"))


def test_a_2x2_sweep_over_loss_and_lr_trains_four_trials_and_writes_results_plot_and_a_best_config(
        ray_cluster, s3_bucket, tmp_path):
    from pggan.config import load_config

    space = {"loss.kind": {"grid": ["wgan-gp", "lsgan"]}, "schedule.lr_base": {"grid": [0.001, 0.003]}}
    cfg_file, runs = _config(tmp_path, s3_bucket, {"search_space": space, "num_samples": 1, "max_concurrent": 2})
    fs = _fs(s3_bucket[0])
    t0 = time.monotonic()
    out = _submit(ray_cluster, cfg_file)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    print(f"2x2 sweep: {time.monotonic() - t0:.0f} s through ray job submit")

    doc = json.loads(fs.cat_file(f"{runs}/sw-sweep/results.json"))
    trials = doc["trials"]
    assert len(trials) == 4 and {t["trial"] for t in trials} == {"t00", "t01", "t02", "t03"}
    assert {(t["params"]["loss.kind"], t["params"]["schedule.lr_base"]) for t in trials} == \
        {(k, lr) for k in ("wgan-gp", "lsgan") for lr in (0.001, 0.003)}
    for t in trials:
        assert t["state"] == "completed", t
        assert t["run_url"].endswith(f"/runs/sw-{t['trial']}")
        assert _state(fs, t["run_url"].split("://", 1)[1])["state"] == "completed"
        # every stage end that has SWD (the 8x8 ones), with finite values per level
        assert [e["stage"] for e in t["stage_ends"]] == STAGES[1:]
        assert all(math.isfinite(e["swd_avg"]) and all(math.isfinite(v) for v in e["swd_x1e3"].values())
                   for e in t["stage_ends"])
    assert sorted(t["rank"] for t in trials) == [1, 2, 3, 4]
    best = min(trials, key=lambda t: t["swd_avg"])
    assert doc["best"] == best["trial"]
    assert "sweep results: SWD x1e3 avg at each stage end" in log and "best: " in log
    assert fs.cat_file(f"{runs}/sw-sweep/swd.png")[:8] == b"\x89PNG\r\n\x1a\n"
    best_file = tmp_path / "best.yaml"
    best_file.write_bytes(fs.cat_file(f"{runs}/sw-sweep/best.yaml"))
    again = load_config(str(best_file))  # re-validates
    assert again.loss.kind == best["params"]["loss.kind"]
    assert again.schedule.lr_base == best["params"]["schedule.lr_base"]
    assert again.run.name == f"sw-{best['trial']}"


def test_asha_stops_the_worse_trial_at_the_first_rung_and_marks_it_stopped_by_the_scheduler(
        ray_cluster, s3_bucket, tmp_path):
    # One trial at a time: t00 (a normal lr) records every rung first, then t01 (a learning rate too small to move
    # G from its initialization) is compared at the first rung (the 8x8 fade-in's end) and stopped there.
    space = {"schedule.lr_base": {"grid": [0.002, 1e-6]}}
    cfg_file, runs = _config(tmp_path, s3_bucket, {"search_space": space, "num_samples": 1, "max_concurrent": 1,
                                                   "scheduler": "asha"})
    fs = _fs(s3_bucket[0])
    out = _submit(ray_cluster, cfg_file)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    trials = {t["trial"]: t for t in json.loads(fs.cat_file(f"{runs}/sw-sweep/results.json"))["trials"]}
    assert trials["t00"]["state"] == "completed"
    stopped = trials["t01"]
    assert [e["stage"] for e in stopped["stage_ends"]] == ["01-8-fade"]
    assert stopped["stage_ends"][0]["swd_avg"] > trials["t00"]["stage_ends"][0]["swd_avg"]
    state = _state(fs, f"{runs}/sw-t01")
    assert state["state"] == "stopped", state
    assert state["message"].startswith("stopped by the scheduler"), state["message"]
    assert stopped["state"] == "stopped"
    assert not [h for h in state["history"] if h["state"] == "failed"]


def test_ray_job_stop_marks_the_running_trial_stopped_and_the_same_command_resumes_without_retraining(
        ray_cluster, s3_bucket, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    space = {"schedule.lr_base": {"grid": [0.002, 0.003]}}
    cfg_file, runs = _config(tmp_path, s3_bucket, {"search_space": space, "num_samples": 1, "max_concurrent": 1})
    fs = _fs(s3_bucket[0])
    client = JobSubmissionClient(ray_cluster["dashboard"])
    out = subprocess.run(_cmd(ray_cluster, cfg_file, "--no-wait"), env=ray_cluster["env"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    job = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group(0)
    # t00 finishes; t01 trains past its first checkpoint; then the sweep's driver is stopped.
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        done = fs.exists(f"{runs}/sw-t00/run_state.json") and _state(fs, f"{runs}/sw-t00")["state"] == "completed"
        if done and fs.exists(f"{runs}/sw-t01/checkpoints") and fs.ls(f"{runs}/sw-t01/checkpoints"):
            break
        assert client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job)[-4000:]
        time.sleep(1)
    else:
        pytest.fail(client.get_job_logs(job)[-4000:])
    client.stop_job(job)
    while client.get_job_status(job) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        time.sleep(0.5)
    first = _state(fs, f"{runs}/sw-t01")
    assert first["state"] == "stopped", (first, client.get_job_logs(job)[-4000:])
    assert "stopped with the sweep" in first["message"]
    assert _state(fs, f"{runs}/sw-t00")["state"] == "completed"

    out = _submit(ray_cluster, cfg_file)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "resuming; finished trials are not trained again" in log
    t00, t01 = _state(fs, f"{runs}/sw-t00"), _state(fs, f"{runs}/sw-t01")
    assert t00["state"] == t01["state"] == "completed"
    second = t00["lives"][-1]["id"]
    assert len(t00["lives"]) == 2
    assert not [h for h in t00["history"] if h["life"] == second and h["state"] == "training"]  # not retrained
    assert "already complete" in t00["message"]
    resumed = [h for h in t01["history"] if h["life"] == t01["lives"][-1]["id"] and h["state"] == "training"]
    assert resumed and resumed[0]["nimg"] > 0  # from its checkpoint, not from scratch
    trials = json.loads(fs.cat_file(f"{runs}/sw-sweep/results.json"))["trials"]
    assert [t["state"] for t in trials] == ["completed", "completed"]
    assert all(len(t["stage_ends"]) == 2 for t in trials)
