"""Stage-end work without Ray: grid, snapshot, SWD and its cached real-vs-real floor, the SWD table."""

from __future__ import annotations

import torch

from pggan.checkpoint import load_generator, save_checkpoint
from pggan.config import load_config
from pggan.schedule import stages
from pggan.stage_eval import evaluate_stage, sample_grid_url, swd_table
from pggan.storage import Storage, join


def test_evaluate_stage_writes_grid_snapshot_swd_and_caches_the_floor():
    torch.set_num_threads(1)
    from pggan.training import GanTrainer

    cfg = load_config(preset="demo", sets=[
        "model.max_resolution=8", "model.latent_size=8", "model.fmap_base=32", "model.fmap_max=8",
        "schedule.fade_kimg=0.064", "schedule.stable_kimg=0.064", "schedule.fade_kimg_dict={}",
        "schedule.stable_kimg_dict={}", "schedule.minibatch_dict={}", "metrics.swd_images=64",
        "metrics.grid_size=2", "data.synthetic_images=256"])
    storage, run = Storage(), "memory://stage-eval-run"
    stage = stages(cfg)[-1]  # 8x8 stable
    save_checkpoint(storage, run, stage.end, {"trainer": GanTrainer.from_config(cfg).state_dict()}, {})

    record = evaluate_stage(cfg, storage, run, stage, "synthetic:shapes")

    assert storage.read_bytes(sample_grid_url(run, stage))[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["swd"]["levels"] == [8] and record["swd"]["avg"] > 0
    assert record["swd_floor"]["avg"] < record["swd"]["avg"]  # an untrained G is far from the reals
    floors = storage.listdir(join(run, "swd_floor"))
    assert len(floors) == 1 and floors[0].startswith("swd-noise-floor-8px-64img")
    G, res, meta = load_generator(run, storage)
    assert res == 8 and meta["nimg"] == stage.end
    assert G(torch.zeros(1, 8), 8, 1.0).shape == (1, 3, 8, 8)
    again = evaluate_stage(cfg, storage, run, stage, "synthetic:shapes")
    assert again["swd_floor"] == record["swd_floor"]  # read from the cache
    table = swd_table([record])
    assert stage.name in table and "real vs real" in table
    storage.rm(run, recursive=True)
