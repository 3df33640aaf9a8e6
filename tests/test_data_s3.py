"""Data on a real S3 endpoint: moto's server on 127.0.0.1, s3fs over HTTP (nothing mocked).

prepare from an s3:// folder to an s3:// destination and load it back (messy files included), resume after
an interruption, a folder prepared on the fly into an s3:// cache, and the clear errors for a missing bucket
or missing credentials before any work.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pggan.data import box_pyramid, open_dataset, prepare_dataset, render_shapes
from pggan.errors import UserError
from pggan.storage import Storage

from test_data import expected_order, expected_batch, make_messy_folder, write_pngs

pytestmark = pytest.mark.integration


def s3fs_for(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False)


def upload(fs, local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{url}/{p.relative_to(local).as_posix()}", p.read_bytes())


def test_prepare_from_s3_folder_to_s3_and_load_back(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    st = Storage(endpoint_url=endpoint, retry_attempts=2, retry_max_wait_s=10)
    fs = s3fs_for(endpoint)
    expected = make_messy_folder(tmp_path / "src", 16)
    upload(fs, tmp_path / "src", f"{bucket}/raw")
    res = prepare_dataset(f"s3://{bucket}/raw", f"s3://{bucket}/prepared", st, 16, max_bad_fraction=0.5,
                          workers=1, progress=False)
    m = res.manifest
    assert (m["num_images"], m["num_files"], m["ignored_files"]) == (5, 8, 1)
    assert sorted(b["file"] for b in m["bad_files"]) == ["notes.png", "small.png", "truncated.jpg"]
    assert fs.exists(f"{bucket}/prepared/manifest.json")

    ds = open_dataset(f"s3://{bucket}/prepared", st, 16)
    record = json.loads(fs.cat_file(f"{bucket}/prepared/parts/p00000.json"))
    top = ds.images(16, np.arange(5))
    for i, name in enumerate(record["images"]):
        np.testing.assert_array_equal(top[i], expected[name], err_msg=name)
    np.testing.assert_array_equal(ds.images(4, [4, 0]), box_pyramid(top[[4, 0]])[4])
    with ds.loader(8, rank=1, world_size=2, batch_size=3, seed=0, mirror=True) as it:
        for b in range(4):
            assert torch.equal(next(it), expected_batch(ds, 8, *expected_order(it, b)))


def test_interrupted_s3_prepare_resumes_in_processes(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    st = Storage(endpoint_url=endpoint, retry_attempts=2, retry_max_wait_s=10)
    fs = s3fs_for(endpoint)
    imgs = render_shapes(11, np.arange(70), 8)                    # two parts: 64 + 6 files
    write_pngs(tmp_path / "src", imgs)
    upload(fs, tmp_path / "src", f"{bucket}/raw")
    src, dst = f"s3://{bucket}/raw", f"s3://{bucket}/ds"
    first = prepare_dataset(src, dst, st, 8, workers=2, progress=False)   # spawned processes, env credentials
    assert (first.parts_built, first.manifest["num_images"]) == (2, 70)
    ref = open_dataset(dst, st, 8).images(8, np.arange(70))
    # Interrupted: manifest never written, one shard of part 1 lost.
    fs.rm_file(f"{bucket}/ds/manifest.json")
    fs.rm_file(f"{bucket}/ds/r0004/p00001-000.npy")
    with pytest.raises(UserError, match="unfinished prepared dataset"):
        open_dataset(dst, st, 8)
    again = prepare_dataset(src, dst, st, 8, workers=1, progress=False)
    assert (again.parts_reused, again.parts_built) == (1, 1)
    ds = open_dataset(dst, st, 8)
    np.testing.assert_array_equal(ds.images(8, np.arange(70)), ref)
    assert sorted(a.tobytes() for a in ref) == sorted(a.tobytes() for a in imgs)


def test_s3_folder_is_prepared_on_the_fly_into_an_s3_cache(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    st = Storage(endpoint_url=endpoint, retry_attempts=2, retry_max_wait_s=10)
    fs = s3fs_for(endpoint)
    write_pngs(tmp_path / "src", render_shapes(3, np.arange(20), 16))
    upload(fs, tmp_path / "src", f"{bucket}/photos")
    ds = open_dataset(f"s3://{bucket}/photos", st, 16, cache_url=f"s3://{bucket}/cache")
    assert ds.num_images == 20 and ds.source.startswith(f"s3://{bucket}/cache/photos-")
    assert fs.exists(f"{ds.source[len('s3://'):]}/manifest.json")
    again = open_dataset(f"s3://{bucket}/photos", st, 16, cache_url=f"s3://{bucket}/cache")
    assert again.source == ds.source and again.manifest["created_unix"] == ds.manifest["created_unix"]
    # The same images as a .zip on S3 give the same dataset.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((tmp_path / "src").iterdir()):
            z.write(p, arcname=p.name)
    fs.pipe_file(f"{bucket}/photos.zip", buf.getvalue())
    zds = open_dataset(f"s3://{bucket}/photos.zip", st, 16, cache_url=f"s3://{bucket}/cache")
    assert zds.source != ds.source and zds.url == zds.source
    np.testing.assert_array_equal(zds.images(16, np.arange(20)), ds.images(16, np.arange(20)))


def test_missing_bucket_is_a_clear_error_before_any_work(s3_server, tmp_path):
    st = Storage(endpoint_url=s3_server, retry_attempts=2, retry_max_wait_s=5)
    write_pngs(tmp_path / "src", render_shapes(0, np.arange(3), 8))
    with pytest.raises(UserError, match=r"s3://no-such-bucket-pggan/ds: the bucket does not exist"):
        prepare_dataset(str(tmp_path / "src"), "s3://no-such-bucket-pggan/ds", st, 8, workers=1, progress=False)
    with pytest.raises(UserError, match=r"s3://no-such-bucket-pggan/raw: the bucket does not exist"):
        prepare_dataset("s3://no-such-bucket-pggan/raw", str(tmp_path / "dst"), st, 8, workers=1, progress=False)
    assert not (tmp_path / "dst" / "parts").exists()              # nothing was started


def test_missing_credentials_are_a_clear_error_before_any_work(s3_bucket, tmp_path, monkeypatch):
    endpoint, bucket = s3_bucket
    write_pngs(tmp_path / "src", render_shapes(0, np.arange(3), 8))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    st = Storage(endpoint_url=endpoint, retry_attempts=2, retry_max_wait_s=5)
    with pytest.raises(UserError, match="no credentials found; set AWS_ACCESS_KEY_ID"):
        prepare_dataset(str(tmp_path / "src"), f"s3://{bucket}/ds", st, 8, workers=1, progress=False)
    with pytest.raises(UserError, match="no credentials found"):
        open_dataset(f"s3://{bucket}/ds", st, 8)
