"""MS-SSIM as the paper's official code computes it: identical images, independent noise, hand-computed values,
and a loop-based reference written here from Wang et al. 2003 and the official settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pggan.metrics import ms_ssim, ms_ssim_pairs
from pggan.metrics.msssim import gaussian_window, pair_indices

WEIGHTS = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def ref_ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of one pair [C, H, W], float64, with explicit loops over the window taps ('valid' filtering)."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    mcs, mssim = [], []
    for level in range(5):
        _, h, w = x.shape
        size = min(11, h, w)
        sigma = size * 1.5 / 11
        r = np.arange(size) - (size - 1) / 2  # fspecial: centred taps (half-integers for even sizes)
        win = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
        win /= win.sum()
        oh, ow = h - size + 1, w - size + 1

        def filt(img: np.ndarray) -> np.ndarray:
            out = np.zeros((img.shape[0], oh, ow))
            for dy in range(size):
                for dx in range(size):
                    out += win[dy, dx] * img[:, dy:dy + oh, dx:dx + ow]
            return out

        mu1, mu2 = filt(x), filt(y)
        s11 = filt(x * x) - mu1 ** 2
        s22 = filt(y * y) - mu2 ** 2
        s12 = filt(x * y) - mu1 * mu2
        cs = (2 * s12 + C2) / (s11 + s22 + C2)
        ssim = (2 * mu1 * mu2 + C1) / (mu1 ** 2 + mu2 ** 2 + C1) * cs
        mcs.append(max(cs.mean(), 0.0))
        mssim.append(max(ssim.mean(), 0.0))
        x = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4
        y = (y[:, 0::2, 0::2] + y[:, 1::2, 0::2] + y[:, 0::2, 1::2] + y[:, 1::2, 1::2]) / 4
    return float(np.prod([mcs[i] ** WEIGHTS[i] for i in range(4)]) * mssim[4] ** WEIGHTS[4])


def smooth_images(n: int, res: int, seed: int) -> np.ndarray:
    """Random smooth colour images (bilinear upsampling of 4x4 noise): structured, never identical."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    return torch.nn.functional.interpolate(low, size=res, mode="bilinear").round().byte().numpy()


def test_gaussian_window_is_matlabs_fspecial():
    taps = gaussian_window(11, 1.5)
    assert taps.sum().item() == pytest.approx(1.0)
    assert taps[5] / taps[4] == pytest.approx(math.exp(1 / (2 * 1.5 ** 2)))
    even = gaussian_window(4, 0.5)  # centred between pixels: taps at -1.5, -0.5, 0.5, 1.5
    assert torch.allclose(even, even.flip(0)) and even[1] / even[0] == pytest.approx(math.exp(1.0 / 0.5 ** 2))


def test_ms_ssim_of_identical_images_is_one():
    x = smooth_images(4, 64, seed=1)
    assert torch.allclose(ms_ssim(x, x), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_ms_ssim_of_independent_noise_is_near_zero():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (16, 3, 64, 64), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (16, 3, 64, 64), generator=g, dtype=torch.uint8)
    values = ms_ssim(a, b)
    assert values.mean() < 0.1 and values.max() < 0.25


def test_ms_ssim_of_two_flat_images_is_the_hand_computed_luminance_term():
    # Flat images have no variance: every contrast-structure term is C2 / C2 = 1 and the last scale's SSIM
    # is its luminance term, so MS-SSIM = ((2 a b + C1) / (a^2 + b^2 + C1)) ^ 0.1333.
    a = np.full((1, 3, 16, 16), 100, np.uint8)
    b = np.full((1, 3, 16, 16), 120, np.uint8)
    expected = ((2 * 100 * 120 + 6.5025) / (100 ** 2 + 120 ** 2 + 6.5025)) ** 0.1333  # 0.99780
    assert ms_ssim(a, b).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.9977997, abs=1e-7)


def test_ms_ssim_matches_the_loop_reference_on_small_pairs():
    a, b = smooth_images(3, 32, seed=3), smooth_images(3, 32, seed=4)
    b[2] = a[2] // 2 + b[2] // 2  # a correlated pair as well
    got = ms_ssim(a, b).numpy()
    want = [ref_ms_ssim(a[i], b[i]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert (got >= 0).all() and (got < 1).all() and got[2] > 0.5  # the correlated pair scores high


def test_ms_ssim_needs_room_for_five_scales():
    with pytest.raises(ValueError, match="16x16"):
        ms_ssim(np.zeros((1, 3, 8, 8), np.uint8), np.zeros((1, 3, 8, 8), np.uint8))


def test_pairs_are_seeded_distinct_and_disjoint_when_possible():
    i, j = pair_indices(100, 50, seed=0)
    assert len(set(i) | set(j)) == 100  # a permutation split in two: every image once
    i2, j2 = pair_indices(100, 500, seed=0)
    assert (i2 != j2).all() and len(i2) == 500
    assert np.array_equal(pair_indices(100, 500, seed=0)[0], i2)
    assert not np.array_equal(pair_indices(100, 500, seed=1)[0], i2)


def test_ms_ssim_pairs_averages_the_per_pair_values():
    x = smooth_images(20, 32, seed=5)
    i, j = pair_indices(20, 30, seed=7)
    assert ms_ssim_pairs(x, 30, seed=7, batch=7) == pytest.approx(float(ms_ssim(x[i], x[j]).mean()), rel=1e-12)
    twins = np.concatenate([x[:1]] * 4)  # no variety at all
    assert ms_ssim_pairs(twins, 6, seed=0) == pytest.approx(1.0)
