"""On a local cluster shaped like KubeRay's (a head with no CPUs for training plus two worker nodes, each its own
`ray start --address` process group): where the run's parts ran, and the loss of a whole worker node.

    .venv/bin/python -m pytest -q tests/test_cluster_shape.py
"""

from __future__ import annotations

import time

import pytest

from cluster_support import (jobs, actor_nodes, assert_every_checkpoint_loads, record_figures, records,
                             recoveries, schedule_total, tiny, write_cfg)
from conftest import free_port
from drill_support import MetricsPoller, RunDir, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_TIMEOUT = 420


def test_training_and_evaluation_run_on_the_worker_nodes_while_the_driver_and_the_exporter_stay_on_the_head(
        kuberay_cluster, s3_bucket, tmp_path, jobs):
    endpoint, bucket = s3_bucket
    cfg = tiny("shape", endpoint, bucket, metrics={"port": free_port()})
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, "shape")
    head, workers = kuberay_cluster.head_node_id(), set(kuberay_cluster.worker_node_ids().values())
    t0 = time.time()
    job = jobs(write_cfg(tmp_path, cfg))
    poller = MetricsPoller(cfg["metrics"]["port"], interval=0.5)
    seen: dict[str, set[str]] = {"TelemetryHub": set(), "TrainController": set(), "RayTrainWorker": set()}

    def look() -> bool:
        for cls, nodes in seen.items():
            nodes.update(actor_nodes(kuberay_cluster.dashboard, cls).values())
        return bool(seen["RayTrainWorker"]) and bool(seen["TelemetryHub"])

    try:
        wait_until(look, 240, "the hub actor and the Ray Train workers alive", interval=1.0, alive=job.alive)
        while job.alive():  # where every actor of the run lives, until it ends
            look()
            time.sleep(2)
        rc = job.wait(timeout=RUN_TIMEOUT)
    finally:
        poller.stop()
    out = job.text()
    assert rc == 0, out[-5000:]
    state = run.run_state()
    assert state["state"] == "completed" and state["nimg"] == state["total_nimg"] == total
    # The driver (the job's entrypoint), the Train controller and the exporter (the hub actor) on the 0-CPU head.
    assert state["lives"][-1]["node_id"] == head
    assert seen["TelemetryHub"] == {head} and seen["TrainController"] == {head}, seen
    assert poller.value("pggan_images_seen", "shape") == total  # the exporter served the run from the head
    # Training and evaluation on the worker nodes, one rank on each.
    assert seen["RayTrainWorker"] == workers, (seen, workers)
    ticks, ends = records(run, "tick"), records(run, "stage_end")
    assert ticks and all(set(t["nodes"]) == workers for t in ticks), [t["nodes"] for t in ticks]
    assert [e["stage"] for e in ends] == ["00-4-stable", "01-8-fade", "02-8-stable"]
    assert all(set(e["nodes"]) == workers and head not in e["nodes"] for e in ends), [e["nodes"] for e in ends]
    assert all(e.get("swd") for e in ends if e["resolution"] == 8)  # the evaluation ran there (SWD at 8x8)
    record_figures("cluster-shape", wall_s=round(time.time() - t0, 1), head=head, workers=sorted(workers),
                   stage_seconds={e["stage"]: e.get("seconds") for e in ends})


def test_losing_a_worker_node_mid_stage_then_a_replacement_node_the_run_completes_with_the_exact_image_count(
        kuberay_cluster, s3_bucket, tmp_path, jobs):
    endpoint, bucket = s3_bucket
    port = free_port()
    # One long 4x4 stage (4096 images, 7-15 s on two 1-CPU workers): the node goes in the middle of it.
    cfg = tiny("nodeloss", endpoint, bucket, model={"max_resolution": 4}, metrics={"port": port, "swd_images": 0},
               schedule={"stable_kimg": 4.096}, checkpoint={"every_kimg": 0.512})
    total = schedule_total(cfg)
    run = RunDir(endpoint, bucket, "nodeloss")
    t0 = time.time()
    job = jobs(write_cfg(tmp_path, cfg))
    poller = MetricsPoller(port)
    try:
        wait_until(lambda: run.committed(), 240, "a committed checkpoint", interval=0.5, alive=job.alive)
        target = run.committed()[-1] + 256
        wait_until(lambda: (poller.value("pggan_images_seen", "nodeloss") or 0) >= target, 120,
                   f"{target} images seen", alive=job.alive)
        nodes = set(actor_nodes(kuberay_cluster.dashboard, "RayTrainWorker").values())
        victim = kuberay_cluster.node_of_id(sorted(nodes)[0])
        assert victim is not None, (nodes, kuberay_cluster.worker_node_ids())
        lost_id = kuberay_cluster.node_ids[victim]
        nimg_at_kill = int(poller.value("pggan_images_seen", "nodeloss"))
        t_kill = time.time()
        kuberay_cluster.kill_node(victim)  # its raylet and every worker on it, at once
        replacement = kuberay_cluster.add_worker_node()  # as KubeRay replaces a lost pod
        t_replaced = time.time()
        rc = job.wait(timeout=RUN_TIMEOUT)
    finally:
        poller.stop()
    out = job.text()
    assert rc == 0, out[-5000:]
    state = run.run_state()
    assert state["state"] == "completed"
    assert state["nimg"] == state["total_nimg"] == total  # exactly the schedule's images
    assert state["worker_restarts"] >= 1 and state["preemptions"] == 0
    # The final checkpoint is there and loads (and so does every other one left).
    assert total in assert_every_checkpoint_loads(run)
    assert run.fs.exists(f"{run.path}/final/generator.pt")
    ticks = records(run, "tick")
    assert ticks[-1]["nimg"] == total
    after = [t for t in ticks if t["group_start_time"] > t_kill]
    assert after and all(lost_id not in t["nodes"] for t in after)
    assert kuberay_cluster.node_ids[replacement] in after[-1]["nodes"]  # the replacement node took over
    rec = recoveries(ticks, [t_kill])[0]
    record_figures("node-loss", wall_s=round(time.time() - t0, 1), nimg_seen_at_kill=nimg_at_kill,
                   replacement_joined_s=round(t_replaced - t_kill, 1), worker_restarts=state["worker_restarts"],
                   **rec)
