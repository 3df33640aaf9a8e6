"""A lost worker at any moment, and spot preemption, on the KubeRay-shaped local cluster (tests/conftest.py
`kuberay_cluster`: a 0-CPU head and two 1-CPU worker nodes).

- The chaos drill: one tiny run; a seeded plan kills a random Ray Train worker (SIGKILL) at several moments: while
  a worker group starts, during a stage-end evaluation, and two more drawn from mid-step, right at a checkpoint
  write, and at a stage switch. The seed is printed; PGGAN_CHAOS_SEEDS=a,b reruns given seeds.
- The preemption drill: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` on a worker node, a replacement
  node, the drained node killed after its deadline.

Recovery times and images trained twice are written to /tmp/drills/history.jsonl and printed, never asserted.

    .venv/bin/python -m pytest -q tests/test_chaos.py
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from typing import Any

import pytest

from cluster_support import (jobs, actor_nodes, assert_every_checkpoint_loads, record_figures, records,
                             recoveries, schedule_total, tiny, write_cfg)
from conftest import free_port
from drill_support import Driver, MetricsPoller, RunDir, train_worker_pids, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_TIMEOUT = 480
SEEDS = [int(s) for s in os.environ.get("PGGAN_CHAOS_SEEDS", "1117,2029").split(",")]
CKPT = 256  # checkpoint.every_kimg of the chaos run, in images
PROGRESS = re.compile(r"\(RayTrainWorker pid=(\d+)[^)]*\)(?:\x1b\[\d*m)? \[\d\d-\d+-\w+\] res")  # rank 0's


class Chaos:
    """Waits for each planned moment and SIGKILLs one Ray Train worker there (a random one, or rank 0 where the
    moment is rank 0's: its checkpoint write)."""

    def __init__(self, cluster: Any, job: Driver, poller: MetricsPoller, run: str, rng: random.Random):
        self.cluster, self.job, self.poller, self.run, self.rng = cluster, job, poller, run, rng
        self.kills: list[dict[str, Any]] = []
        self.old_pids: set[int] = set()  # the workers of groups already hit (a killed group's survivors included)

    def pids(self) -> list[int]:
        return [p for p in train_worker_pids(self.cluster.dashboard) if p not in self.old_pids]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.poller.value(name, self.run, **labels)

    def progress_after(self, t: float) -> list[int]:
        """pids of rank 0 in progress lines printed after t."""
        return [int(m.group(1)) for _, m in self.job.find(PROGRESS.pattern, after=t)]

    def wait(self, cond: Any, what: str, timeout: float = 180) -> Any:
        try:
            return wait_until(cond, timeout, what, interval=0.1, alive=self.job.alive)
        except AssertionError as e:
            raise AssertionError(f"{e}; kills so far {self.kills}; the job's output:\n{self.job.tail(80)}") from None

    def kill(self, moment: str, pid: int, **extra: Any) -> None:
        t = time.time()
        os.kill(pid, signal.SIGKILL)
        self.old_pids |= {pid, *train_worker_pids(self.cluster.dashboard)}
        state = next((s for s in ("training", "evaluating") if self.metric("pggan_run_state", state=s) == 1), "?")
        self.kills.append({"moment": moment, "time": t, "pid": pid, "run_state": state,
                           "images_seen": self.metric("pggan_images_seen"), **extra})
        print(f"[chaos] {moment}: SIGKILL RayTrainWorker pid {pid} ({state}, "
              f"{self.metric('pggan_images_seen')} images seen)", flush=True)

    def recovered(self) -> None:
        """Until the worker group after the last kill trains (a progress line after it)."""
        t = self.kills[-1]["time"]
        self.wait(lambda: self.progress_after(t), "training again after the kill")

    # ---- the moments -----------------------------------------------------------------------------------
    def group_start(self) -> None:
        """A new worker group's actors are alive, before its first training step."""
        t = self.kills[-1]["time"] if self.kills else 0.0
        pids = self.wait(self.pids, "a worker group starting")
        self.kill("group_start", self.rng.choice(pids), trained_before_kill=bool(self.progress_after(t)))

    def mid_step(self) -> None:
        self.wait(lambda: self.metric("pggan_run_state", state="training") == 1 and self.pids(), "training")
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.kill("mid_step", self.rng.choice(self.wait(self.pids, "workers")))

    def checkpoint(self) -> None:
        """Rank 0 right after a tick that started a checkpoint write (its background upload)."""
        seen = self.metric("pggan_images_seen") or 0
        t = time.time()

        def due() -> bool:
            v = self.metric("pggan_images_seen")
            return v is not None and v > seen and int(v) % CKPT == 0 and self.progress_after(t)

        self.wait(due, "a tick with a checkpoint")
        self.kill("checkpoint", self.progress_after(t)[-1], checkpoint_nimg=int(self.metric("pggan_images_seen")))

    def evaluation(self) -> None:
        """An 8x8 stage's evaluation (sample grid, snapshot, SWD: seconds; the 4x4 one takes a blink)."""
        self.wait(lambda: self.metric("pggan_run_state", state="evaluating") == 1
                  and self.metric("pggan_resolution") == 8, "a stage-end evaluation at 8x8")
        self.kill("evaluation", self.rng.choice(self.wait(self.pids, "workers")),
                  stage_index=self.metric("pggan_stage_index"))

    def stage_switch(self) -> None:
        """The first moments of the next stage: the driver moved on, the workers start the stage."""
        stage = self.metric("pggan_stage_index") or 0
        self.wait(lambda: (self.metric("pggan_stage_index") or 0) > stage
                  and self.metric("pggan_run_state", state="training") == 1, "the next stage")
        self.kill("stage_switch", self.rng.choice(self.wait(self.pids, "workers")),
                  stage_index=self.metric("pggan_stage_index"))


def chaos_plan(rng: random.Random) -> list[str]:
    """At least one kill while a worker group starts and one during evaluation, two more drawn; in an order that
    a three-stage run can meet (an evaluation is met at any of three stage ends)."""
    plan = ["group_start", "evaluation", *rng.sample(["mid_step", "checkpoint", "stage_switch"], 2)]
    rng.shuffle(plan)
    return plan


@pytest.mark.parametrize("seed", SEEDS)
def test_chaos_kills_at_random_moments_are_all_recovered_counted_and_the_image_count_is_exact(
        kuberay_cluster, s3_bucket, tmp_path, jobs, seed):
    endpoint, bucket = s3_bucket
    rng = random.Random(seed)
    plan = chaos_plan(rng)
    print(f"[chaos] seed {seed} (PGGAN_CHAOS_SEEDS={seed} reruns it): plan {plan}", flush=True)
    port, name = free_port(), f"chaos{seed}"
    # 4x4 stable 2048, 8x8 fade 1024, 8x8 stable 2048 images; SWD on 256 images makes each evaluation last.
    cfg = tiny(name, endpoint, bucket, schedule={"stable_kimg": 2.048, "fade_kimg": 1.024},
               cluster={"max_failures": 8}, checkpoint={"every_kimg": CKPT / 1000, "keep": 4},
               metrics={"port": port, "swd_images": 256})
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, name)
    t0 = time.time()
    job = jobs(write_cfg(tmp_path, cfg))
    poller = MetricsPoller(port, interval=0.1)
    chaos = Chaos(kuberay_cluster, job, poller, name, rng)
    try:
        for i, moment in enumerate(plan):
            getattr(chaos, moment)()
            if plan[i + 1:i + 2] != ["group_start"]:  # a group start is caught as the next group starts
                chaos.recovered()
        rc = job.wait(timeout=RUN_TIMEOUT)
    finally:
        poller.stop()
    out = job.text()
    assert rc == 0, out[-6000:]
    state = run.run_state()
    assert state["state"] == "completed"
    assert state["nimg"] == state["total_nimg"] == total  # exactly the scheduled images
    n = len(chaos.kills)
    assert state["worker_restarts"] == n and state["preemptions"] == 0, (state["worker_restarts"], chaos.kills)
    assert poller.value("pggan_worker_restarts_total", name) == n
    assert [k["moment"] for k in chaos.kills] == plan
    assert_every_checkpoint_loads(run)
    assert [e["stage"] for e in records(run, "stage_end")] == ["00-4-stable", "01-8-fade", "02-8-stable"]
    ticks = records(run, "tick")
    assert ticks[-1]["nimg"] == total
    per_kill = recoveries(ticks, [k["time"] for k in chaos.kills])
    assert all(r["recovered"] for r in per_kill), per_kill
    record_figures("chaos", seed=seed, wall_s=round(time.time() - t0, 1), total_nimg=total,
                   kills=[{**k, **r, "time": round(k["time"] - t0, 1)} for k, r in zip(chaos.kills, per_kill)])


def test_a_preemption_notice_takes_a_just_in_time_checkpoint_and_the_restart_is_counted_apart_from_failures(
        kuberay_cluster, s3_bucket, tmp_path, jobs):
    endpoint, bucket = s3_bucket
    port = free_port()
    deadline_s = 8
    # One long 4x4 stage (12k images: it must outlast the notice and the deadline even at 600 img/s); regular
    # checkpoints every 1024 images, so the just-in-time one stands apart.
    cfg = tiny("preempt", endpoint, bucket, model={"max_resolution": 4}, schedule={"stable_kimg": 12.288},
               checkpoint={"every_kimg": 1.024}, metrics={"port": port, "swd_images": 0},
               cluster={"max_failures": 0})  # a failure would end the run: the preemption must not count as one
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, "preempt")
    t0 = time.time()
    job = jobs(write_cfg(tmp_path, cfg))
    poller = MetricsPoller(port, interval=0.2)
    try:
        wait_until(lambda: (poller.value("pggan_images_seen", "preempt") or 0) >= 1024 + 256, 240,
                   "training past the first checkpoint", alive=job.alive)
        nodes = sorted(set(actor_nodes(kuberay_cluster.dashboard, "RayTrainWorker").values()))
        victim = kuberay_cluster.node_of_id(nodes[-1])
        assert victim is not None and len(nodes) == 2, nodes
        nimg_at_notice = int(poller.value("pggan_images_seen", "preempt"))
        t_notice = time.time()
        subprocess.run([str(kuberay_cluster.ray_bin), "drain-node", f"--address={kuberay_cluster.address}",
                        f"--node-id={kuberay_cluster.node_ids[victim]}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message=spot reclaim drill", f"--deadline-remaining-seconds={deadline_s}"],
                       env=kuberay_cluster.env, check=True, capture_output=True, timeout=60)
        replacement = kuberay_cluster.add_worker_node()  # the spot replacement, joining while the node drains
        time.sleep(max(t_notice + deadline_s + 1 - time.time(), 0))
        t_gone = time.time()
        kuberay_cluster.kill_node(victim)  # the cloud takes the node after the deadline
        rc = job.wait(timeout=RUN_TIMEOUT)
    finally:
        poller.stop()
    out = job.text()
    assert rc == 0, out[-6000:]
    state = run.run_state()
    assert state["state"] == "completed" and state["nimg"] == state["total_nimg"] == total
    assert state["preemptions"] == 1 and state["worker_restarts"] == 0, state
    assert poller.value("pggan_preemptions_total", "preempt") == 1
    assert poller.value("pggan_worker_restarts_total", "preempt") == 0
    # The notice reached the workers, which wrote a checkpoint at once and trained on.
    jit = [(t, int(round(float(m.group(1)) * 1000))) for t, m in
           job.find(r"preemption notice .*just-in-time checkpoint at ([\d.]+) kimg", after=t_notice)]
    assert jit, out[-6000:]
    t_jit, jit_nimg = jit[0]
    assert nimg_at_notice <= jit_nimg  # taken after the notice, at the step it was seen
    assert jit_nimg in assert_every_checkpoint_loads(run) or jit_nimg < run.committed()[0]  # kept, or pruned later
    # The next worker group resumed from it (or from a newer one): no image before the notice is trained twice.
    resumed = [(t, int(m.group(1))) for t, m in job.find(r"resuming at .* from ckpt-(\d{12})", after=t_notice)]
    assert resumed and resumed[0][1] >= jit_nimg, (resumed, jit_nimg)
    ticks = records(run, "tick")
    assert ticks[-1]["nimg"] == total
    assert kuberay_cluster.node_ids[replacement] in ticks[-1]["nodes"]
    rec = recoveries(ticks, [t_notice + deadline_s])[0]  # Ray Train restarts the group at the deadline
    record_figures("preemption", wall_s=round(time.time() - t0, 1), nimg_at_notice=nimg_at_notice,
                   jit_checkpoint=jit_nimg, notice_to_jit_log_s=round(t_jit - t_notice, 2), deadline_s=deadline_s,
                   resumed_from=resumed[0][1], images_trained_twice=rec.get("images_trained_twice"),
                   deadline_to_next_step_s=rec.get("recovery_s"),
                   node_killed_after_notice_s=round(t_gone - t_notice, 1))
