"""PG-GAN networks against the paper and the official code: sizes, fade-in, fused resampling, layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pggan.config import ModelSection
from pggan.models import (
    ConvDown2d,
    Discriminator,
    EqualizedConv2d,
    EqualizedLinear,
    Generator,
    MinibatchStdDev,
    PixelNorm,
    UpConv2d,
    blend_reals,
    build_networks,
    num_channels,
)
from pggan.models.layers import conv2d, downsample_kernel, input_grads_only, lrelu, upsample_kernel

torch.set_num_threads(2)

RESOLUTIONS = [4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _tiny(max_res: int = 16, fused: bool = True, mbstd: int = 2, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    g = Generator(latent_size=8, max_resolution=max_res, fmap_base=32, fmap_max=6, fused_scale=fused).to(dtype)
    d = Discriminator(max_resolution=max_res, fmap_base=32, fmap_max=6, mbstd_group_size=mbstd,
                      fused_scale=fused).to(dtype)
    _randomize_biases(g, d)
    return g, d


@torch.no_grad()
def _randomize_biases(*nets: torch.nn.Module) -> None:
    # Biases start at 0; random ones make the tests see them.
    for net in nets:
        for name, p in net.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.3)


# ------------------------------------------------------------------------------------------ architecture


def test_channel_rule_gives_the_papers_widths():
    assert [num_channels(r, 8192, 512) for r in RESOLUTIONS] == [512, 512, 512, 512, 256, 128, 64, 32, 16]
    assert num_channels(2, 8192, 512) == 512  # D's penultimate dense layer
    assert [num_channels(r, 8192, 128) for r in (8, 16, 32, 64)] == [128] * 4


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def test_parameter_counts_at_1024_match_the_official_layer_list():
    ch = dict(zip(RESOLUTIONS, [512, 512, 512, 512, 256, 128, 64, 32, 16]))
    # G: dense latent -> 4x4x512 (bias per channel), conv3x3; per block upconv3x3 + conv3x3; toRGB per res.
    g_expected = 512 * 512 * 16 + 512 + _conv(512, 512, 3)
    g_expected += sum(_conv(ch[r // 2], ch[r], 3) + _conv(ch[r], ch[r], 3) for r in RESOLUTIONS[1:])
    g_expected += sum(_conv(ch[r], 3, 1) for r in RESOLUTIONS)
    # D: fromRGB per res; per block conv3x3 + conv3x3-down; mbstd conv3x3 (513 in), dense 8192 -> 512, dense -> 1.
    d_expected = sum(_conv(3, ch[r], 1) for r in RESOLUTIONS)
    d_expected += sum(_conv(ch[r], ch[r], 3) + _conv(ch[r], ch[r // 2], 3) for r in RESOLUTIONS[1:])
    d_expected += _conv(513, 512, 3) + (512 * 16 * 512 + 512) + (512 + 1)
    with torch.device("meta"):
        g, d = build_networks(ModelSection())
    g_count = sum(p.numel() for p in g.parameters())
    d_count = sum(p.numel() for p in d.parameters())
    assert g_count == g_expected == 23_079_115
    assert d_count == d_expected == 23_087_249


def test_blocks_are_named_by_resolution():
    with torch.device("meta"):
        g, d = build_networks(ModelSection(max_resolution=32))
    assert list(g.blocks) == ["4", "8", "16", "32"] and list(g.to_rgb) == ["4", "8", "16", "32"]
    assert list(d.from_rgb) == ["4", "8", "16", "32"] and sorted(d.blocks, key=int) == ["4", "8", "16", "32"]


def test_output_shapes_at_every_resolution():
    torch.manual_seed(0)
    g = Generator(latent_size=8, max_resolution=1024, fmap_base=2048, fmap_max=4)
    d = Discriminator(max_resolution=1024, fmap_base=2048, fmap_max=4)
    z = torch.randn(2, 8)
    with torch.no_grad():
        for res in RESOLUTIONS:
            for alpha in (1.0, 0.5):
                img = g(z, res, alpha)
                assert img.shape == (2, 3, res, res)
                assert d(img, res, alpha).shape == (2,)
    with pytest.raises(ValueError):
        g(z, 2048, 1.0)
    with pytest.raises(ValueError):
        g(z, 24, 1.0)


# ------------------------------------------------------------------------------------------------ fade-in


@pytest.mark.parametrize("res", [4, 8])
def test_generator_at_alpha0_equals_the_upsampled_lower_resolution_output(res):
    g, _ = _tiny()
    z = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        low = g(z, res, 1.0)
        faded = g(z, 2 * res, 0.0)
    torch.testing.assert_close(faded, F.interpolate(low, scale_factor=2, mode="nearest"), rtol=0, atol=1e-12)


def test_generator_fade_is_the_lerp_of_the_two_paths():
    g, _ = _tiny()
    z = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        old = F.interpolate(g(z, 8, 1.0), scale_factor=2, mode="nearest")
        new = g(z, 16, 1.0)
        mid = g(z, 16, 0.3)
    torch.testing.assert_close(mid, old + 0.3 * (new - old))


@pytest.mark.parametrize("res", [4, 8])
def test_discriminator_at_alpha0_equals_the_lower_resolution_path_on_the_pooled_image(res):
    _, d = _tiny()
    x = torch.randn(4, 3, 2 * res, 2 * res, dtype=torch.float64)
    with torch.no_grad():
        faded = d(x, 2 * res, 0.0)
        low = d(F.avg_pool2d(x, 2), res, 1.0)
        # Reals blended at alpha 0 are the nearest-upsampled pooled image: D sees the same thing.
        blended = d(blend_reals(x, 2 * res, 0.0), 2 * res, 0.0)
    torch.testing.assert_close(faded, low, rtol=0, atol=1e-12)
    torch.testing.assert_close(blended, low, rtol=0, atol=1e-12)


def test_discriminator_fade_blends_the_new_block_with_the_pooled_fromrgb_path():
    _, d = _tiny()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    a = 0.7
    with torch.no_grad():
        new = d.blocks["16"](lrelu(d.from_rgb["16"](x)))
        old = lrelu(d.from_rgb["8"](F.avg_pool2d(x, 2)))
        expected = d.blocks["4"](d.blocks["8"](old + a * (new - old)))
        torch.testing.assert_close(d(x, 16, a), expected)


def test_blend_reals_is_the_lerp_with_the_pooled_then_upsampled_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8) % 7
    coarse = x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5)).repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(blend_reals(x, 8, 0.25), 0.75 * coarse + 0.25 * x)
    assert blend_reals(x, 8, 1.0) is x


# ---------------------------------------------------------------------------------------- fused resampling


@pytest.mark.parametrize("fused_cls", [UpConv2d, ConvDown2d])
def test_fused_resampling_conv_equals_the_unfused_one(fused_cls):
    torch.manual_seed(1)
    fused = fused_cls(5, 7, fused=True)
    plain = fused_cls(5, 7, fused=False)
    with torch.no_grad():
        fused.bias.normal_()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 8, 8)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    # The unfused forms are the textbook ops.
    w = fused.weight * fused.scale
    if fused_cls is UpConv2d:
        ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, fused.bias, padding=1)
    else:
        ref = F.avg_pool2d(F.conv2d(x, w, padding=1), 2) + fused.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["up", "down"])
def test_fused_kernels_derived_in_nhwc_equal_the_nchw_ones(kernel):
    # set_memory_format(channels_last) derives the 4x4 kernels straight into the layout the convolution uses.
    torch.manual_seed(3)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    derive = upsample_kernel if kernel == "up" else downsample_kernel
    nchw, nhwc = derive(w), derive(w, channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=1e-15)
    up = torch.randn_like(nchw)
    g1, = torch.autograd.grad((nchw * up).sum(), w)
    g2, = torch.autograd.grad((nhwc * up).sum(), w)
    torch.testing.assert_close(g2, g1, rtol=0, atol=1e-14)


def test_networks_in_nhwc_compute_what_they_compute_in_nchw():
    g1, d1 = _tiny(fused=True, dtype=torch.float64)
    g2, d2 = _tiny(fused=True, dtype=torch.float64)
    g2.load_state_dict(g1.state_dict())
    d2.load_state_dict(d1.state_dict())
    g2.set_memory_format(torch.channels_last)
    d2.set_memory_format(torch.channels_last)
    assert g2.blocks["8"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert d2.blocks["8"].conv0.weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(4, 8, dtype=torch.float64)
    for res, alpha in [(8, 1.0), (16, 0.4)]:
        img1, img2 = g1(z, res, alpha), g2(z, res, alpha)
        torch.testing.assert_close(img2, img1, rtol=1e-12, atol=1e-12)
        x = img1.detach().contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(d2(x, res, alpha), d1(img1.detach(), res, alpha), rtol=1e-12, atol=1e-12)
    # Same names, shapes and values either way: checkpoints load across layouts.
    sd1, sd2 = g1.state_dict(), g2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_fused_networks_equal_unfused_networks():
    g1, d1 = _tiny(fused=True, dtype=torch.float32)
    g2, d2 = _tiny(fused=False, dtype=torch.float32)
    g2.load_state_dict(g1.state_dict())
    d2.load_state_dict(d1.state_dict())
    z = torch.randn(4, 8)
    with torch.no_grad():
        for res, alpha in [(8, 1.0), (16, 0.4)]:
            img1, img2 = g1(z, res, alpha), g2(z, res, alpha)
            torch.testing.assert_close(img1, img2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(d1(img1, res, alpha), d2(img1, res, alpha), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- layers


def test_equalized_layers_store_unit_normal_weights_zero_biases_and_scale_at_run_time():
    torch.manual_seed(2)
    conv = EqualizedConv2d(64, 128, 3)
    w = conv.weight.detach()
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1.0) < 0.01
    assert torch.count_nonzero(conv.bias) == 0
    assert conv.scale == pytest.approx(math.sqrt(2) / math.sqrt(64 * 9))
    with torch.no_grad():
        conv.bias.normal_()
    for hw in (2, 16):  # small input (scale applied to x) and large input (scale applied to w)
        x = torch.randn(2, 64, hw, hw)
        torch.testing.assert_close(conv(x), F.conv2d(x, w * conv.scale, conv.bias, padding=1))
        conv.scale_mode = "output"
        torch.testing.assert_close(conv(x), F.conv2d(x, w * conv.scale, conv.bias, padding=1))
        conv.scale_mode = "operand"
    lin = EqualizedLinear(32, 16, gain=1.0)
    x = torch.randn(5, 32)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight * (1 / math.sqrt(32)), lin.bias))


def test_the_papers_gains():
    with torch.device("meta"):
        g, d = build_networks(ModelSection(max_resolution=64, latent_size=512))
    assert g.blocks["4"].dense.scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(512))
    assert g.to_rgb["64"].scale == pytest.approx(1 / math.sqrt(256))          # toRGB: gain 1, fan-in 256
    assert g.blocks["64"].conv0.scale == pytest.approx(math.sqrt(2 / (512 * 9)))
    assert d.blocks["4"].dense1.scale == pytest.approx(1 / math.sqrt(512))     # last dense: gain 1
    assert d.blocks["4"].dense0.scale == pytest.approx(math.sqrt(2 / (512 * 16)))
    assert d.from_rgb["64"].scale == pytest.approx(math.sqrt(2 / 3))


def test_pixelnorm_output_has_unit_rms_per_pixel():
    x = torch.randn(3, 16, 5, 5) * torch.rand(3, 1, 5, 5) * 10
    y = PixelNorm()(x)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(3, 5, 5), rtol=1e-4, atol=1e-4)
    # Direction per pixel is kept.
    torch.testing.assert_close(y / y.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("n, group_size, g", [(4, 2, 2), (6, 4, 3), (8, 4, 4), (3, 4, 3)])
def test_minibatch_stddev_matches_a_hand_computation(n, group_size, g):
    torch.manual_seed(3)
    x = torch.randn(n, 3, 2, 2, dtype=torch.float64)
    y = MinibatchStdDev(group_size)(x)
    assert y.shape == (n, 4, 2, 2)
    torch.testing.assert_close(y[:, :3], x)
    m = n // g
    for i in range(n):
        group = [j for j in range(n) if j % m == i % m]  # official layout: reshape(G, M, ...)
        assert len(group) == g
        vals = x[group]                                       # [G, C, H, W]
        pop_std = ((vals - vals.mean(0)) ** 2).mean(0).add(1e-8).sqrt()
        expected = pop_std.mean().item()
        torch.testing.assert_close(y[i, 3], torch.full((2, 2), expected, dtype=torch.float64))


@pytest.mark.parametrize("n, group_size", [(8, 4), (6, 4), (4, 2)])
def test_minibatch_stddev_segments_are_independent_minibatches(n, group_size):
    torch.manual_seed(4)
    a, b = torch.randn(n, 3, 2, 2, dtype=torch.float64), torch.randn(n, 3, 2, 2, dtype=torch.float64)
    layer = MinibatchStdDev(group_size)
    torch.testing.assert_close(layer(torch.cat([a, b]), segments=2), torch.cat([layer(a), layer(b)]))
    # Without segments the groups mix the two halves: a different statistic.
    assert not torch.allclose(layer(torch.cat([a, b]))[:n, 3], layer(a)[:, 3])


def test_discriminator_scores_two_segments_as_two_separate_passes():
    torch.manual_seed(5)
    d = Discriminator(max_resolution=16, fmap_base=64, fmap_max=16).double()
    reals, fakes = torch.randn(2, 8, 3, 16, 16, dtype=torch.float64).unbind(0)
    for alpha in (0.3, 1.0):
        both = d(torch.cat([reals, fakes]), 16, alpha, segments=2)
        torch.testing.assert_close(both, torch.cat([d(reals, 16, alpha), d(fakes, 16, alpha)]))


def test_discriminator_without_mbstd_has_no_extra_channel():
    d = Discriminator(max_resolution=8, fmap_base=32, fmap_max=4, mbstd_group_size=0)
    assert d.blocks["4"].mbstd is None and d.blocks["4"].conv.weight.shape[1] == 4


@pytest.mark.parametrize("stride, padding, k", [(1, 1, 3), (2, 1, 4), (1, 0, 1)])
def test_fast_double_backward_conv_equals_conv2d_to_second_order(stride, padding, k):
    torch.manual_seed(4)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fast = lambda x, w, b: conv2d(x, w, b, stride, padding, fast_double_backward=True)  # noqa: E731
    torch.autograd.gradcheck(fast, (x, w, b))
    torch.autograd.gradgradcheck(fast, (x, w, b))
    # The gradient-penalty pattern: input gradient with create_graph (weight grads skipped), then d/dw.
    for fn in (fast, lambda x, w, b: F.conv2d(x, w, b, stride, padding)):
        y = torch.tanh(fn(x, w, b))  # a nonlinearity, so the penalty depends on x through the forward too
        with input_grads_only():
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        grads = torch.autograd.grad(gx.square().sum(), (w, b))
        if fn is fast:
            expected = grads
        else:
            for got, ref in zip(expected, grads):
                torch.testing.assert_close(got, ref)
