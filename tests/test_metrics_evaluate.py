"""`launch.py evaluate` and `launch.py bench swd` end to end, and the cached real-vs-real SWD noise floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pggan.cli import main
from pggan.metrics import cached_swd_noise_floor, swd, swd_noise_floor
from pggan.storage import Storage
from test_metrics import blurred, shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def write_folder(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.transpose(1, 2, 0)).save(path / f"img{i:03d}.png")
    (path / "notes.txt").write_text("not an image")
    return path


@pytest.fixture
def folders(tmp_path):
    reals = write_folder(tmp_path / "reals", shapes(12, 32, seed=1))
    fakes = write_folder(tmp_path / "fakes", blurred(shapes(12, 64, seed=2)))  # larger: box-filtered down to 32
    return reals, fakes


def test_evaluate_two_folders_prints_a_table_and_writes_json(folders, tmp_path, capsys):
    reals, fakes = folders
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--reals", str(reals), "--fakes", str(fakes), "--metrics", "swd,msssim",
               "--images", "12", "--resolution", "32", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "SWD x1e3" in printed and "avg" in printed and "MS-SSIM" in printed
    result = json.loads(out.read_text())
    assert result["resolution"] == 32 and result["reals"] == str(reals) and result["fakes"] == str(fakes)
    s = result["swd"]
    assert s["levels"] == [32, 16] and set(s["swd_x1e3"]) == {"32", "16"} and s["images"] == 12
    assert s["avg"] == pytest.approx(np.mean(list(s["swd_x1e3"].values())))
    assert all(v > 0 for v in s["swd_x1e3"].values())
    m = result["msssim"]
    assert m["pairs"] == 12 and 0 < m["fakes"] < 1 and 0 < m["reals"] < 1
    for lv in ("32", "16"):  # the table shows the JSON's numbers
        assert f"{s['swd_x1e3'][lv]:.3f}" in printed


def test_evaluate_msssim_alone_needs_no_reals_and_prints_json_without_out(folders, capsys):
    _, fakes = folders
    assert main(["evaluate", "--fakes", str(fakes), "--metrics", "msssim", "--images", "6"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert set(result) >= {"msssim", "resolution"} and "swd" not in result
    assert result["resolution"] == 64


@pytest.mark.parametrize("argv, message", [
    (["--fakes", "{fakes}", "--metrics", "swd"], "SWD needs --reals"),
    (["--reals", "{reals}", "--fakes", "{fakes}", "--metrics", "fid"], "choose from swd, msssim"),
    (["--reals", "{reals}", "--fakes", "{fakes}", "--resolution", "128"], "smaller than --resolution 128"),
    (["--reals", "{reals}"], "give a run or snapshot"),
])
def test_evaluate_usage_errors_are_one_line(folders, capsys, argv, message):
    reals, fakes = folders
    argv = [a.format(reals=reals, fakes=fakes) for a in argv]
    assert main(["evaluate", *argv, "--images", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err


def _save_tiny_snapshot(run: Path, resolution: int, nimg: int) -> str:
    """A real snapshot of a tiny untrained generator, as a stage end writes it."""
    from pggan.checkpoint import save_snapshot, snapshot_url
    from pggan.config import ModelSection
    from pggan.models import build_networks

    model = ModelSection(max_resolution=resolution, latent_size=8, fmap_base=32, fmap_max=8)
    G, _ = build_networks(model)
    url = snapshot_url(str(run), nimg)
    save_snapshot(Storage(), url, G.state_dict(), model.model_dump(mode="json"), resolution, nimg)
    return url


def test_evaluate_a_snapshot_generates_fakes_and_writes_beside_it(folders, tmp_path, capsys):
    reals, _ = folders
    snap = _save_tiny_snapshot(tmp_path / "run", 32, 100_000)
    rc = main(["evaluate", str(tmp_path / "run"), "--reals", str(reals), "--metrics", "swd", "--images", "12"])
    assert rc == 0
    result = json.loads(Path(snap[:-3] + "-metrics.json").read_text())
    assert result["snapshot"] == snap and result["swd"]["levels"] == [32, 16] and result["swd"]["images"] == 12
    assert result["resolution"] == 32


def test_the_noise_floor_compares_two_disjoint_real_samples():
    reals = shapes(16, 32, seed=3)
    floor = swd_noise_floor(reals, num_images=8, seed=1, dir_repeats=1)
    direct = swd(reals[:8], reals[8:], seed=1, dir_repeats=1)
    assert floor["swd_x1e3"] == direct["swd_x1e3"] and floor["what"].startswith("real vs real")
    streamed = swd_noise_floor(iter([reals[:5], reals[5:11], reals[11:]]), num_images=8, seed=1, dir_repeats=1)
    for lv in direct["swd_x1e3"]:
        assert streamed["swd_x1e3"][lv] == pytest.approx(direct["swd_x1e3"][lv], rel=1e-6)
    with pytest.raises(ValueError, match="2 x 8"):
        swd_noise_floor(reals[:12], num_images=8)


def test_the_noise_floor_is_computed_once_per_key_and_cached_in_storage():
    storage = Storage()
    calls = []

    def load_reals(n):
        calls.append(n)
        return shapes(n, 32, seed=4)

    kw = dict(dataset="synthetic:shapes", resolution=32, num_images=8, load_reals=load_reals, dir_repeats=1)
    first = cached_swd_noise_floor("memory://pggan-test-floor/run", storage, seed=0, **kw)
    again = cached_swd_noise_floor("memory://pggan-test-floor/run", storage, seed=0, **kw)
    assert calls == [16] and again == first
    names = storage.listdir("memory://pggan-test-floor/run")
    assert len(names) == 1 and names[0].startswith("swd-noise-floor-32px-8img-seed0-")
    other = cached_swd_noise_floor("memory://pggan-test-floor/run", storage, seed=1, **kw)
    assert calls == [16, 16] and other != first


def test_bench_swd_prints_seconds_and_peak_memory_as_json(capsys):
    assert main(["bench", "swd", "--images", "16", "--resolution", "32"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["images"] == 16 and line["resolution"] == 32
    assert line["seconds"] > 0 and line["peak_rss_mb"] > 0 and line["storage"] == "float32"


def test_evaluate_a_run_trained_from_a_folder_reads_the_reals_the_driver_prepared(tmp_path, capsys):
    """Regression: `evaluate RUN` on a run whose data.source is a folder looked for the reals under the cache root
    (``<run>/data``), while the driver prepares them under ``<cache>/<stem>-<hash>-r<R>``."""
    from pggan.checkpoint import save_snapshot, snapshot_url
    from pggan.config import load_config
    from pggan.driver import check_run_dir, prepare_data, run_url_of
    from pggan.models import build_networks

    src = write_folder(tmp_path / "faces", shapes(12, 32, seed=5))
    cfg = load_config(preset="demo", sets=[f"storage.url={tmp_path / 'runs'}", "run.name=from-folder",
                                           f"data.source={src}", "model.max_resolution=16",
                                           "model.latent_size=8", "model.fmap_base=32", "model.fmap_max=8"])
    storage, run = Storage(), run_url_of(cfg)
    check_run_dir(cfg, storage, run, fresh=False)  # config.json, as the driver writes it
    prepared = prepare_data(cfg, storage, run)  # the driver's own preparation (no Ray)
    assert prepared.startswith(f"{run}/data/faces-") and prepared.endswith("-r0016")
    G, _ = build_networks(cfg.model)
    save_snapshot(storage, snapshot_url(run, 1000), G.state_dict(), cfg.model.model_dump(mode="json"), 16, 1000)

    assert main(["evaluate", run, "--metrics", "swd", "--images", "8"]) == 0, capsys.readouterr().err
    result = json.loads(Path(snapshot_url(run, 1000)[:-3] + "-metrics.json").read_text())
    assert result["reals"] == prepared and result["swd"]["images"] == 8 and result["swd"]["levels"] == [16]
