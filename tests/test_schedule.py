"""The stage schedule: the paper's timeline, per-preset minibatch/lr, and invariants over all image counts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pggan.config import load_config
from pggan.schedule import current_stage, stages, total_nimg


@pytest.fixture(scope="module")
def paper():
    return load_config(preset="paper")


@pytest.fixture(scope="module")
def paper8():
    return load_config(preset="paper-8gpu")


@pytest.fixture(scope="module")
def demo():
    return load_config(preset="demo")


def test_paper_timeline_reaches_1024_at_12800_kimg(paper):
    st_ = stages(paper)
    fade_1024 = next(s for s in st_ if s.resolution == 1024 and s.kind == "fade")
    stable_1024 = next(s for s in st_ if s.resolution == 1024 and s.kind == "stable")
    # 4x4 stable 800, then 7 resolutions of 800+800 (8..512), then 1024's fade-in: 12,800 kimg.
    # Stages at 256/512/1024 are quantized to whole steps of 14/6/3 images: a few images of drift at most.
    assert fade_1024.start == pytest.approx(12_000_000, abs=14 + 6 + 6)
    assert stable_1024.start == pytest.approx(12_800_000, abs=14 + 6 + 6 + 3)
    # The official v1-1gpu total_kimg 19000: the 1024x1024 stable stage goes on to 19,000 kimg.
    assert stable_1024.end == total_nimg(paper) == pytest.approx(19_000_000, abs=30)
    assert [(s.resolution, s.kind) for s in st_[:3]] == [(4, "stable"), (8, "fade"), (8, "stable")]
    assert len(st_) == 1 + 2 * 8


def in_stage(nimg, cfg):
    return current_stage(nimg, stages(cfg))


def test_paper_8x8_fades_in_over_kimg_800_to_1600(paper):
    assert in_stage(799_999, paper).resolution == 4
    at = in_stage(800_000, paper)
    assert (at.resolution, at.kind, at.alpha(800_000)) == (8, "fade", 0.0)
    assert at.start == 800_000 and at.end == 1_600_000
    assert in_stage(1_600_000, paper).kind == "stable" and in_stage(1_600_000, paper).resolution == 8


def test_alpha_is_half_in_the_middle_of_a_fade_in(paper):
    assert in_stage(1_200_000, paper).alpha(1_200_000) == pytest.approx(0.5)
    assert in_stage(1_000_000, paper).alpha(1_000_000) == pytest.approx(0.25)
    assert in_stage(400_000, paper).alpha(400_000) == 1.0  # stable stage


@pytest.mark.parametrize("res,mb", [(4, 16), (8, 16), (64, 16), (128, 16), (256, 14), (512, 6), (1024, 3)])
def test_paper_minibatch_and_lr_per_resolution(paper, res, mb):
    for s in stages(paper):
        if s.resolution == res:
            assert s.minibatch == mb and s.lr == 0.001


@pytest.mark.parametrize("res,mb,lr", [(4, 512, 0.001), (8, 256, 0.001), (16, 128, 0.001), (32, 64, 0.001),
                                       (64, 32, 0.001), (128, 32, 0.0015), (256, 32, 0.002), (512, 32, 0.003),
                                       (1024, 32, 0.003)])
def test_paper_8gpu_minibatch_and_lr_per_resolution(paper8, res, mb, lr):
    found = [s for s in stages(paper8) if s.resolution == res]
    assert found and all(s.minibatch == mb and s.lr == lr for s in found)


def test_demo_preset_stage_lengths(demo):
    got = [(s.resolution, s.kind, s.nimg, s.minibatch) for s in stages(demo)]
    # 8000/32 = 250 steps; the 8x8 fade ends at 14000 images, 437.5 steps of 32 -> 438 steps (14016):
    # boundaries are whole steps of each stage's own minibatch.
    assert got[0] == (4, "stable", 8000, 32)
    assert got[1] == (8, "fade", 6016, 32)
    assert [g[:2] for g in got] == [(4, "stable"), (8, "fade"), (8, "stable"), (16, "fade"), (16, "stable"),
                                    (32, "fade"), (32, "stable")]
    assert all(n % mb == 0 for _, _, n, mb in got)
    assert total_nimg(demo) == pytest.approx(47_000, abs=64)


def test_stages_are_contiguous_whole_steps(paper):
    st_ = stages(paper)
    assert st_[0].start == 0
    for a, b in zip(st_, st_[1:]):
        assert a.end == b.start
    assert all(s.nimg % s.minibatch == 0 for s in st_)


def test_total_kimg_past_the_end_extends_the_last_stable_stage():
    cfg = load_config(preset="demo", sets=["schedule.total_kimg=80"])
    st_ = stages(cfg)
    assert st_[-1].resolution == 32 and st_[-1].kind == "stable"
    assert total_nimg(cfg) == 80_000
    assert len(st_) == 7


def test_total_kimg_before_the_end_cuts_the_schedule():
    cfg = load_config(preset="demo", sets=["schedule.total_kimg=12"])
    st_ = stages(cfg)
    assert [(s.resolution, s.kind) for s in st_] == [(4, "stable"), (8, "fade")]
    assert total_nimg(cfg) == pytest.approx(12_000, abs=32)


def test_negative_image_count_is_rejected(demo):
    with pytest.raises(ValueError):
        in_stage(-1, demo)


@settings(max_examples=300, deadline=None)
@given(a=st.integers(0, 14_000_000), b=st.integers(0, 14_000_000))
def test_the_current_stage_is_monotone_in_nimg(paper, a, b):
    lo, hi = sorted((a, b))
    sa, sb = in_stage(lo, paper), in_stage(hi, paper)
    assert sa.index <= sb.index
    assert sa.resolution <= sb.resolution
    if sa.index == sb.index:
        assert sa.alpha(lo) <= sb.alpha(hi)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 14_000_000))
def test_every_nimg_maps_to_exactly_one_stage_with_alpha_in_unit_range(paper, n):
    at = in_stage(n, paper)
    assert 0.0 <= at.alpha(n) <= 1.0
    if n < total_nimg(paper):
        containing = [s for s in stages(paper) if s.start <= n < s.end]
        assert containing == [at]
