"""Losses, G_ema and the training step: hand-computed references, exact resume, and data parallelism
(a real 2-process gloo group must end with the weights of one process training on the whole batch)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pggan.config import EmaSection, LossSection, ModelSection, OptimSection, RunConfig
from pggan.models import Discriminator
from pggan.schedule import stages
from pggan.training import (
    GanLoss,
    GanTrainer,
    StepNoise,
    StepOptions,
    ema_beta,
    ema_update,
    gradient_norms,
    lsgan_d_loss,
    lsgan_g_loss,
    wgan_d_loss,
    wgan_g_loss,
)

from conftest import ROOT, free_port

torch.set_num_threads(2)

TINY = ModelSection(max_resolution=16, latent_size=8, fmap_base=32, fmap_max=6, mbstd_group_size=4)


def _trainer(dtype=torch.float64, lr=0.01, options: StepOptions | None = None, loss=None, ema=None, **kw):
    return GanTrainer(kw.pop("model", TINY), loss or LossSection(), OptimSection(), ema or EmaSection(),
                      options=options or StepOptions(), lr=lr, dtype=dtype, **kw)


def _reals(n: int, res: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, res, res, generator=g) * 2 - 1).to(dtype)


def _noise(n: int, latent: int, seed: int, dtype=torch.float64) -> StepNoise:
    g = torch.Generator().manual_seed(seed)
    return StepNoise(torch.randn(n, latent, generator=g).to(dtype), torch.randn(n, latent, generator=g).to(dtype),
                     torch.rand(n, generator=g).to(dtype))


def _assert_states_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    for net in ("G", "D", "G_ema"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=rtol, atol=atol, msg=f"{net}.{k}")
    for opt in ("opt_G", "opt_D"):
        sa, sb = a[opt]["state"], b[opt]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(sa[i][k], sb[i][k], rtol=rtol, atol=atol, msg=f"{opt}[{i}].{k}")


# ------------------------------------------------------------------------------------------------- losses


def test_wgan_and_lsgan_per_sample_losses_match_hand_numbers():
    real = torch.tensor([1.0, -2.0])
    fake = torch.tensor([0.5, 3.0])
    # D(fake) - D(real) + 0.001 D(real)^2
    torch.testing.assert_close(wgan_d_loss(real, fake, 0.001), torch.tensor([-0.499, 5.004]))
    torch.testing.assert_close(wgan_g_loss(fake), torch.tensor([-0.5, -3.0]))
    # D(real)^2 + 0.1 (D(fake) - 1)^2
    torch.testing.assert_close(lsgan_d_loss(real, fake, 0.1), torch.tensor([1.025, 4.4]))
    torch.testing.assert_close(lsgan_g_loss(fake), torch.tensor([0.25, 9.0]))


def test_gan_loss_d_phase_with_a_linear_critic_matches_hand_numbers():
    # D(x) = <v, x> per sample: its input gradient is v everywhere, so ||grad|| = ||v|| = 3.
    v = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    v[0, 0, 0, 0], v[0, 1, 1, 1], v[0, 2, 0, 1] = 1.0, 2.0, 2.0
    score = lambda x: (x * v).sum(dim=(1, 2, 3))  # noqa: E731
    reals = torch.ones(2, 3, 2, 2, dtype=torch.float64)        # D(real) = 5
    fakes = -torch.ones(2, 3, 2, 2, dtype=torch.float64)       # D(fake) = -5
    cfg = LossSection(kind="wgan-gp", gp_lambda=10.0, gp_target=2.0, drift=0.001)
    terms = GanLoss(cfg).d_loss(score, reals, fakes, torch.tensor([0.2, 0.9], dtype=torch.float64))
    # -5 - 5 + 0.001 * 25 + (10 / 2^2) * (3 - 2)^2
    torch.testing.assert_close(terms.loss, torch.full((2,), -10 + 0.025 + 2.5, dtype=torch.float64))
    torch.testing.assert_close(terms.gp, torch.ones(2, dtype=torch.float64))
    ls = GanLoss(LossSection(kind="lsgan")).d_loss(score, reals, fakes)
    torch.testing.assert_close(ls.loss, torch.full((2,), 25 + 0.1 * 36, dtype=torch.float64))
    torch.testing.assert_close(GanLoss(LossSection(kind="lsgan")).g_loss(score, fakes),
                               torch.full((2,), 25.0, dtype=torch.float64))


def _tiny_d() -> Discriminator:
    torch.manual_seed(5)
    d = Discriminator(max_resolution=8, fmap_base=16, fmap_max=3, mbstd_group_size=2).double()
    with torch.no_grad():
        for name, p in d.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.3)
    return d


def test_gradient_penalty_norms_match_finite_differences_on_a_tiny_d():
    d = _tiny_d()
    score = lambda x: d(x, 4, 1.0)  # noqa: E731  (4x4 keeps the loop short; mbstd, conv and dense are there)
    x = _reals(2, 4, seed=1)
    norms = gradient_norms(score, x)
    # Central differences of sum(D(x)) (minibatch stddev couples the two samples, as in the official code).
    h = 1e-6
    fd = torch.zeros_like(x)
    flat, fd_flat = x.view(-1), fd.view(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + h
            up = score(x).sum().item()
            flat[i] = old - h
            down = score(x).sum().item()
            flat[i] = old
            fd_flat[i] = (up - down) / (2 * h)
    torch.testing.assert_close(norms, fd.flatten(1).norm(dim=1), rtol=1e-6, atol=1e-8)


def test_gradient_penalty_parameter_gradient_matches_finite_differences():
    # The double backward: d gp / d theta for a few of D's weights against central differences.
    d = _tiny_d()
    x = _reals(2, 8, seed=2)
    penalty = lambda: (gradient_norms(lambda y: d(y, 8, 1.0), x) - 1.0).square().sum()  # noqa: E731
    d.zero_grad()
    penalty().backward()
    h = 1e-6
    for p in (d.blocks["8"].conv0.weight, d.blocks["4"].conv.weight, d.from_rgb["8"].weight):
        for idx in [(0, 0, 0, 0), (1, 2, 0, 0)]:
            old = p[idx].item()
            with torch.no_grad():
                p[idx] = old + h
            up = penalty().item()
            with torch.no_grad():
                p[idx] = old - h
            down = penalty().item()
            with torch.no_grad():
                p[idx] = old
            assert p.grad[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


# ---------------------------------------------------------------------------------------------------- EMA


def test_ema_beta_is_a_half_life_in_images_with_optional_rampup():
    assert ema_beta(1000, 1.0) == pytest.approx(0.5)
    assert ema_beta(16, 11.09) == pytest.approx(0.999, abs=2e-6)  # the official per-step beta
    # Ramp-up caps the half-life at rampup * nimg: 0.05 * 20000 = 1000 images.
    assert ema_beta(1000, 10.0, nimg=20_000, rampup=0.05) == pytest.approx(0.5)
    assert ema_beta(1000, 10.0, nimg=10**9, rampup=0.05) == pytest.approx(0.5 ** 0.1)
    assert ema_beta(16, 10.0, nimg=0, rampup=0.05) == 0.0
    assert ema_beta(16, 0.0) == 0.0


def test_ema_beta_per_step_is_the_official_form_at_any_minibatch():
    for batch in (3, 16, 512):
        assert ema_beta(batch, None, nimg=10**6, beta_per_step=0.999) == 0.999
    # Ramp-up caps it as it caps a half-life: at 20,000 images seen, a half-life of 1000 images.
    assert ema_beta(1000, None, nimg=20_000, rampup=0.05, beta_per_step=0.999) == pytest.approx(0.5)
    assert ema_beta(16, None, nimg=0, rampup=0.05, beta_per_step=0.999) == 0.0
    with pytest.raises(ValueError):
        ema_beta(16, None)


def test_ema_update_matches_the_closed_form():
    model = torch.nn.Linear(3, 2).double()
    ema = torch.nn.Linear(3, 2).double()
    w, e0 = model.weight.detach().clone(), ema.weight.detach().clone()
    batch, half_life_kimg, k = 16, 0.1, 25
    for _ in range(k):
        ema_update(ema, model, ema_beta(batch, half_life_kimg))
    # After k steps towards a fixed model: e_k = w + (e0 - w) * 0.5 ** (k * batch / half_life_images)
    torch.testing.assert_close(ema.weight, w + (e0 - w) * 0.5 ** (k * batch / 100))
    assert k * batch == 400 and ema.weight.sub(w).div(e0 - w).mean().item() == pytest.approx(0.5 ** 4)


# --------------------------------------------------------------------------------------------------- step


SKIP_PATHS = {"device_flag": StepOptions(device_skip=True), "host": StepOptions(device_skip=False),
              "foreach_adam": StepOptions(fused_adam=False)}


@pytest.mark.parametrize("path", sorted(SKIP_PATHS))
def test_nonfinite_step_changes_no_weight_and_is_counted(path):
    tr = _trainer(options=SKIP_PATHS[path])
    assert tr._skip_on_device == (path == "device_flag")
    tr.train_step(_reals(8, 8), 8, 0.5)
    before = tr.state_dict()
    before = {k: (json.loads(json.dumps(v)) if k == "counters" else _clone(v)) for k, v in before.items()}
    bad = _reals(8, 8, seed=1)
    bad[3, 1, 2, 2] = float("nan")
    out = tr.train_step(bad, 8, 0.5)
    assert out["nonfinite"] == 1.0
    after = tr.state_dict()
    _assert_states_close(after, before, rtol=0, atol=0)
    assert after["counters"]["nonfinite_steps"] == 1
    assert after["counters"]["nimg"] == before["counters"]["nimg"] + 8  # the images still count as shown
    out = tr.train_step(_reals(8, 8, seed=2), 8, 0.5)
    assert out["nonfinite"] == 0.0 and math.isfinite(out["loss_D"])


@pytest.mark.parametrize("path", sorted(SKIP_PATHS))
def test_nonfinite_g_step_keeps_d_update_but_leaves_g_and_g_ema(path):
    tr = _trainer(options=SKIP_PATHS[path])
    tr.train_step(_reals(8, 8), 8, 0.5)
    before = _clone(tr.state_dict())
    noise = _noise(8, TINY.latent_size, seed=3)
    noise.z_g[0, 0] = float("inf")  # only the G step sees it
    out = tr.train_step(_reals(8, 8, seed=1), 8, 0.5, noise=noise)
    assert out["nonfinite"] == 1.0 and math.isfinite(out["loss_D"])
    after = tr.state_dict()
    for net in ("G", "G_ema"):
        for k in after[net]:
            assert torch.equal(after[net][k], before[net][k]), f"{net}.{k} changed"
    assert not torch.equal(after["D"]["blocks.4.conv.weight"], before["D"]["blocks.4.conv.weight"])
    assert after["counters"]["nonfinite_steps"] == 1


@pytest.mark.parametrize("device_skip", [True, None])
def test_step_statistics_stay_on_the_device_and_nonfinite_counts_read_as_ints(device_skip):
    tr = _trainer(options=StepOptions(device_skip=device_skip))
    assert tr._skip_on_device == bool(device_skip)  # None: host decisions on CPU
    out = tr.train_step(_reals(8, 8), 8, 0.5)
    assert set(out) == {"loss_D", "gp", "score_real", "score_fake", "loss_G", "nonfinite"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and v.device == tr.device for v in out.values())
    bad = _reals(8, 8, seed=1)
    bad[0, 0, 0, 0] = float("inf")
    in_row = []
    for reals in (bad, bad, _reals(8, 8, seed=2), bad):
        tr.train_step(reals, 8, 0.5)
        in_row.append(tr.nonfinite_in_row)
    assert in_row == [1, 2, 0, 1]
    assert tr.counters.nonfinite_steps == 3 and isinstance(tr.counters.nonfinite_steps, int)
    state = tr.state_dict()
    assert state["counters"]["nonfinite_steps"] == 3 and isinstance(state["counters"]["nonfinite_steps"], int)
    fresh = _trainer()
    fresh.load_state_dict(state)
    assert fresh.counters.nonfinite_steps == 3 and fresh.nonfinite_in_row == 0


def test_ema_update_with_a_device_skip_flag_is_exact_at_zero_and_one():
    model = torch.nn.Linear(3, 2).double()
    ema = torch.nn.Linear(3, 2).double()
    e0 = ema.weight.detach().clone()
    ema_update(ema, model, 0.9, skip=torch.ones(()))
    assert torch.equal(ema.weight, e0)  # skipped: bit for bit
    ema_update(ema, model, 0.0, skip=torch.zeros(()))
    assert torch.equal(ema.weight, model.weight)  # beta 0: a copy
    ema.weight.data.copy_(e0)
    ema_update(ema, model, 0.9, skip=torch.zeros(()))
    torch.testing.assert_close(ema.weight, torch.lerp(e0, model.weight, 0.1))


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def test_tiny_cpu_run_over_two_stages_learns_and_resets_adam_at_the_stage_change():
    cfg = RunConfig.model_validate({
        "model": TINY.model_dump() | {"max_resolution": 8},
        "schedule": {"start_resolution": 4, "stable_kimg": 0.048, "fade_kimg": 0.048, "minibatch_base": 8,
                     "lr_base": 0.005, "total_kimg": 0.096},
        "ema": {"half_life_kimg": 0.02},
        "cluster": {"amp": "none"},
    })
    run = stages(cfg)
    assert [(s.resolution, s.kind, s.steps) for s in run] == [(4, "stable", 6), (8, "fade", 6)]
    tr = GanTrainer.from_config(cfg, dtype=torch.float32)
    initial = _clone(tr.state_dict())
    conv4 = tr.D.blocks["4"].conv.weight
    alphas, losses = [], []
    for st in run:
        tr.reset_optimizers(st.lr)
        assert len(tr.opt_D.state) == 0 and len(tr.opt_G.state) == 0  # fresh Adam at every stage start
        for _ in range(st.steps):
            alpha = st.alpha(tr.nimg)
            alphas.append(alpha)
            out = tr.train_step(_reals(8, st.resolution, seed=tr.nimg, dtype=torch.float32), st.resolution, alpha)
            losses.append(out)
        assert tr.opt_D.state[conv4]["step"].item() == st.steps  # Adam counted this stage's steps only
    assert alphas[:6] == [1.0] * 6 and alphas[6:] == [i / 6 for i in range(6)]
    assert tr.nimg == run[-1].end == 96
    assert all(math.isfinite(v) for out in losses for v in out.values())
    assert sum(out["nonfinite"] for out in losses) == 0
    final = tr.state_dict()
    for net in ("G", "D", "G_ema"):
        changed = [k for k in final[net] if not torch.equal(final[net][k], initial[net][k])]
        assert "blocks.4.conv.weight" in changed and f"{'to_rgb' if net != 'D' else 'from_rgb'}.8.weight" in changed
    # G_ema trails G.
    assert not torch.equal(final["G_ema"]["blocks.4.conv.weight"], final["G"]["blocks.4.conv.weight"])


def test_state_dict_loads_with_weights_only_and_resumes_exactly():
    tr = _trainer(dtype=torch.float32)
    for i in range(2):
        tr.train_step(_reals(8, 8, seed=i, dtype=torch.float32), 8, 0.5)
    buf = io.BytesIO()
    torch.save(tr.state_dict(), buf)
    tr.train_step(_reals(8, 8, seed=9, dtype=torch.float32), 8, 0.5)
    buf.seek(0)
    resumed = _trainer(dtype=torch.float32, seed=0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.nimg == 16 and resumed.counters.steps == 2
    resumed.train_step(_reals(8, 8, seed=9, dtype=torch.float32), 8, 0.5)  # same noise: a function of the step
    _assert_states_close(resumed.state_dict(), tr.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("saved_cl,loaded_cl", [(True, False), (False, True)])
def test_a_checkpoint_resumes_under_the_other_memory_layout(saved_cl, loaded_cl):
    # Weights and Adam moments are stored in the layout of the activations (NHWC with channels_last). Fused
    # Adam walks parameter, gradient and moments as flat memory: a moment loaded in the other layout must be
    # laid out again, or it is updated at the wrong elements.
    tr = _trainer(options=StepOptions(channels_last=saved_cl))
    for i in range(2):
        tr.train_step(_reals(8, 8, seed=i), 8, 0.5)
    buf = io.BytesIO()
    torch.save(tr.state_dict(), buf)
    tr.train_step(_reals(8, 8, seed=9), 8, 0.5)
    buf.seek(0)
    resumed = _trainer(options=StepOptions(channels_last=loaded_cl))
    assert resumed.opt_D.defaults.get("fused")  # the case that needs the layouts to agree
    conv = resumed.D.blocks["8"].conv0.weight
    assert conv.is_contiguous(memory_format=torch.channels_last if loaded_cl else torch.contiguous_format)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for opt in (resumed.opt_G, resumed.opt_D):
        for p, st in opt.state.items():
            assert st["exp_avg"].stride() == p.stride() and st["exp_avg_sq"].stride() == p.stride()
    resumed.train_step(_reals(8, 8, seed=9), 8, 0.5)
    _assert_states_close(resumed.state_dict(), tr.state_dict(), rtol=1e-7, atol=1e-9)


def test_speed_levers_do_not_change_the_math():
    reference = _trainer()
    variants = [_trainer(options=StepOptions(no_grad_fakes=False, freeze_d_in_g_step=False,
                                             fused_adam=False, channels_last=False, one_d_pass=False))]
    scaled = _trainer(options=StepOptions(channels_last=True))
    for net in (scaled.G, scaled.D, scaled.G_ema):
        for m in net.modules():
            if hasattr(m, "scale_mode"):
                m.scale_mode = "output"
    variants.append(scaled)
    aten = _trainer()
    for m in aten.D.modules():
        if hasattr(m, "fast_double_backward"):
            m.fast_double_backward = False  # PyTorch's own double backward for the gradient penalty
    variants.append(aten)
    variants.append(_trainer(options=StepOptions(device_skip=True)))  # the sync-free skip path (CUDA's default)
    for i in range(2):
        x = _reals(8, 16, seed=i)
        for tr in (reference, *variants):
            tr.train_step(x, 16, 0.5)
    for tr in variants:
        _assert_states_close(tr.state_dict(), reference.state_dict(), rtol=1e-7, atol=1e-9)


def test_compiled_step_equals_the_eager_step_through_a_fade_in_and_a_stable_step():
    # aot_eager: dynamo's graphs and AOTAutograd's joint forward/backward, run without code generation (the
    # inductor backend adds kernels, not math). The gradient penalty's D stays eager; G_ema is never compiled.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = _trainer()
    compiled = _trainer(options=StepOptions(compile=True, compile_backend="aot_eager"))
    graphs = []
    for res, alpha, seed in ((8, 1.0, 0), (16, 0.25, 1), (16, 0.5, 2), (16, 0.75, 3), (16, 1.0, 4)):
        for tr in (eager, compiled):
            tr.train_step(_reals(8, res, seed=seed), res, alpha)
        graphs.append(counters["stats"]["unique_graphs"])
    _assert_states_close(compiled.state_dict(), eager.state_dict(), rtol=1e-7, atol=1e-9)
    assert graphs[0] > 0  # it did compile
    assert graphs[1] == graphs[2] == graphs[3] < graphs[4], graphs  # a new alpha is not a new graph


@pytest.mark.parametrize("kind", ["wgan-gp", "lsgan"])
def test_bf16_autocast_on_cpu_tracks_fp32(kind):
    runs = {}
    for amp in ("none", "bf16"):
        tr = _trainer(dtype=torch.float32, loss=LossSection(kind=kind), options=StepOptions(amp=amp))
        assert tr.amp_dtype == (torch.bfloat16 if amp == "bf16" else None)
        outs = [tr.train_step(_reals(8, 16, seed=i, dtype=torch.float32), 16, 0.5) for i in range(2)]
        runs[amp] = [{k: float(v) for k, v in out.items()} for out in outs]
    for ref, low in zip(runs["none"], runs["bf16"]):
        assert low["nonfinite"] == 0.0 and all(math.isfinite(v) for v in low.values())
        assert (low["gp"] == 0.0) == (kind == "lsgan")
        for key in ("loss_D", "loss_G", "score_real"):
            assert low[key] == pytest.approx(ref[key], rel=0.05, abs=0.05)


def test_noise_is_a_function_of_seed_rank_and_step():
    a, b = _trainer(seed=3), _trainer(seed=3)
    na, nb = a.sample_noise(4, step=7), b.sample_noise(4, step=7)
    assert torch.equal(na.z_d, nb.z_d) and torch.equal(na.mix, nb.mix)
    assert not torch.equal(na.z_d, na.z_g)
    assert not torch.equal(na.z_d, a.sample_noise(4, step=8).z_d)


# ------------------------------------------------------------------------------------ 2-process gloo group

# (res, alpha): a fade-in, then stable; the 16x16 block is unused. The allreduce mode's first backward per
# (network, res, fade) sums one flat buffer and fixes the bucket plan; the repeats run the overlapped buckets.
STEPS = [(8, 0.5), (8, 0.75), (8, 1.0), (8, 1.0)]
DIST_MODES = {
    "allreduce": StepOptions(),                                  # overlapped, 25 MB buckets (one bucket here)
    "allreduce-buckets": StepOptions(bucket_mb=1e-4),            # overlapped, ~100-byte buckets: many
    "allreduce-flat": StepOptions(overlap_grad_sync=False),      # one flat all-reduce after each backward
    "allreduce-device": StepOptions(device_skip=True),           # device-flag skips (the CUDA default)
    "ddp": StepOptions(),
}
PER_RANK = 4  # == mbstd group size: each rank's batch is one group


def _global_inputs(step: int):
    reals = _reals(2 * PER_RANK, 8, seed=100 + step)
    noise = _noise(2 * PER_RANK, TINY.latent_size, seed=200 + step)
    return reals, noise


def _rank_slice(noise: StepNoise, rank: int) -> StepNoise:
    # Interleaved: global sample 2i + r is rank r's sample i, so the single-process minibatch-stddev groups
    # (sample n in group n % M) are exactly the ranks' batches.
    return StepNoise(noise.z_d[rank::2], noise.z_g[rank::2], noise.mix[rank::2])


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for mode, options in DIST_MODES.items():
            # Different weight seeds per rank: the trainer must start every rank from rank 0's weights.
            tr = _trainer(dist_mode=mode.split("-")[0], seed=0 if rank == 0 else 1, options=options)
            assert tr.dist_mode == mode.split("-")[0] and tr.world_size == 2
            for step, (res, alpha) in enumerate(STEPS):
                reals, noise = _global_inputs(step)
                out = tr.train_step(reals[rank::2], res, alpha, noise=_rank_slice(noise, rank))
                assert out["nonfinite"] == 0.0
            if mode == "allreduce-buckets":  # the overlapped path ran with several buckets per backward
                assert all(len(plan.buckets) > 3 for s in tr._overlap.values() for plan in s.plans.values())
            results[mode] = tr.state_dict()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_end_with_the_weights_of_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_dist_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _trainer(seed=0)
    for step, (res, alpha) in enumerate(STEPS):
        reals, noise = _global_inputs(step)
        single.train_step(reals, res, alpha, noise=noise)
    ref = single.state_dict()
    for mode in DIST_MODES:
        _assert_states_close(ranks[0][mode], ranks[1][mode], rtol=0, atol=0)  # identical on both ranks
        _assert_states_close(ranks[0][mode], ref, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------------------- benchmarks


def test_bench_step_prints_one_json_line_per_resolution(capsys):
    from pggan.training.bench import bench_step

    from pggan.cli import build_parser

    args = build_parser().parse_args(["bench", "step", "--resolution", "4", "--resolution", "8", "--batch", "4",
                                      "--fmap-base", "32", "--fmap-max", "4", "--latent-size", "8", "--steps", "2",
                                      "--warmup", "1", "--threads", "2"])
    assert bench_step(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [rec["resolution"] for rec in lines] == [4, 8]
    for rec in lines:
        assert rec["img_per_s"] > 0 and rec["ms_per_step"] > 0 and rec["threads"] == 2
        assert rec["flop_per_step"] > 0 and rec["nonfinite"] == 0
    assert lines[1]["flop_per_step"] > lines[0]["flop_per_step"]


def _run_gpu_check(out_dir: Path, *args: str, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "service"))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/benchmarks/gpu_check.py"), str(out_dir), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    (out,) = list(Path(out_dir).glob("*.json"))
    return json.loads(out.read_text())


def test_gpu_check_script_smoke_runs_every_section_on_cpu(tmp_path):
    report = _run_gpu_check(tmp_path, "--smoke", timeout=300)
    assert report["results"] and all(r["img_per_s"] > 0 and r["flop_per_step"] > 0 for r in report["results"])
    assert {r["amp"] for r in report["results"]} == {"none", "bf16"}
    assert report["consistency"]["ok"] is True and report["host_syncs"]["ok"] is True
    assert report["allreduce"]["rows"] and report["projection"]
    ab = report["ab"]
    assert ab["runs"]["fp32"]["kimg"] == ab["runs"]["bf16"]["kimg"] > 0  # equal kimg
    assert all(math.isfinite(r["swd_avg"]) for r in ab["runs"].values()) and not report["errors"]
    (row,) = report["compile"]["rows"]  # traced with aot_eager on CPU: the same math as eager
    assert row["compiled_img_per_s"] > 0 and row["loss_D_rel_diff"] < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_on_the_gpu_is_consistent_sync_free_and_measures_every_resolution(tmp_path):
    report = _run_gpu_check(tmp_path, "--budget-s", "540", timeout=660)
    assert report["consistency"]["ok"] and report["host_syncs"]["ok"]
    assert report["host_syncs"]["local"]["checked"] and report["host_syncs"]["allreduce"]["checked"]
    measured = {(r["resolution"], r["amp"]) for r in report["results"]}
    assert measured >= {(r, a) for r in (4, 1024) for a in ("none", "bf16")}
    assert any("speedup" in row for row in report["compile"]["rows"])
