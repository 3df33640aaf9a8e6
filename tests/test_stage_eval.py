"""Stage-end evaluation as the workers run it, without Ray: grid, snapshot, final generator, the evaluation record
that marks a stage evaluated, SWD with cached real descriptors and floor; and SWD spread over a real 2-process
gloo group equal to the same SWD in one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from pggan.checkpoint import load_generator
from pggan.config import load_config
from pggan.data import open_dataset
from pggan.metrics import swd_dist
from pggan.metrics.swd import swd
from pggan.schedule import stages
from pggan.stage_eval import StageEvaluator, evaluated, sample_grid_url, swd_table
from pggan.storage import Storage, join

TINY = ["model.max_resolution=8", "model.latent_size=8", "model.fmap_base=32", "model.fmap_max=8",
        "schedule.fade_kimg=0.064", "schedule.stable_kimg=0.064", "schedule.fade_kimg_dict={}",
        "schedule.stable_kimg_dict={}", "schedule.minibatch_dict={}", "metrics.swd_images=64",
        "metrics.grid_size=2", "data.synthetic_images=256"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _evaluator(cfg, storage, run):
    ds = open_dataset("synthetic:shapes", storage, 8, synthetic_images=cfg.data.synthetic_images)
    return StageEvaluator(cfg, storage, run, ds, "synthetic:shapes", torch.device("cpu"))


def test_stage_end_writes_grid_snapshot_final_generator_and_the_record_that_marks_it_evaluated():
    from pggan.training import GanTrainer

    cfg = load_config(preset="demo", sets=TINY)
    storage, run = Storage(), "memory://stage-eval-run"
    stage = stages(cfg)[-1]  # 8x8 stable
    G = GanTrainer.from_config(cfg).G_ema
    assert evaluated(storage, run, stage.name) is None

    record = _evaluator(cfg, storage, run).stage_end(G, stage, last=True)

    assert storage.read_bytes(sample_grid_url(run, stage))[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["swd"]["levels"] == [8] and record["swd"]["avg"] > 0 and record["swd"]["images"] == 64
    assert record["swd_floor"]["avg"] < record["swd"]["avg"]  # an untrained G is far from the reals
    assert evaluated(storage, run, stage.name) == json.loads(json.dumps(record))
    shards = storage.listdir(join(run, "swd_reals"))
    assert len(shards) == 2  # the compared sample and the floor's second sample, one cache each
    G2, res, meta = load_generator(run, storage)  # final/generator.pt
    assert res == 8 and meta["nimg"] == stage.end
    assert torch.equal(G2(torch.zeros(1, 8), 8, 1.0), G(torch.zeros(1, 8), 8, 1.0))
    again = _evaluator(cfg, storage, run).stage_end(G, stage, last=False)  # reals and floor from the caches
    assert again["swd_floor"] == record["swd_floor"]
    assert again["swd"]["swd_x1e3"] == pytest.approx(record["swd"]["swd_x1e3"], rel=1e-6)
    table = swd_table([record])
    assert stage.name in table and "real vs real" in table
    storage.rm(run, recursive=True)


@pytest.mark.parametrize("mirror", [True, False])
def test_stage_end_reals_are_mirrored_as_training_mirrors_them(monkeypatch, mirror):
    # The official evaluation mirrors the reals it compares with when training mirrored them (mirror_augment).
    from pggan.stage_eval import _sample_indices

    cfg = load_config(preset="demo", sets=TINY + [f"data.mirror={str(mirror).lower()}"])
    storage, run = Storage(), f"memory://stage-eval-mirror-{mirror}"
    ev = _evaluator(cfg, storage, run)
    seen = {}

    def capture(storage_, url, ranges, resolution, images_of, **kw):
        seen["url"], seen["images"] = url, images_of(0, ev.n)
        return None

    monkeypatch.setattr(swd_dist, "cached_share", capture)
    ev._reals(8, [(0, ev.n)], torch.float32, stream=swd_dist.REALS, offset=0)
    plain = ev.dataset.images(8, _sample_indices(ev.dataset.num_images, 2 * ev.n, ev.seed + 1)[:ev.n])
    flipped = np.array([not np.array_equal(a, b) for a, b in zip(seen["images"], plain)])
    if mirror:
        flags = swd_dist.mirror_flags(2 * ev.n, ev.seed)[:ev.n]
        assert 0.25 < flags.mean() < 0.75
        np.testing.assert_array_equal(seen["images"][flags], plain[flags][..., ::-1])
        np.testing.assert_array_equal(seen["images"][~flags], plain[~flags])
        assert flipped.sum() > 0
    else:
        assert not flipped.any()
    other = swd_dist.cache_key(data=ev.data_url, synthetic_images=cfg.data.synthetic_images, resolution=8,
                               images=ev.n, seed=ev.seed, mirror=not mirror, stream=swd_dist.REALS)
    assert other not in seen["url"]  # mirrored and plain reals never share a cache


def test_the_4x4_stage_end_has_a_grid_and_no_swd():
    from pggan.training import GanTrainer

    cfg = load_config(preset="demo", sets=TINY)
    storage, run = Storage(), "memory://stage-eval-4"
    st = stages(cfg)[0]
    record = _evaluator(cfg, storage, run).stage_end(GanTrainer.from_config(cfg).G_ema, st, last=False)
    assert "swd" not in record and storage.exists(sample_grid_url(run, st))
    storage.rm(run, recursive=True)


def test_two_stage_ends_below_one_kimg_leave_two_snapshots():
    """Regression: snapshots were named by whole kimg (snapshot-000000.pt), so every stage end below 1 kimg
    overwrote the previous one; they are named by image count now, as checkpoints are."""
    from pggan.checkpoint import load_snapshot
    from pggan.training import GanTrainer

    cfg = load_config(preset="demo", sets=TINY + ["metrics.swd_images=0"])
    storage, run = Storage(), "memory://stage-eval-snapshots"
    first, second = stages(cfg)[:2]  # 4x4 stable ends at 64 images, 8x8 fade-in at 128
    assert second.end < 1000
    ev, G = _evaluator(cfg, storage, run), GanTrainer.from_config(cfg).G_ema
    ev.stage_end(G, first, last=False)
    ev.stage_end(G, second, last=False)
    names = sorted(storage.listdir(join(run, "snapshots")))
    assert len(names) == 2, names
    assert [load_snapshot(storage, join(run, "snapshots", n))["nimg"] for n in names] == [first.end, second.end]
    storage.rm(run, recursive=True)


def _images(n: int, res: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, res, res), dtype=np.uint8)
    return base


def test_shares_with_shared_positions_reproduce_the_one_process_swd():
    """Same positions for both sets (one seed): the sharded computation is the validated swd() exactly."""
    a, b = _images(96, 16, 1), _images(96, 16, 2)
    ref = swd(a, b, seed=5, w1_method="sort")
    da = swd_dist.describe_share([(0, a[:40]), (40, a[40:])], 16, seed=5, device=torch.device("cpu"))
    db = swd_dist.describe_share([(0, b)], 16, seed=5, device=torch.device("cpu"))
    got = swd_dist.swd_of_shares(da, db, seed=5)
    assert got["swd_x1e3"] == pytest.approx(ref["swd_x1e3"], rel=2e-5)


def test_independent_positions_make_a_set_against_itself_nonzero_and_a_blurred_copy_larger():
    """Positions drawn per set (as the official code does): a set is no longer exactly 0 against itself, and the
    distance to a blurred copy is larger than that noise."""
    from pggan.metrics.pyramid import pyr_down, pyr_up

    x = _images(64, 16, 3)
    blurred = pyr_up(pyr_down(torch.from_numpy(x).float())).round().clamp(0, 255).to(torch.uint8).numpy()
    cpu = torch.device("cpu")

    def dist_(u, v):
        su = swd_dist.describe_share([(0, u)], 16, seed=swd_dist.set_seed(0, 1), device=cpu)
        sv = swd_dist.describe_share([(0, v)], 16, seed=swd_dist.set_seed(0, 2), device=cpu)
        return swd_dist.swd_of_shares(su, sv, seed=0)["avg"]

    self_distance, blur_distance = dist_(x, x), dist_(x, blurred)
    assert self_distance > 0
    assert blur_distance > 2 * self_distance


def test_shard_ranges_deal_every_image_once_for_any_rank_count():
    for world in (1, 2, 3, 8):
        got = sorted(r for rank in range(world) for r in swd_dist.shard_ranges(1300, rank, world, shard=512))
        assert got == [(0, 512), (512, 1024), (1024, 1300)]


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a, b = _images(100, 16, 1), _images(100, 16, 2)
    cpu = torch.device("cpu")
    ranges = swd_dist.shard_ranges(100, rank, world, shard=32)
    da = swd_dist.describe_share([(s, a[s:e]) for s, e in ranges], 16, seed=7, device=cpu)
    db = swd_dist.describe_share([(s, b[s:e]) for s, e in ranges], 16, seed=9, device=cpu)
    res = swd_dist.swd_of_shares(da, db, seed=7)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_compute_the_swd_of_one_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = _images(100, 16, 1), _images(100, 16, 2)
    cpu = torch.device("cpu")
    one = swd_dist.swd_of_shares(swd_dist.describe_share([(0, a)], 16, seed=7, device=cpu),
                                 swd_dist.describe_share([(0, b)], 16, seed=9, device=cpu), seed=7)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["ranks"] == 2 and got["images"] == 100
        assert got["swd_x1e3"] == pytest.approx(one["swd_x1e3"], rel=1e-5)


def test_a_spilled_share_in_float16_gives_the_in_memory_swd(tmp_path):
    """Descriptors kept on local disk (one level mapped at a time), as large evaluations do, change nothing but
    the float16 rounding."""
    a, b = _images(80, 32, 4), _images(80, 32, 5)
    cpu = torch.device("cpu")
    mem = swd_dist.swd_of_shares(swd_dist.describe_share([(0, a)], 32, seed=1, device=cpu),
                                 swd_dist.describe_share([(0, b)], 32, seed=2, device=cpu), seed=1)
    sa = swd_dist.describe_share([(0, a[:33]), (33, a[33:])], 32, seed=1, device=cpu, dtype=torch.float16,
                                 spill_dir=str(tmp_path))
    sb = swd_dist.describe_share([(0, b)], 32, seed=2, device=cpu, dtype=torch.float16, spill_dir=str(tmp_path))
    assert not any(sa.rows) and len(list(tmp_path.rglob("level-*.bin"))) == 4  # 2 levels x 2 sets, on disk
    spilled = swd_dist.swd_of_shares(sa, sb, seed=1)
    assert spilled["swd_x1e3"] == pytest.approx(mem["swd_x1e3"], rel=1e-3)
    sa.close()
    sb.close()
    assert not list(tmp_path.rglob("level-*.bin"))


def test_evaluate_and_the_stage_end_draw_positions_per_set_the_same_way():
    """`launch.py evaluate` (swd with independent positions) and the workers' stage-end SWD are one metric."""
    a, b = _images(64, 16, 6), _images(64, 16, 7)
    cpu = torch.device("cpu")
    whole = swd(a, b, seed=3, independent_positions=True, w1_method="sort")
    shares = swd_dist.swd_of_shares(
        swd_dist.describe_share([(0, a)], 16, seed=swd_dist.set_seed(3, swd_dist.REALS), device=cpu),
        swd_dist.describe_share([(0, b)], 16, seed=swd_dist.set_seed(3, swd_dist.FAKES), device=cpu), seed=3)
    assert whole["swd_x1e3"] == pytest.approx(shares["swd_x1e3"], rel=2e-5)
    assert swd(a, a, seed=3)["avg"] == 0.0 < swd(a, a, seed=3, independent_positions=True)["avg"]
