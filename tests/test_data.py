"""Data: synthetic set, box pyramid, prepare (bad files, resume), loader order across ranks, resume, CLI.

Everything runs the real code on local files; the S3 versions are in test_data_s3.py.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pggan.cli import main
from pggan.data import (box_downsample, box_pyramid, load_images, open_dataset, prepare_dataset, rank_plan,
                        render_shapes, sample_indices)
from pggan.data.prepare import part_size
from pggan.errors import UserError
from pggan.storage import Storage

ST = Storage(retry_attempts=2, retry_max_wait_s=5)


def to_float(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(u8)).float() / 127.5 - 1.0


def expected_batch(ds, res: int, idx: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    ref = ds.images(res, idx).copy()
    ref[flips] = ref[flips][..., ::-1]
    return to_float(ref)


def expected_order(loader, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(image indices, flips) of a loader's batch b, from the data order alone (rank_plan, epochs back to back)."""
    B, L = loader.batch_size, loader.length
    first, last = b * B // L, ((b + 1) * B - 1) // L
    plans = [rank_plan(loader.dataset.num_images, loader.chunk, loader.window, loader.seed, e, loader.rank,
                       loader.world_size) for e in range(first, last + 1)]
    idx = np.concatenate([p[0] for p in plans])[b * B - first * L:(b + 1) * B - first * L]
    flips = np.concatenate([p[1] for p in plans])[b * B - first * L:(b + 1) * B - first * L]
    return idx, flips & loader.mirror


def write_pngs(folder: Path, imgs: np.ndarray, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(imgs):
        Image.fromarray(a.transpose(1, 2, 0)).save(folder / f"img{start + i:04d}.png")


@pytest.fixture(scope="module")
def clean_src(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """130 PNGs at 16x16 (3 parts of the source: 64 + 64 + 2 files)."""
    folder = tmp_path_factory.mktemp("clean") / "src"
    imgs = render_shapes(7, np.arange(130), 16)
    write_pngs(folder, imgs)
    assert part_size(130) == 64
    return folder, imgs


@pytest.fixture(scope="module")
def clean_ds(clean_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("clean") / "prepared"
    prepare_dataset(str(clean_src[0]), str(dst), ST, 16, workers=1, progress=False)
    return dst


# ---- the box pyramid ------------------------------------------------------------------------------

def test_box_pyramid_equals_hand_computation_with_official_rounding():
    img = np.zeros((3, 16, 16), np.uint8)
    # 8x8 level, one 2x2 block each: means 0.5 -> 0 and 1.5 -> 2 (np.rint: half to even), 0.75 -> 1, 2.25 -> 2.
    img[1, 0:2, 0:2] = [[0, 0], [0, 1]]             # 0.25 -> 0
    img[1, 0:2, 2:4] = [[0, 0], [1, 2]]             # 0.75 -> 1
    img[1, 0:2, 4:6] = [[1, 1], [2, 2]]             # 1.5  -> 2
    img[1, 0:2, 6:8] = [[2, 2], [2, 3]]             # 2.25 -> 2
    img[1, 2:4, 0:2] = [[0, 0], [0, 1]]
    img[1, 2:4, 2:4] = [[250, 251], [252, 255]]     # 252.0
    # 4x4 level from a float cascade: the 2x2 means 0.5, 0.5, 0.5, 1.0 give 0.625 -> 1, whereas rounding the
    # 8x8 level first (0, 0, 0, 1) would give rint(0.25) = 0.
    img[0, 0:4, 0:4] = [[0, 0, 0, 0], [0, 2, 0, 2], [0, 0, 1, 1], [0, 2, 1, 1]]
    img[2] = 200
    p = box_pyramid(img)
    assert sorted(p) == [4, 8, 16]
    assert p[16] is img
    assert p[8][1, 0, :4].tolist() == [0, 1, 2, 2]
    assert p[8][1, 1, :2].tolist() == [0, 252]
    assert p[8][0, :2, :2].tolist() == [[0, 0], [0, 1]]
    assert p[4][0, 0, 0] == 1
    # channel 1, 4x4 level top-left: mean of the 4x4 block = (0+0+0+1 + 0+0+1+2 + 0+0+0+1 + 250+251+252+255)/16
    assert p[4][1, 0, 0] == np.rint((1 + 3 + 1 + 1008) / 16)         # 63.3125 -> 63
    assert (p[4][2] == 200).all() and (p[8][2] == 200).all()


def test_box_pyramid_is_rint_of_block_means_and_box_downsample_agrees():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 3, 64, 64), dtype=np.uint8)
    p = box_pyramid(img)
    for res in (32, 16, 8, 4):
        f = 64 // res
        ref = np.rint(img.astype(np.float64).reshape(2, 3, res, f, res, f).mean(axis=(3, 5))).astype(np.uint8)
        np.testing.assert_array_equal(p[res], ref)
        np.testing.assert_array_equal(box_downsample(img, res), ref)


# ---- synthetic -------------------------------------------------------------------------------------

def test_synthetic_image_depends_only_on_seed_and_index():
    all_ = render_shapes(3, np.arange(40), 32)
    some = render_shapes(3, np.array([37, 2, 20]), 32)
    np.testing.assert_array_equal(some, all_[[37, 2, 20]])
    assert all_.dtype == np.uint8 and all_.shape == (40, 3, 32, 32)
    assert not np.array_equal(render_shapes(4, np.arange(3), 32), all_[:3])
    # Every image differs from every other one and has structure (not a flat colour).
    flat = all_.reshape(40, -1)
    assert len({row.tobytes() for row in flat}) == 40
    assert (flat.std(axis=1) > 10).all()


def test_synthetic_lower_resolutions_are_the_box_pyramid_of_the_top():
    ds = open_dataset("synthetic:shapes", ST, 32, synthetic_images=100, seed=5)
    assert ds.resolutions == [4, 8, 16, 32] and ds.max_resolution == 32 and ds.num_images == 100
    idx = np.array([99, 0, 17, 17])
    top = ds.images(32, idx)
    pyr = box_pyramid(top)
    for res in (4, 8, 16):
        np.testing.assert_array_equal(ds.images(res, idx), pyr[res])


def test_unknown_synthetic_kind_and_bad_resolution_are_user_errors():
    with pytest.raises(UserError, match="unknown synthetic dataset"):
        open_dataset("synthetic:faces", ST, 32)
    with pytest.raises(UserError, match="power of two"):
        open_dataset("synthetic:shapes", ST, 48)


# ---- prepare ---------------------------------------------------------------------------------------

def make_messy_folder(folder: Path, R: int) -> dict[str, np.ndarray]:
    """Good images of every awkward kind plus bad files; returns {file: expected uint8 [3, R, R]}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    expected = {}
    rgb = rng.integers(0, 256, size=(R, R, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "plain.png")
    expected["plain.png"] = rgb.transpose(2, 0, 1)
    gray = rng.integers(0, 256, size=(R, R), dtype=np.uint8)
    Image.fromarray(gray, "L").save(folder / "gray.png")
    expected["gray.png"] = np.stack([gray] * 3)
    rgba = rng.integers(0, 256, size=(R, R, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((R, R)) < 0.5, 0, 255)   # transparent -> white, opaque -> its colour
    (folder / "sub").mkdir()
    Image.fromarray(rgba, "RGBA").save(folder / "sub" / "rgba.png")
    exp = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    expected["sub/rgba.png"] = exp.transpose(2, 0, 1)
    wide = rng.integers(0, 256, size=(R, R + 6, 3), dtype=np.uint8)    # center crop: columns 3 .. 3+R
    Image.fromarray(wide).save(folder / "wide.png")
    expected["wide.png"] = wide[:, 3:3 + R].transpose(2, 0, 1)
    big = rng.integers(0, 256, size=(2 * R + 2, 2 * R, 3), dtype=np.uint8)   # tall: rows 1 .. 1+2R, then Lanczos
    Image.fromarray(big).save(folder / "big.webp", lossless=True)
    ref = Image.fromarray(big).resize((R, R), Image.Resampling.LANCZOS, box=(0, 1, 2 * R, 2 * R + 1))
    expected["big.webp"] = np.asarray(ref).transpose(2, 0, 1)
    # Bad: a truncated JPEG, a text file named .png, an image below the target resolution.
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    Image.fromarray(rgb[: R // 2, : R // 2]).save(folder / "small.png")
    (folder / "README.txt").write_text("ignored: not an image extension")
    return expected


def test_prepare_decodes_odd_images_and_lists_bad_ones(tmp_path):
    R = 16
    expected = make_messy_folder(tmp_path / "src", R)
    res = prepare_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), ST, R, max_bad_fraction=0.5,
                          workers=1, progress=False)
    m = res.manifest
    assert m["num_images"] == 5 and m["num_files"] == 8 and m["ignored_files"] == 1
    reasons = {b["file"]: b["reason"] for b in m["bad_files"]}
    assert sorted(reasons) == ["notes.png", "small.png", "truncated.jpg"]
    assert reasons["small.png"].startswith("too small: 8x8 is below 16x16")
    assert reasons["notes.png"].startswith("cannot decode") and "truncated" in reasons["truncated.jpg"]
    ds = open_dataset(str(tmp_path / "dst"), ST, R)
    record = json.loads((tmp_path / "dst" / "parts" / "p00000.json").read_text())
    top = ds.images(R, np.arange(ds.num_images))
    for i, name in enumerate(record["images"]):              # the record names the file of every image
        np.testing.assert_array_equal(top[i], expected[name], err_msg=name)
    for res_ in (4, 8):
        np.testing.assert_array_equal(ds.images(res_, np.arange(5)), box_pyramid(top)[res_])


def test_too_many_bad_files_fail_with_one_clear_error_naming_them(tmp_path):
    make_messy_folder(tmp_path / "src", 16)
    with pytest.raises(UserError) as e:
        prepare_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), ST, 16, workers=1, progress=False)
    msg = str(e.value)
    assert "3 of 8 source files" in msg and "max_bad_fraction=0.01" in msg
    assert "too small (e.g. small.png" in msg and "unreadable" in msg
    assert not (tmp_path / "dst" / "manifest.json").exists()


def test_small_images_are_upscaled_when_asked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    small = np.random.default_rng(2).integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
    Image.fromarray(small).save(src / "small.png")
    res = prepare_dataset(str(src), str(tmp_path / "dst"), ST, 16, upscale_small=True, workers=1, progress=False)
    assert res.manifest["num_images"] == 1 and res.manifest["upscaled_files"] == ["small.png"]
    ref = Image.fromarray(small).resize((16, 16), Image.Resampling.LANCZOS, box=(1, 0, 9, 8))
    got = open_dataset(str(tmp_path / "dst"), ST, 16).images(16, [0])[0]
    np.testing.assert_array_equal(got, np.asarray(ref).transpose(2, 0, 1))


def read_all(url: Path | str, res: int) -> np.ndarray:
    ds = open_dataset(str(url), ST, res)
    return ds.images(res, np.arange(ds.num_images))


def test_interrupted_prepare_resumes_keeping_finished_parts(clean_src, clean_ds, tmp_path):
    src, _ = clean_src
    dst = tmp_path / "dst"
    # A real write failure in part 1: a directory where one of its shards must go.
    (dst / "r0008" / "p00001-000.npy").mkdir(parents=True)
    with pytest.raises(UserError, match=r"prepare stopped in part 1: .* 1 finished part\(s\) are kept; re-run"):
        prepare_dataset(str(src), str(dst), ST, 16, workers=1, progress=False)
    assert not (dst / "manifest.json").exists()                  # never looks complete
    assert (dst / "parts" / "p00000.json").exists() and not (dst / "parts" / "p00001.json").exists()
    with pytest.raises(UserError, match="unfinished prepared dataset"):
        open_dataset(str(dst), ST, 16)
    (dst / "r0008" / "p00001-000.npy").rmdir()
    res = prepare_dataset(str(src), str(dst), ST, 16, workers=1, progress=False)
    assert (res.parts_reused, res.parts_built) == (1, 2)
    for r in (4, 8, 16):
        np.testing.assert_array_equal(read_all(dst, r), read_all(clean_ds, r))


def test_rerun_verifies_checksums_and_redoes_damaged_parts(clean_src, clean_ds, tmp_path):
    src, _ = clean_src
    dst = tmp_path / "dst"
    shutil.copytree(clean_ds, dst)
    again = prepare_dataset(str(src), str(dst), ST, 16, workers=1, progress=False)
    assert again.already_complete                                # complete: nothing redone
    (dst / "manifest.json").unlink()                             # as if killed before the manifest...
    (dst / "r0016" / "p00001-000.npy").unlink()                  # ...with one shard lost
    shard = dst / "r0004" / "p00002-000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF                                             # and one silently damaged (same size)
    shard.write_bytes(bytes(data))
    res = prepare_dataset(str(src), str(dst), ST, 16, workers=1, progress=False)
    assert (res.parts_reused, res.parts_built) == (1, 2)
    for r in (4, 8, 16):
        np.testing.assert_array_equal(read_all(dst, r), read_all(clean_ds, r))


def test_prepared_images_are_the_sources_decoded_once(clean_src, clean_ds):
    _, imgs = clean_src
    got = read_all(clean_ds, 16)
    assert got.shape == (130, 3, 16, 16)
    # Stored in a shuffled order; as a set, exactly the source images.
    assert sorted(a.tobytes() for a in got) == sorted(a.tobytes() for a in imgs)
    m = json.loads((clean_ds / "manifest.json").read_text())
    assert m["resolutions"] == [4, 8, 16] and m["num_images"] == 130 and m["bad_files"] == []
    assert all(len(s["sha256"]) == 64 for shards in m["shards"].values() for s in shards)


def test_zip_source_gives_the_same_dataset_as_the_folder(clean_src, clean_ds, tmp_path):
    src, _ = clean_src
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in sorted(src.iterdir()):
            f.write(p, arcname=f"photos/{p.name}")
    prepare_dataset(str(z), str(tmp_path / "dst"), ST, 16, workers=1, progress=False)
    for r in (4, 16):
        got, ref = read_all(tmp_path / "dst", r), read_all(clean_ds, r)
        assert sorted(a.tobytes() for a in got) == sorted(a.tobytes() for a in ref)


def test_prepare_rejects_a_destination_holding_another_dataset(clean_src, clean_ds):
    with pytest.raises(UserError, match="already holds a dataset prepared from .* at 16x16"):
        prepare_dataset(str(clean_src[0]), str(clean_ds), ST, 8, workers=1, progress=False)
    with pytest.raises(UserError, match="no such folder"):
        prepare_dataset(str(clean_src[0]) + "-missing", str(clean_ds) + "-x", ST, 8, workers=1, progress=False)


# ---- loading ---------------------------------------------------------------------------------------

def test_rank_plans_are_disjoint_and_cover_every_image_once_per_epoch():
    n, world = 103, 3
    for epoch in range(3):
        plans = [rank_plan(n, 5, 16, seed=9, epoch=epoch, rank=r, world_size=world)[0] for r in range(world)]
        assert [len(p) for p in plans] == [35, 34, 34]
        assert sorted(np.concatenate(plans).tolist()) == list(range(n))
    e0 = rank_plan(n, 5, 16, 9, 0, 0, world)[0]
    e1 = rank_plan(n, 5, 16, 9, 1, 0, world)[0]
    assert not np.array_equal(e0, e1)                            # reshuffled every epoch
    np.testing.assert_array_equal(e0, rank_plan(n, 5, 16, 9, 0, 0, world)[0])   # and reproducible


def test_loaders_of_all_ranks_yield_their_disjoint_shares(clean_ds):
    ds = open_dataset(str(clean_ds), ST, 16)
    ds.chunk_bytes, ds.window_bytes = 3 * 8 * 8 * 5, 3 * 8 * 8 * 16   # 5-image chunks, 16-image windows
    world, B = 3, 4
    seen, seen_next = [], []
    for rank in range(world):
        with ds.loader(8, rank=rank, world_size=world, batch_size=B, seed=1, mirror=True) as it:
            length = it.length
            n_batches = -(-2 * length // B)                       # two epochs and a bit
            got = [next(it) for _ in range(n_batches)]
        stream_idx, stream_flips = [], []
        for b, x in enumerate(got):
            idx, flips = expected_order(it, b)
            assert x.shape == (B, 3, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
            assert torch.equal(x, expected_batch(ds, 8, idx, flips))
            stream_idx.append(idx)
            stream_flips.append(flips)
        stream = np.concatenate(stream_idx)
        seen.append(stream[:length])                              # epoch 0 of this rank
        seen_next.append(stream[length:2 * length])               # epoch 1
        assert 0.2 < np.concatenate(stream_flips).mean() < 0.8   # mirror flips about half
    assert [len(s) for s in seen] == [44, 43, 43]
    assert sorted(np.concatenate(seen).tolist()) == list(range(130))
    assert sorted(np.concatenate(seen_next).tolist()) == list(range(130))
    assert not all(set(a) == set(b) for a, b in zip(seen, seen_next))   # shares are redrawn each epoch


def test_start_batch_resumes_exactly_where_continuing_would_be(clean_ds):
    ds = open_dataset(str(clean_ds), ST, 16)
    ds.window_bytes = 3 * 16 * 16 * 10
    with ds.loader(16, rank=1, world_size=2, batch_size=6, seed=4, mirror=True) as it:
        full = [next(it) for _ in range(30)]                      # crosses two epoch boundaries (65 per epoch)
    with ds.loader(16, rank=1, world_size=2, batch_size=6, seed=4, mirror=True, start_batch=13) as it:
        resumed = [next(it) for _ in range(17)]
    for a, b in zip(full[13:], resumed):
        assert torch.equal(a, b)
    with ds.loader(16, rank=1, world_size=2, batch_size=6, seed=5, mirror=True) as it:
        assert not torch.equal(next(it), full[0])                 # the seed matters


def test_a_rank_reads_only_its_share_of_one_resolution(clean_ds, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(clean_ds, dst)
    ds = open_dataset(str(dst), ST, 16)
    # One chunk (2 MiB holds the whole 8x8 level), so rank 0 of 2 owns images 0..64: shards of parts 0 and 1.
    assert ds.chunk_size(8) >= 130
    shutil.rmtree(dst / "r0016")
    shutil.rmtree(dst / "r0004")
    (dst / "r0008" / "p00002-000.npy").unlink()
    with ds.loader(8, rank=0, world_size=2, batch_size=16, seed=0, mirror=False) as it:
        got = [next(it) for _ in range(10)]                       # 160 images: two and a half epochs
    assert all(x.shape == (16, 3, 8, 8) for x in got)
    with ds.loader(8, rank=1, world_size=2, batch_size=16, seed=0, mirror=False) as it:
        with pytest.raises(FileNotFoundError):                    # the deleted shard is rank 1's
            for _ in range(10):
                next(it)


def test_synthetic_loader_matches_images_and_resumes():
    ds = open_dataset("synthetic:shapes", ST, 16, synthetic_images=70, seed=2)
    with ds.loader(8, rank=0, world_size=1, batch_size=32, seed=3, mirror=True) as it:
        full = [next(it) for _ in range(6)]
        for b in range(6):
            assert torch.equal(full[b], expected_batch(ds, 8, *expected_order(it, b)))
    with ds.loader(8, rank=0, world_size=1, batch_size=32, seed=3, mirror=True, start_batch=4) as it:
        assert torch.equal(next(it), full[4]) and torch.equal(next(it), full[5])
    assert float(full[0].min()) >= -1.0 and float(full[0].max()) <= 1.0


def test_load_images_is_a_seeded_subset_and_wraps(clean_ds):
    a = load_images(str(clean_ds), ST, 8, 50, seed=1)
    b = load_images(str(clean_ds), ST, 8, 50, seed=1)
    c = load_images(str(clean_ds), ST, 8, 50, seed=2)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 3, 8, 8) and not np.array_equal(a, c)
    assert len({x.tobytes() for x in a}) == 50                    # no repeats while n <= N
    wrapped = load_images(str(clean_ds), ST, 4, 300, seed=1)
    allimg = read_all(clean_ds, 4)
    assert sorted(x.tobytes() for x in wrapped[:130]) == sorted(x.tobytes() for x in allimg)
    # Synthetic reals at 8x8 of a dataset whose top is 32: the same box pyramid training sees.
    syn = load_images("synthetic:shapes", ST, 8, 10, seed=0, max_resolution=32, synthetic_images=64)
    ds = open_dataset("synthetic:shapes", ST, 32, synthetic_images=64)
    np.testing.assert_array_equal(syn, ds.images(8, sample_indices(64, 10, seed=0)))


def test_open_dataset_prepares_a_folder_once_into_the_cache(clean_src, tmp_path):
    cache = tmp_path / "cache"
    ds = open_dataset(str(clean_src[0]), ST, 8, cache_url=str(cache))
    assert ds.num_images == 130 and ds.resolutions == [4, 8]
    (manifest,) = list(cache.glob("*/manifest.json"))
    stamp = json.loads(manifest.read_text())["created_unix"]
    ds2 = open_dataset(str(clean_src[0]), ST, 8, cache_url=str(cache))
    assert ds2.source == ds.source and json.loads(manifest.read_text())["created_unix"] == stamp
    with pytest.raises(UserError, match="prepared up to 8x8, but 16x16 is needed"):
        open_dataset(ds.source, ST, 16)


# ---- command line ----------------------------------------------------------------------------------

def test_cli_prepare_in_processes_prints_a_summary(clean_src, clean_ds, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["prepare", str(clean_src[0]), str(dst), "--resolution", "16", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "prepared 130 images from 130 files" in out and "parts built 3, reused 0" in out
    np.testing.assert_array_equal(read_all(dst, 16), read_all(clean_ds, 16))
    assert main(["prepare", str(clean_src[0]), str(dst), "--resolution", "16"]) == 0
    assert "already prepared (130 images, 4..16)" in capsys.readouterr().out
    assert main(["prepare", str(clean_src[0]), str(dst), "--resolution", "12"]) == 2
    assert "--resolution 12 must be a power of two" in capsys.readouterr().err


def test_cli_bench_data_prints_one_json_line_per_resolution(clean_ds, capsys):
    assert main(["bench", "data", "--resolution", "8", "--resolution", "16", "--batch", "8",
                 "--images", "64", "--source", str(clean_ds)]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [x["resolution"] for x in lines] == [8, 16]
    assert all(x["img_per_s"] > 0 and x["images"] == 64 and x["dataset_images"] == 130 for x in lines)
    assert main(["bench", "data", "--resolution", "8", "--images", "32"]) == 0
    (line,) = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert line["source"] == "synthetic:shapes" and line["img_per_s"] > 0
