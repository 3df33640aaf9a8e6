"""SWD (paper section 5): the pyramid, the 1-D Wasserstein kernel, and the metric against a loop-based reference
written here from the paper's description, plus its behaviour on real-like, blurred and colour-shifted sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pggan.metrics import laplacian_pyramid, reconstruct, swd, wasserstein1
from pggan.metrics.patches import directions, patch_positions
from pggan.metrics.pyramid import pyr_down, pyr_up, swd_levels


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- procedural "real" images --------------------------------------------------------------------------------

def shapes(n: int, res: int, seed: int) -> np.ndarray:
    """Real-like images: a warm vertical gradient and 3-6 flat rectangles/ellipses with colours R >= G >= B.

    uint8 [n, 3, res, res]. Different seeds are independent samples of one distribution.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float64) / res
    out = np.empty((n, 3, res, res), np.uint8)
    for i in range(n):
        top = np.sort(rng.uniform(60, 255, 3))[::-1]
        bottom = np.sort(rng.uniform(0, 200, 3))[::-1]
        img = top[:, None, None] * (1 - yy) + bottom[:, None, None] * yy
        for _ in range(rng.integers(3, 7)):
            col = np.sort(rng.uniform(0, 255, 3))[::-1]
            cy, cx = rng.uniform(0.1, 0.9, 2)
            hy, hx = rng.uniform(0.05, 0.3, 2)
            if rng.random() < 0.5:
                m = (np.abs(yy - cy) < hy) & (np.abs(xx - cx) < hx)
            else:
                m = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 < 1
            img[:, m] = col[:, None]
        out[i] = np.clip(np.rint(img), 0, 255)
    return out


def blurred(x: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur: loses the finest detail, keeps the coarse structure."""
    t = torch.from_numpy(x).float()
    n, c, h, w = t.shape
    k = torch.tensor([1.0, 2.0, 1.0])
    k2 = (k[:, None] * k[None, :]) / 16
    y = F.conv2d(F.pad(t.view(-1, 1, h, w), (1, 1, 1, 1), mode="replicate"), k2[None, None])
    return y.view(n, c, h, w).round().byte().numpy()


def colour_shifted(x: np.ndarray) -> np.ndarray:
    """Washed-out, blue-tinted colours (60% towards grey, +20 blue): the colour statistics change at every scale,
    which a per-channel offset or gain alone would not do (SWD normalises each channel of each set)."""
    t = x.astype(np.float64)
    grey = t.mean(axis=1, keepdims=True)
    y = 0.4 * t + 0.6 * grey + np.array([0.0, 0.0, 20.0])[None, :, None, None]
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


# ---- loop-based reference (numpy, float64), written from the paper and cv2's definitions ---------------------

def _reflect101(i: int, n: int) -> int:
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


_TAPS = np.array([1, 4, 6, 4, 1], np.float64) / 16


def ref_pyr_down(img: np.ndarray) -> np.ndarray:
    """cv2.pyrDown of [C, H, W]: 5x5 binomial filter with reflect-101 borders, every other pixel, by loops."""
    c, h, w = img.shape
    out = np.zeros((c, h // 2, w // 2))
    for y in range(h // 2):
        for x in range(w // 2):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    out[:, y, x] += (_TAPS[dy + 2] * _TAPS[dx + 2]
                                     * img[:, _reflect101(2 * y + dy, h), _reflect101(2 * x + dx, w)])
    return out


def ref_pyr_up(img: np.ndarray) -> np.ndarray:
    """cv2.pyrUp of [C, H, W]: zeros between pixels, 4 x the binomial filter, reflect-101 in the upsampled grid."""
    c, h, w = img.shape
    up = np.zeros((c, 2 * h, 2 * w))
    up[:, ::2, ::2] = img
    out = np.zeros_like(up)
    for y in range(2 * h):
        for x in range(2 * w):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    out[:, y, x] += (4 * _TAPS[dy + 2] * _TAPS[dx + 2]
                                     * up[:, _reflect101(y + dy, 2 * h), _reflect101(x + dx, 2 * w)])
    return out


def ref_swd(reals: np.ndarray, fakes: np.ndarray, seed: int, dir_repeats: int = 4, dirs_per_repeat: int = 128,
            nh: int = 128, patch: int = 7) -> dict[str, float]:
    """SWD x1e3 per level, step by step as in the paper, one image / neighbourhood / direction at a time."""
    res = reals.shape[-1]
    levels = swd_levels(res)
    descs: list[list[list[np.ndarray]]] = [[[] for _ in levels] for _ in range(2)]
    for s, images in enumerate((reals, fakes)):
        for i, img in enumerate(images.astype(np.float64)):
            g = img
            for li in range(len(levels)):
                if li + 1 < len(levels):
                    down = ref_pyr_down(g)
                    band, g = g - ref_pyr_up(down), down
                else:
                    band = g
                ys, xs = patch_positions(seed, li, i, 1, band.shape[-1], nh, patch)
                for j in range(nh):
                    y, x = int(ys[0, j]), int(xs[0, j])
                    descs[s][li].append(band[:, y:y + patch, x:x + patch].copy())
    out = {}
    for li, lv in enumerate(levels):
        normed = []
        for s in range(2):
            d = np.stack(descs[s][li])  # [M, 3, p, p]
            d = (d - d.mean(axis=(0, 2, 3), keepdims=True)) / d.std(axis=(0, 2, 3), keepdims=True)
            normed.append(d.reshape(len(d), -1))
        dists = []
        for rep in range(dir_repeats):
            dirs = directions(seed, li, rep, normed[0].shape[1], dirs_per_repeat).double().numpy()
            for k in range(dirs_per_repeat):
                pa = np.sort(normed[0] @ dirs[:, k])
                pb = np.sort(normed[1] @ dirs[:, k])
                dists.append(np.mean(np.abs(pa - pb)))
        out[str(lv)] = float(np.mean(dists)) * 1e3
    return out


# ---- pyramid -------------------------------------------------------------------------------------------------

def test_pyr_down_of_a_ramp_matches_hand_computed_cv2_values():
    ramp = torch.arange(8, dtype=torch.float32).expand(1, 1, 8, 8).contiguous()  # x = 0..7 on every row
    # out[k] = (x[2k-2] + 4 x[2k-1] + 6 x[2k] + 4 x[2k+1] + x[2k+2]) / 16, x[-1] = x[1], x[-2] = x[2], x[8] = x[6]
    expected = torch.tensor([0.75, 2.0, 4.0, 5.875])
    assert torch.equal(pyr_down(ramp)[0, 0], expected.expand(4, 4))


def test_pyr_up_of_two_pixels_matches_hand_computed_cv2_values():
    s = torch.tensor([0.0, 4.0]).expand(1, 1, 2, 2).contiguous()  # rows [0, 4]
    # even outputs (s[k-1] + 6 s[k] + s[k+1]) / 8 with s[-1] = s[1], s[2] = s[1]; odd outputs (s[k] + s[k+1]) / 2
    expected = torch.tensor([1.0, 2.0, 3.5, 4.0])
    assert torch.equal(pyr_up(s)[0, 0], expected.expand(4, 4))


def test_pyr_down_and_up_match_the_loop_reference():
    img = shapes(2, 16, seed=3).astype(np.float64)
    down = pyr_down(torch.from_numpy(img).float())
    up = pyr_up(down)
    for i in range(2):
        np.testing.assert_allclose(down[i].numpy(), ref_pyr_down(img[i]), atol=1e-4)
        np.testing.assert_allclose(up[i].numpy(), ref_pyr_up(ref_pyr_down(img[i])), atol=1e-4)


def test_laplacian_pyramid_reconstructs_the_image_exactly():
    x = torch.from_numpy(shapes(3, 64, seed=4))
    pyr = laplacian_pyramid(x, 4)
    assert [tuple(p.shape[-2:]) for p in pyr] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    back = reconstruct(pyr)
    assert (back - x.float()).abs().max() < 1e-3
    assert torch.equal(back.round().to(torch.uint8), x)


def test_swd_levels_run_from_the_resolution_down_to_16():
    assert swd_levels(128) == [128, 64, 32, 16]
    assert swd_levels(16) == [16]
    assert swd_levels(8) == [8]  # an early stage: the image itself
    with pytest.raises(ValueError):
        swd_levels(4)


def test_swd_of_images_smaller_than_a_neighbourhood_reports_nothing_measured():
    tiny = np.zeros((4, 3, 4, 4), np.uint8)  # PG-GAN's first stage
    result = swd(tiny, tiny)
    assert result["levels"] == [] and result["swd_x1e3"] == {} and np.isnan(result["avg"])
    assert "at least 8x8" in result["skipped"]


# ---- neighbourhoods and directions ------------------------------------------------------------------------------

def test_patch_positions_are_in_range_and_independent_of_batching():
    ys, xs = patch_positions(seed=5, level=0, first_image=0, num_images=10, size=32)
    assert ys.shape == (10, 128) and ys.min() >= 0 and ys.max() <= 32 - 7 and xs.max() <= 32 - 7
    assert ys.unique().numel() == 26 and xs.unique().numel() == 26  # every valid row/column is used
    ys2, xs2 = patch_positions(seed=5, level=0, first_image=4, num_images=6, size=32)
    assert torch.equal(ys[4:], ys2) and torch.equal(xs[4:], xs2)
    ys3, _ = patch_positions(seed=6, level=0, first_image=0, num_images=10, size=32)
    assert not torch.equal(ys, ys3)


def test_directions_are_seeded_unit_vectors():
    d = directions(seed=1, level=2, repeat=3)
    assert d.shape == (147, 128)
    assert torch.allclose(d.norm(dim=0), torch.ones(128), atol=1e-6)
    assert torch.equal(d, directions(seed=1, level=2, repeat=3))
    assert not torch.equal(d, directions(seed=1, level=2, repeat=2))


# ---- the 1-D Wasserstein kernel -----------------------------------------------------------------------------------

def _w1_by_definition(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.abs(np.sort(a.double().numpy(), axis=1) - np.sort(b.double().numpy(), axis=1)).mean(axis=1)


@pytest.mark.parametrize("m", [1000, 40000])
def test_bucketed_wasserstein1_equals_the_sorted_definition(m):
    g = torch.Generator().manual_seed(m)
    a = torch.randn(6, m, generator=g)
    b = torch.randn(6, m, generator=g) * 1.03 + 0.02
    b[1] = torch.randn(m, generator=g)                          # same distribution: CDFs cross often
    b[2] = a[2]                                                 # identical: every bucket ambiguous -> sorted
    a[3], b[3] = torch.full((m,), 2.5), torch.full((m,), 2.5)   # all values equal
    a[4] = torch.randint(0, 5, (m,), generator=g).float()       # heavy ties
    b[4] = torch.randint(0, 6, (m,), generator=g).float()
    b[5] = torch.rand(m, generator=g) * 8 - 4                   # a different shape
    want = _w1_by_definition(a, b)
    got = wasserstein1(a, b, method="bucket")
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-9)
    assert got[2] == 0 and got[3] == 0
    np.testing.assert_allclose(wasserstein1(a, b, method="sort").numpy(), want, rtol=1e-9, atol=1e-12)


def test_wasserstein1_subtracts_the_shifts():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5000, generator=g), torch.randn(2, 5000, generator=g)
    sa, sb = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    want = _w1_by_definition(a - sa[:, None].float(), b - sb[:, None].float())
    for method in ("bucket", "sort"):
        np.testing.assert_allclose(wasserstein1(a, b, sa, sb, method=method).numpy(), want, rtol=1e-5)


def test_descriptor_rows_grow_in_slabs_and_switch_dtype_without_losing_order():
    from pggan.metrics.swd import _Rows

    rows = _Rows(3, torch.float32, torch.device("cpu"))
    rows.MAX_SLAB = 8
    parts = [torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100 * n for n in (1, 2, 5, 9, 3)]
    for p in parts:
        rows.append(p)
    want = torch.cat(parts)
    assert rows.rows == 20 and [s.shape[0] for s in rows.slabs] == [1, 2, 5, 8, 8]  # doubling, capped at 8
    assert torch.equal(torch.cat(list(rows.blocks())), want)
    assert torch.equal(torch.cat(list(rows.blocks(3))), want)
    rows.to_dtype(torch.float16)
    assert torch.equal(torch.cat(list(rows.blocks())), want.half())


# ---- SWD ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sets():
    return shapes(6, 32, seed=10), blurred(shapes(6, 32, seed=11))


@pytest.fixture(scope="module")
def reference(small_sets):
    return ref_swd(*small_sets, seed=7)


@pytest.mark.parametrize("method", ["sort", "bucket"])
def test_swd_matches_the_loop_reference(small_sets, reference, method):
    got = swd(*small_sets, seed=7, w1_method=method)
    assert got["levels"] == [32, 16]
    assert got["descriptors_per_level"] == 6 * 128
    for lv, value in reference.items():
        assert got["swd_x1e3"][lv] == pytest.approx(value, rel=1e-4)
    assert got["avg"] == pytest.approx(np.mean(list(reference.values())), rel=1e-4)


def test_swd_streamed_in_uneven_batches_equals_swd_of_arrays(small_sets):
    reals, fakes = small_sets
    whole = swd(reals, fakes, seed=7, dir_repeats=1)
    streamed = swd(iter([reals[:1], reals[1:5], reals[5:]]), (torch.from_numpy(f) for f in np.split(fakes, 3)),
                   seed=7, dir_repeats=1, batch=2)
    for lv in whole["swd_x1e3"]:
        assert streamed["swd_x1e3"][lv] == pytest.approx(whole["swd_x1e3"][lv], rel=1e-6)


def test_swd_float16_storage_stays_close_to_float32(small_sets):
    f32 = swd(*small_sets, seed=7, dir_repeats=1, storage="float32")
    f16 = swd(*small_sets, seed=7, dir_repeats=1, storage="float16")
    assert f16["storage"] == "float16" and f32["storage"] == "float32"
    for lv in f32["swd_x1e3"]:
        assert f16["swd_x1e3"][lv] == pytest.approx(f32["swd_x1e3"][lv], rel=1e-3)


def test_a_stream_that_outgrows_the_memory_budget_switches_both_sets_to_float16(small_sets):
    reals, fakes = small_sets
    # 6 images x 128 neighbourhoods x 147 values x 2 levels x 4 bytes = 0.9 MB per set in float32
    streamed = swd(iter([reals[:3], reals[3:]]), iter([fakes]), seed=7, dir_repeats=1, batch=3, memory_mb=1.0)
    assert streamed["storage"] == "float16"
    assert swd(iter([reals]), iter([fakes]), seed=7, dir_repeats=1, memory_mb=2.0)["storage"] == "float32"
    assert swd(reals, fakes, seed=7, dir_repeats=1, memory_mb=1.0)["storage"] == "float16"  # known size: up front
    f32 = swd(reals, fakes, seed=7, dir_repeats=1, storage="float32")
    for lv in f32["swd_x1e3"]:
        assert streamed["swd_x1e3"][lv] == pytest.approx(f32["swd_x1e3"][lv], rel=1e-3)


def test_swd_rejects_sets_of_different_sizes_or_dtypes():
    a = shapes(4, 32, seed=1)
    with pytest.raises(ValueError, match="equal-size"):
        swd(a, a[:3])
    with pytest.raises(ValueError, match="uint8"):
        swd(a.astype(np.float32), a)


@pytest.fixture(scope="module")
def behaviour():
    """SWD of one real sample against itself, a second real sample, and blurred / colour-shifted versions of it."""
    n, res = 256, 64
    reals, other = shapes(n, res, seed=1), shapes(n, res, seed=2)
    kw = dict(seed=3, dir_repeats=1, dirs_per_repeat=64)  # 64 directions: enough to rank, and quick
    return {name: swd(reals, fakes, **kw)["swd_x1e3"] for name, fakes in
            {"floor": other, "blur": blurred(other), "colour": colour_shifted(other)}.items()}


@pytest.mark.parametrize("method", ["sort", "bucket"])
def test_swd_of_a_set_against_itself_is_zero(method):
    x = shapes(8, 64, seed=1)
    assert swd(x, x.copy(), seed=3, dir_repeats=1, w1_method=method)["swd_x1e3"] == {"64": 0.0, "32": 0.0, "16": 0.0}


def test_swd_against_a_second_real_sample_is_small(behaviour):
    floor, colour = behaviour["floor"], behaviour["colour"]
    assert all(0 < floor[lv] < 0.5 * colour[lv] for lv in floor)


def test_blur_raises_swd_at_the_fine_levels_more_than_at_the_coarse(behaviour):
    floor, blur = behaviour["floor"], behaviour["blur"]
    rise = {lv: blur[lv] - floor[lv] for lv in floor}
    assert blur["64"] > 2 * floor["64"]
    assert rise["64"] > 4 * abs(rise["16"]) and rise["64"] > rise["32"]


def test_colour_shift_raises_swd_at_every_level(behaviour):
    floor, colour = behaviour["floor"], behaviour["colour"]
    assert all(colour[lv] > 2 * floor[lv] for lv in floor)
