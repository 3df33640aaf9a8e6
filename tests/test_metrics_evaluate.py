"""`launch.py evaluate` and `launch.py bench swd` end to end, and the cached real-vs-real SWD noise floor."""

from __future__ import annotations

import json
import sys
import types
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


class TinyG(torch.nn.Module):
    """A stand-in generator: G(z, resolution, alpha) -> images in [-1, 1]."""

    latent_size = 8

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 3 * 4 * 4)
        self.calls: list[tuple[int, float]] = []

    def forward(self, z, resolution, alpha):
        self.calls.append((resolution, alpha))
        x = torch.tanh(self.proj(z)).view(-1, 3, 4, 4)
        return torch.nn.functional.interpolate(x, size=resolution, mode="bilinear")


def test_evaluate_a_snapshot_generates_fakes_and_writes_beside_it(folders, tmp_path, monkeypatch, capsys):
    reals, _ = folders
    G = TinyG().eval()
    snap = str(tmp_path / "run" / "snapshots" / "snapshot-000100.pt")
    fake_ckpt = types.SimpleNamespace(load_generator=lambda src, storage, **kw: (G, 32, {"nimg": 100000}),
                                      resolve_snapshot=lambda storage, src: snap)
    monkeypatch.setitem(sys.modules, "pggan.checkpoint", fake_ckpt)
    rc = main(["evaluate", str(tmp_path / "run"), "--reals", str(reals), "--metrics", "swd", "--images", "12"])
    assert rc == 0
    assert G.calls and all(c == (32, 1.0) for c in G.calls)
    result = json.loads(Path(snap[:-3] + "-metrics.json").read_text())
    assert result["snapshot"] == snap and result["swd"]["levels"] == [32, 16] and result["swd"]["images"] == 12


def test_evaluate_a_snapshot_without_the_checkpoint_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pggan.checkpoint", None)  # as if it were not written yet
    assert main(["evaluate", "runs/demo", "--metrics", "msssim", "--images", "4"]) == 2
    assert "evaluating snapshots needs" in capsys.readouterr().err


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
