"""The paper's LSGAN noise in D (official Theano GDropLayer, mode 'prop', and its adaptation in train.py), against
hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pggan.config import load_config
from pggan.models.layers import GDrop
from pggan.models.networks import Discriminator
from pggan.training.losses import GDropStrength


def test_gdrop_multiplies_each_sample_and_channel_by_one_plus_strength_sqrt_c_times_a_normal_draw():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2) + 1   # [N=2, C=3, 2, 2]
    s = torch.tensor(0.1, dtype=torch.float64)
    torch.manual_seed(7)
    y = GDrop().train()(x, s)
    torch.manual_seed(7)
    n = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    for i in range(2):
        for c in range(3):
            factor = 1 + 0.1 * math.sqrt(3) * n[i, c, 0, 0].item()   # one factor for the whole H x W plane
            assert torch.allclose(y[i, c], x[i, c] * factor)


def test_gdrop_is_the_identity_in_eval_mode_without_strength_and_at_strength_zero():
    x = torch.randn(4, 5, 3, 3)
    assert torch.equal(GDrop().eval()(x, torch.tensor(0.5)), x)
    assert torch.equal(GDrop().train()(x, None), x)
    assert torch.equal(GDrop().train()(x, torch.tensor(0.0)), x)


def test_strength_follows_the_official_rule_avg_of_clipped_d_loss_then_coef_times_excess_squared():
    g = GDropStrength(coef=0.2, lim=0.5, exp=2.0, beta=0.9)
    # D loss 3.0 is clipped to 1: avg after k steps = 1 - 0.9^k; strength 0 until avg passes 0.5 (k = 7).
    out = [g.update(torch.tensor(3.0)).item() for _ in range(10)]
    assert out[:6] == [0.0] * 6
    avg7 = 1 - 0.9 ** 7                                   # 0.5217031
    assert out[6] == pytest.approx(0.2 * (avg7 - 0.5) ** 2, rel=1e-5)     # 9.4e-5
    assert out[9] == pytest.approx(0.2 * (1 - 0.9 ** 10 - 0.5) ** 2, rel=1e-5)  # 0.2 * 0.1513^2 = 0.004580
    assert g.avg.item() == pytest.approx(1 - 0.9 ** 10, rel=1e-6)
    # A non-finite D loss (a skipped step) leaves the average where it was; a negative loss clips to 0.
    before = g.avg.item()
    g.update(torch.tensor(float("nan")))
    assert g.avg.item() == pytest.approx(before, rel=1e-6)
    g.update(torch.tensor(-2.0))
    assert g.avg.item() == pytest.approx(0.9 * before, rel=1e-6)


def test_noise_is_on_for_lsgan_by_default_off_for_wgan_gp_and_the_config_can_say_otherwise():
    assert load_config(preset="demo", sets=["loss.kind=lsgan"]).loss.gdrop == 0.2
    assert load_config(preset="demo", sets=["loss.kind=wgan-gp"]).loss.gdrop == 0.0
    assert load_config(preset="demo", sets=["loss.kind=lsgan", "loss.gdrop_coef=0"]).loss.gdrop == 0.0
    assert GDropStrength.from_config(load_config(preset="demo").loss) is None
    assert GDropStrength.from_config(load_config(preset="demo", sets=["loss.kind=lsgan"]).loss).coef == 0.2


def test_discriminator_with_gdrop_has_the_same_weights_and_scores_at_strength_zero_or_in_eval_mode():
    kw = dict(max_resolution=16, fmap_base=64, fmap_max=16, mbstd_group_size=4)
    torch.manual_seed(0)
    plain = Discriminator(**kw)
    torch.manual_seed(0)
    noisy = Discriminator(**kw, gdrop=True)
    assert plain.state_dict().keys() == noisy.state_dict().keys()   # the strength is not saved: checkpoints unchanged
    noisy.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 16, 16)
    assert torch.allclose(plain(x, 16, 0.5), noisy(x, 16, 0.5))      # strength 0
    noisy.gdrop_strength.fill_(0.3)
    assert not torch.allclose(plain(x, 16, 0.5), noisy(x, 16, 0.5))  # noise in training mode
    noisy.eval()
    plain.eval()
    assert torch.allclose(plain(x, 16, 0.5), noisy(x, 16, 0.5))      # none in eval mode


def test_an_lsgan_trainer_adapts_the_noise_from_its_d_loss(one_torch_thread):
    from pggan.training.step import GanTrainer

    cfg = load_config(preset="demo", sets=["loss.kind=lsgan", "loss.gdrop_lim=0", "model.max_resolution=8",
                                           "model.latent_size=16", "model.fmap_base=64", "model.fmap_max=16"])
    t = GanTrainer.from_config(cfg)
    assert t.gdrop is not None and t.D.gdrop_strength.item() == 0.0
    reals = torch.rand(8, 3, 8, 8) * 2 - 1
    d_losses = [t.train_step(reals, 8, 1.0)["loss_D"].item() for _ in range(2)]
    avg = 0.1 * min(max(d_losses[0], 0), 1) * 0.9 + 0.1 * min(max(d_losses[1], 0), 1)
    assert t.D.gdrop_strength.item() == pytest.approx(0.2 * avg ** 2, rel=1e-4)
    wgan = GanTrainer.from_config(load_config(preset="demo", sets=["model.max_resolution=8", "model.latent_size=16",
                                                                   "model.fmap_base=64", "model.fmap_max=16"]))
    assert wgan.gdrop is None and wgan.D.gdrop_strength is None
