"""The paper presets against the official TF presets (tkarras/progressive_growing_of_gans config.py and
train.py), value for value. The official values are written out here, not read from our presets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pggan.config import ConfigError, load_config
from pggan.models.mbstd import mbstd_group
from pggan.models.layers import MinibatchStdDev
from pggan.schedule import stages, total_nimg
from pggan.training import ema_beta

from conftest import ROOT

RESOLUTIONS = [4, 8, 16, 32, 64, 128, 256, 512, 1024]

# Shared by every official preset: TrainingSchedule / train_progressive_gan defaults and config.py's G_opt,
# D_opt, D_loss, and G_paper / D_paper.
OFFICIAL_COMMON = {
    "lod_initial_resolution": 4,
    "G_smoothing": 0.999,  # per step
    "adam": (0.0, 0.99, 1e-8),
    "wgan_lambda": 10.0, "wgan_epsilon": 0.001, "wgan_target": 1.0,
    "latent_size": 512, "fmap_base": 8192, "fmap_max": 512,
    "tick_kimg_base": 160,
    "tick_kimg_dict": {4: 160, 8: 140, 16: 120, 32: 100, 64: 80, 128: 60, 256: 40, 512: 20, 1024: 10},
    "mirror_augment": True,  # celebahq
    "precision": "fp32",     # the '-fp16' option is commented out
}

OFFICIAL = {
    # '-preset-v1-1gpu': num_gpus = 1; D.mbstd_group_size = 16; sched.minibatch_base = 16;
    # sched.minibatch_dict = {256: 14, 512: 6, 1024: 3}; sched.lod_training_kimg = 800;
    # sched.lod_transition_kimg = 800; train.total_kimg = 19000
    "paper": {"num_gpus": 1, "mbstd_group_size": 16, "minibatch_base": 16,
              "minibatch_dict": {256: 14, 512: 6, 1024: 3}, "lrate_base": 0.001, "lrate_dict": {},
              "lod_training_kimg": 800, "lod_transition_kimg": 800, "total_kimg": 19000},
    # '-preset-v2-8gpus': num_gpus = 8; sched.minibatch_base = 32;
    # sched.minibatch_dict = {4: 512, 8: 256, 16: 128, 32: 64, 64: 32};
    # sched.G_lrate_dict = {128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003}; D_lrate_dict the same;
    # train.total_kimg = 12000 (lod kimg: the TrainingSchedule defaults 600/600; mbstd: the D_paper default 4)
    "paper-8gpu": {"num_gpus": 8, "mbstd_group_size": 4, "minibatch_base": 32,
                   "minibatch_dict": {4: 512, 8: 256, 16: 128, 32: 64, 64: 32}, "lrate_base": 0.001,
                   "lrate_dict": {128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003},
                   "lod_training_kimg": 600, "lod_transition_kimg": 600, "total_kimg": 12000},
}


def _official_minibatch(o: dict, res: int) -> int:
    mb = o["minibatch_dict"].get(res, o["minibatch_base"])
    return mb - mb % o["num_gpus"]  # TrainingSchedule: minibatch -= minibatch % num_gpus


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def preset(request):
    return request.param, load_config(preset=request.param), OFFICIAL[request.param]


def test_paper_presets_match_the_official_schedule_value_for_value(preset):
    _, cfg, o = preset
    s = cfg.schedule
    assert s.start_resolution == OFFICIAL_COMMON["lod_initial_resolution"]
    assert (s.fade_kimg, s.stable_kimg) == (o["lod_transition_kimg"], o["lod_training_kimg"])
    assert not s.fade_kimg_dict and not s.stable_kimg_dict
    assert s.total_kimg == o["total_kimg"]
    assert s.lr_rampup_kimg == 0
    for res in RESOLUTIONS:
        assert s.minibatch(res) == _official_minibatch(o, res), res
        assert s.lr(res) == o["lrate_dict"].get(res, o["lrate_base"]), res
    assert cfg.cluster.num_workers == o["num_gpus"]
    assert total_nimg(cfg) == pytest.approx(o["total_kimg"] * 1000, abs=16)
    assert stages(cfg)[-1].resolution == 1024


def test_paper_presets_match_the_official_networks_loss_optimizer_and_ticks(preset):
    _, cfg, o = preset
    m = cfg.model
    assert (m.max_resolution, m.latent_size, m.fmap_base, m.fmap_max) == (
        1024, OFFICIAL_COMMON["latent_size"], OFFICIAL_COMMON["fmap_base"], OFFICIAL_COMMON["fmap_max"])
    assert m.mbstd_group_size == o["mbstd_group_size"]
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == OFFICIAL_COMMON["adam"]
    assert (cfg.loss.kind, cfg.loss.gp_lambda, cfg.loss.drift, cfg.loss.gp_target) == (
        "wgan-gp", OFFICIAL_COMMON["wgan_lambda"], OFFICIAL_COMMON["wgan_epsilon"], OFFICIAL_COMMON["wgan_target"])
    assert cfg.metrics.tick_kimg == OFFICIAL_COMMON["tick_kimg_base"]
    assert cfg.metrics.tick_kimg_dict == OFFICIAL_COMMON["tick_kimg_dict"]
    assert cfg.data.mirror is OFFICIAL_COMMON["mirror_augment"]


def test_paper_presets_smooth_g_ema_by_the_official_beta_per_step_at_every_minibatch(preset):
    _, cfg, o = preset
    assert cfg.ema.beta_per_step == OFFICIAL_COMMON["G_smoothing"] and cfg.ema.half_life_kimg is None
    assert cfg.ema.rampup is None
    for res in RESOLUTIONS:
        beta = ema_beta(cfg.schedule.minibatch(res), cfg.ema.half_life_kimg, 10**6, cfg.ema.rampup,
                        cfg.ema.beta_per_step)
        assert beta == OFFICIAL_COMMON["G_smoothing"]


def test_paper_presets_train_in_fp32_as_the_official_runs(preset):
    _, cfg, _ = preset
    assert OFFICIAL_COMMON["precision"] == "fp32" and cfg.cluster.amp == "none"
    bf16 = load_config(preset=preset[0], sets=["cluster.amp=bf16"])  # still selectable
    assert bf16.cluster.amp == "bf16"


def test_minibatch_stddev_groups_are_the_official_min_of_group_size_and_minibatch(preset):
    _, cfg, o = preset
    for res in RESOLUTIONS:
        per_gpu = _official_minibatch(o, res) // o["num_gpus"]
        official = min(o["mbstd_group_size"], per_gpu)  # tf.minimum(group_size, tf.shape(x)[0])
        assert per_gpu % official == 0  # the official reshape needs it
        per_worker = cfg.schedule.minibatch(res) // cfg.cluster.num_workers
        assert mbstd_group(cfg.model.mbstd_group_size, per_worker) == official


@pytest.mark.parametrize("n,group", [(16, 16), (14, 14), (6, 6), (3, 3)])
def test_minibatch_stddev_layer_takes_statistics_over_the_whole_paper_minibatch(n, group):
    # With group 16 (v1-1gpu) every sample gets the same statistic: the std over the whole minibatch.
    x = torch.randn(n, 5, 4, 4, dtype=torch.float64)
    y = MinibatchStdDev(16)(x)[:, -1]                                    # [N, 4, 4]
    whole = torch.sqrt(x.var(dim=0, unbiased=False) + 1e-8).mean()
    torch.testing.assert_close(y, whole.expand(n, 4, 4))
    assert mbstd_group(16, n) == group


def test_ema_needs_exactly_one_of_half_life_and_beta_per_step():
    with pytest.raises(ConfigError) as e:
        load_config(preset="paper", sets=["ema.half_life_kimg=10"])
    assert [p[0] for p in e.value.problems] == ["ema.beta_per_step"]
    with pytest.raises(ConfigError):
        load_config(preset="demo", sets=["ema.half_life_kimg=null"])
    with pytest.raises(ConfigError):
        load_config(preset="demo", sets=["ema.beta_per_step=1.0"])
    cfg = load_config(preset="paper", sets=["ema.half_life_kimg=10", "ema.beta_per_step=null"])
    assert cfg.ema.half_life_kimg == 10


def test_dry_run_shows_the_official_values():
    out = subprocess.run([sys.executable, str(ROOT / "service" / "launch.py"), "--preset", "paper", "--dry-run"],
                         capture_output=True, text=True, check=True)
    cfg = json.loads(out.stdout)
    assert cfg["model"]["mbstd_group_size"] == 16
    assert cfg["schedule"]["total_kimg"] == 19000
    assert cfg["ema"] == {"half_life_kimg": None, "beta_per_step": 0.999, "rampup": None}
    assert cfg["cluster"]["amp"] == "none"
    assert cfg["metrics"]["tick_kimg_dict"] == {str(k): v for k, v in OFFICIAL_COMMON["tick_kimg_dict"].items()}
