"""`launch.py status` and `launch.py report` on a real tiny run directory.

The unit tests build the directory with the product's own writers (config.json from a validated config,
run_state.json through RunState's transitions, the metric history with history.append_records, committed
checkpoints with save_checkpoint, sample grids with generate.grid_png), no Ray. One integration test trains
a real tiny run onto moto's S3 and reads it back with both commands.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SERVICE_ENV
from pggan import report as report_mod
from pggan import status as status_mod
from pggan.cli import main
from pggan.config import load_config
from pggan.history import append_records
from pggan.run_state import RunState
from pggan.schedule import stages
from pggan.storage import Storage, join

# 4x4 -> 16x16 in five stages of 128 images (minibatch 16): 00-4-stable 0..128, 01-8-fade ..256, 02-8-stable ..384,
# 03-16-fade ..512, 04-16-stable ..640.
TINY_SETS = ["run.name=tiny", "model.max_resolution=16", "model.latent_size=16", "model.fmap_base=64",
             "model.fmap_max=16", "schedule.fade_kimg=0.128", "schedule.stable_kimg=0.128",
             "schedule.fade_kimg_dict={}", "schedule.stable_kimg_dict={}", "schedule.minibatch_base=16",
             "schedule.minibatch_dict={}", "metrics.grid_size=4"]
RATE = {4: 40.0, 8: 20.0, 16: 9.0}  # img/s the fake ticks report per resolution
EVAL_S = 2.0               # seconds per stage-end evaluation
T0 = 1_700_000_000.0


def tiny_cfg(url: str):
    return load_config(preset="demo", sets=TINY_SETS + [f"storage.url={url}"])


def _tick(st, nimg: int, rate: float, t: float, group: tuple[int, float]) -> dict:
    return {"event": "tick", "nimg": nimg, "kimg": nimg / 1000, "stage_index": st.index, "stage": st.name,
            "resolution": st.resolution, "alpha": st.alpha(nimg), "progress": (nimg - st.start) / st.nimg,
            "total_nimg": 640, "img_per_s": rate, "loss_G": 1.0 - nimg / 1000, "loss_D": 0.5 + nimg / 2000,
            "gp": 0.01 * (1 + nimg / 640), "nonfinite_total": 1 if nimg >= 200 else 0, "time": t,
            "checkpoint_retries": 0, "group_start_nimg": group[0], "group_start_time": group[1]}


def _swd(levels: list[int], base: float) -> dict:
    vals = {str(lv): base * (1 + i) for i, lv in enumerate(levels)}
    return {"swd_x1e3": vals, "avg": sum(vals.values()) / len(vals)}


def write_tiny_run(storage: Storage, run_url: str, upto_nimg: int, done_stages: int, state: str = "training",
                   grid_seed: int = 0) -> dict:
    """A run directory as the trainer leaves it: stages [0, done_stages) trained and evaluated, ticks up to
    upto_nimg. Returns what the test needs to check against (the grids' bytes, the schedule)."""
    import torch

    from pggan.checkpoint import save_checkpoint
    from pggan.generate import grid_png

    cfg = tiny_cfg(storage_url_of(run_url))
    all_stages = stages(cfg)
    storage.write_json(join(run_url, "config.json"), cfg.to_json())
    rs = RunState()
    rs.new_life()
    rs.total_nimg = all_stages[-1].end
    records: list[dict] = [{"event": "baseline", "resolution": 16, "swd": _swd([16, 8], 90.0), "time": T0}]
    t = T0
    grids = {}
    rng = np.random.default_rng(grid_seed)
    for st in all_stages:
        if st.start >= upto_nimg:
            break
        rs.transition("training", stage_index=st.index, stage=st.name, nimg=st.start)
        group = (st.start, t)
        rate = RATE[st.resolution]
        # The first tick of a worker group is slow (start-up): it must not count when later ticks exist.
        for i, nimg in enumerate(range(st.start + 32, min(st.end, upto_nimg) + 1, 32)):
            t += 32 / rate
            records.append(_tick(st, nimg, rate / 10 if i == 0 else rate, t, group))
        save_checkpoint(storage, run_url, min(st.end, upto_nimg), {"w": torch.zeros(2)},
                        {"stage_index": st.index, "stage": st.name})
        if st.index < done_stages:
            rs.transition("evaluating", stage_index=st.index, stage=st.name, nimg=st.end)
            end = {"event": "stage_end", "stage_index": st.index, "stage": st.name, "resolution": st.resolution,
                   "nimg": st.end, "kimg": st.end / 1000, "time": t, "eval_seconds": EVAL_S}
            if st.resolution >= 8:
                levels = [lv for lv in (16, 8) if lv <= st.resolution]
                end["swd"] = _swd(levels, 50.0 / (st.index + 1))
                end["swd_floor"] = _swd(levels, 1.0)
            records.append(end)
            images = rng.integers(0, 256, size=(16, 3, st.resolution, st.resolution), dtype=np.uint8)
            grids[st.name] = grid_png(images, cols=4)
            storage.write_bytes(join(run_url, "samples", f"{st.name}.png"), grids[st.name])
    # The history as the driver writes it: one object per batch (a stage's ticks, then its evaluation).
    append_records(storage, run_url, records[:len(records) // 2])
    append_records(storage, run_url, records[len(records) // 2:])
    if state == "completed":
        rs.transition("completed", stage_index=all_stages[-1].index, stage=all_stages[-1].name,
                      nimg=all_stages[-1].end, note="completed in 60 s")
    elif state != "training":
        rs.transition(state, note=f"{state} for the test")
    rs.save(storage, run_url)
    return {"cfg": cfg, "stages": all_stages, "grids": grids, "records": records}


def storage_url_of(run_url: str) -> str:
    return run_url.rsplit("/", 1)[0]


@pytest.fixture
def mid_run(tmp_path):
    """Training stage 02-8-stable at 320 of 640 images: stages 0 and 1 evaluated, 16x16 not reached."""
    storage, run_url = Storage(), str(tmp_path / "runs" / "tiny")
    info = write_tiny_run(storage, run_url, upto_nimg=320, done_stages=2)
    return storage, run_url, info


@pytest.fixture
def done_run(tmp_path):
    storage, run_url = Storage(), str(tmp_path / "runs" / "tiny")
    info = write_tiny_run(storage, run_url, upto_nimg=640, done_stages=5, state="completed")
    return storage, run_url, info


# ---- status --------------------------------------------------------------------------------------

def test_status_of_a_training_run_says_stage_progress_rates_checkpoint_and_swd_so_far(mid_run, capsys):
    storage, run_url, _ = mid_run
    s = status_mod.gather(storage, run_url, now=T0 + 100)
    assert s["state"] == "training" and s["run_name"] == "tiny"
    assert s["stage"]["name"] == "02-8-stable"
    assert (s["stage"]["index"], s["stage"]["count"], s["stage"]["resolution"]) == (2, 5, 8)
    assert s["stage"]["alpha"] == 1.0 and s["stage"]["progress"] == pytest.approx(0.5)
    assert (s["nimg"], s["total_nimg"]) == (320, 640) and s["progress"] == pytest.approx(0.5)
    # Over the last five ticks: their images over their time (the 8x8 stable stage's first tick is slow: start-up);
    # per resolution the median of the ticks without the first of each worker group.
    assert s["img_per_s"] == pytest.approx(5 * 32 / (4 * 32 / 20 + 32 / 2))
    assert s["img_per_s_by_resolution"] == {"4": 40.0, "8": 20.0}
    assert s["checkpoint"]["nimg"] == 320 and s["checkpoint"]["count"] == 3
    assert s["checkpoint"]["age_s"] is not None and s["checkpoint"]["url"].endswith("ckpt-000000000320")
    assert s["nonfinite_steps"] == 1 and s["worker_restarts"] == 0 and s["driver_lives"] == 1
    assert [r["stage"] for r in s["swd"]["rows"]] == ["01-8-fade"] and s["swd"]["levels"] == [16, 8]
    assert s["swd"]["baseline"]["avg"] == pytest.approx(135.0) and s["swd"]["floor"]["resolution"] == 8
    assert [r["status"] for r in s["stages"]] == ["done", "done", "current", "todo", "todo"]

    assert main(["status", run_url]) == 0
    out = capsys.readouterr().out
    assert "state      training" in out
    assert "stage 3/5 02-8-stable: 8x8 stable, alpha 1.000, 50%" in out
    assert "progress   0.320 / 0.640 kimg (50.0%)" in out
    assert "ckpt-000000000320 at 0.320 kimg" in out
    assert "16x16 estimated from 8x8 by network cost" in out
    assert "01-8-fade" in out and "untrained G" in out and "real vs real" in out


def test_eta_walks_the_rest_of_the_schedule_at_each_resolutions_rate_scaled_by_network_cost(mid_run):
    storage, run_url, _ = mid_run
    s = status_mod.gather(storage, run_url, now=T0 + 100)
    # By hand: the 16x16 networks (fmap_base 64, fmap_max 16, latent 16: 16 channels at 4 and 8, 8 at 16) cost per
    # image 4x4: 16*16*16 (dense) + 9*16*16*16 = 40960; 8x8 block: 9*64*(16*16 + 16*16) = 294912;
    # 16x16 block: 9*256*(16*8 + 8*8) = 442368. So 16x16 runs at 20 * (40960 + 294912) / (40960 + 294912 + 442368).
    rate16 = 20.0 * 335872 / 778240
    train = (384 - 320) / 20.0 + (640 - 384) / rate16
    overhead = 3 * EVAL_S  # stages 2, 3 and 4 are still to be evaluated
    assert s["eta"]["train_s"] == pytest.approx(train)
    assert s["eta"]["overhead_s"] == pytest.approx(overhead)
    assert s["eta_s"] == pytest.approx(train + overhead)  # 38.9 s
    assert s["eta"]["estimated_resolutions"] == [16] and s["eta"]["estimated_from"] == 8
    assert not s["eta"]["if_resumed"]


def test_eta_overhead_is_the_median_eval_plus_the_median_startup_after_the_first_stage():
    ends = [{"stage_index": 0, "eval_seconds": 9.0, "seconds": {"startup": 52.0, "train": 50.0, "eval": 1.0}},
            {"stage_index": 1, "seconds": {"startup": 5.0, "eval": 2.0}},
            {"stage_index": 2, "eval_seconds": 4.0},
            {"stage_index": 3, "seconds": {"startup": 1.0, "eval": 3.0}}]
    # eval: median of 1, 2, 4, 3 = 2.5; start-up: median of 5 and 1 (stage 0's holds the cluster start) = 3
    assert status_mod.stage_overhead_s(ends) == pytest.approx(5.5)


def test_status_json_parses_with_the_documented_keys(mid_run, capsys):
    storage, run_url, _ = mid_run
    assert main(["status", run_url, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("run_url", "run_name", "state", "message", "stage", "nimg", "kimg", "total_kimg", "progress",
                "img_per_s", "img_per_s_by_resolution", "eta_s", "eta", "last_tick", "checkpoint",
                "worker_restarts", "nonfinite_steps", "preemptions", "driver_lives", "lives", "swd", "stages",
                "samples"):
        assert key in s, key
    assert s["stage"]["name"] == "02-8-stable" and s["eta_s"] > 0


def test_status_of_a_completed_run_has_no_eta_and_the_whole_swd_table(done_run, capsys):
    storage, run_url, _ = done_run
    assert main(["status", run_url]) == 0
    out = capsys.readouterr().out
    assert "state      completed" in out and "ETA        done" in out
    assert "progress   0.640 / 0.640 kimg (100.0%)" in out
    assert "stage 5/5 04-16-stable" in out
    for name in ("01-8-fade", "02-8-stable", "03-16-fade", "04-16-stable"):
        assert name in out
    s = status_mod.gather(storage, run_url)
    assert s["eta_s"] == 0 and all(r["status"] == "done" for r in s["stages"])


def test_a_stopped_run_gets_the_eta_it_would_take_if_resumed(tmp_path, capsys):
    storage, run_url = Storage(), str(tmp_path / "runs" / "tiny")
    write_tiny_run(storage, run_url, upto_nimg=320, done_stages=2, state="stopped")
    assert main(["status", run_url]) == 0
    out = capsys.readouterr().out
    assert "state      stopped" in out and "if resumed (the run is stopped)" in out


def test_status_names_the_run_by_its_config(mid_run, capsys):
    storage, run_url, _ = mid_run
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    assert main(["status", "--preset", "demo", *sets, "--set", f"storage.url={storage_url_of(run_url)}",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nimg"] == 320


def test_unknown_run_is_one_clear_error_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "runs" / "nope")
    for cmd in ("status", "report"):
        assert main([cmd, missing]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: no run at {missing}: neither config.json nor run_state.json") \
            and err.count("\n") == 1 and "Traceback" not in err
    assert main(["status"]) == 2
    assert "name a run" in capsys.readouterr().err


def test_status_tolerates_fields_it_does_not_know_and_missing_optional_ones(mid_run):
    storage, run_url, _ = mid_run
    raw = storage.read_json(join(run_url, "run_state.json"))
    raw["preemptions"] = 2
    raw["stage_seconds"] = {"00-4-stable": 12.0}
    storage.write_json(join(run_url, "run_state.json"), raw)
    append_records(storage, run_url, [{"event": "tick", "nimg": 336, "resolution": 8, "new_field": 1},
                                      {"event": "something_new", "x": 1}])
    s = status_mod.gather(storage, run_url)
    assert s["preemptions"] == 2 and s["nimg"] == 336
    assert "preemptions 2" in status_mod.format_status(s)


def test_watch_refreshes_until_the_run_ends(done_run, capsys):
    storage, run_url, _ = done_run
    assert main(["status", "--watch", run_url, "--every", "0.01", "--json"]) == 0  # terminal state: one refresh, then exit
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["state"] == "completed"


def test_status_lists_the_same_committed_checkpoints_as_the_checkpoint_store(mid_run):
    from pggan.checkpoint import list_checkpoints

    storage, run_url, _ = mid_run
    storage.write_bytes(join(run_url, "checkpoints", "ckpt-000000000352", "state.pt"), b"half written")
    assert status_mod.committed_checkpoints(storage, run_url) == list_checkpoints(storage, run_url) == [128, 256, 320]


def test_status_and_report_do_not_import_torch():
    code = "import sys, pggan.status, pggan.report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, **SERVICE_ENV}).returncode == 0


def test_watch_on_a_training_run_refreshes_until_it_completes(mid_run, monkeypatch, capsys):
    storage, run_url, _ = mid_run
    sleeps = []

    def finish_run(seconds: float) -> None:  # the run completes while the watcher sleeps
        sleeps.append(seconds)
        rs = RunState.load(storage, run_url)
        rs.transition("completed", nimg=640, note="done")
        rs.save(storage, run_url)

    monkeypatch.setattr(status_mod.time, "sleep", finish_run)
    assert main(["status", run_url, "--watch", "--every", "5", "--json"]) == 0
    states = [json.loads(line)["state"] for line in capsys.readouterr().out.strip().splitlines()]
    assert states == ["training", "completed"] and sleeps == [5.0]


# ---- report --------------------------------------------------------------------------------------

def test_report_png_decodes_to_the_expected_size_and_html_inlines_every_stage_grid(done_run, tmp_path, capsys):
    storage, run_url, info = done_run
    out = tmp_path / "out" / "report.html"
    assert main(["report", run_url, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    png = Image.open(tmp_path / "out" / "report.png")
    png.load()
    assert png.format == "PNG" and png.size == report_mod.PNG_SIZE == (1280, 764)
    text = out.read_text()
    assert len(info["grids"]) == 5
    for name, data in info["grids"].items():
        assert base64.b64encode(data).decode() in text, name  # the grid as written, inlined
        assert f"id='grid-{name}'" in text
    assert "<script" not in text and "http://" not in text and "https://" not in text  # self-contained
    # Four plots inlined too, each a PNG at twice the panel size.
    plots = [p for p in text.split("src='data:image/png;base64,")[1:5]]
    sizes = [Image.open(io.BytesIO(base64.b64decode(p.split("'", 1)[0]))).size for p in plots]
    assert sizes == [(2 * report_mod.PANEL_W, 2 * report_mod.PANEL_H)] * 4


def test_report_png_shows_the_stage_bands_and_curves(done_run):
    storage, run_url, info = done_run
    _, png = report_mod.build_report(storage, run_url)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    # Every panel has both band colours somewhere (downsampling blends edges: look for near matches).
    for i in range(4):
        x0, y0 = (i % 2) * report_mod.PANEL_W, report_mod.HEADER_H + (i // 2) * report_mod.PANEL_H
        panel = img[y0:y0 + report_mod.PANEL_H, x0:x0 + report_mod.PANEL_W]
        for fill in (report_mod.FADE_FILL, report_mod.STABLE_FILL):
            assert (np.abs(panel - np.array(fill)).sum(-1) <= 3).sum() > 500, (i, fill)
        # ... and ink that is neither white nor a band: axes, ticks, curves.
        assert (panel.sum(-1) < 300).sum() > 500


def test_write_run_report_puts_report_html_and_png_in_the_run_directory(mid_run):
    storage, run_url, info = mid_run
    url = report_mod.write_run_report(storage, run_url)
    assert url == join(run_url, "report.html")
    text = storage.read_bytes(url).decode()
    assert all(base64.b64encode(g).decode() in text for g in info["grids"].values())
    assert "02-8-stable" in text  # the status block names the current stage
    assert Image.open(io.BytesIO(storage.read_bytes(join(run_url, "report.png")))).size == report_mod.PNG_SIZE


def test_report_of_a_run_with_no_history_yet_still_renders(tmp_path):
    storage, run_url = Storage(), str(tmp_path / "runs" / "tiny")
    cfg = tiny_cfg(str(tmp_path / "runs"))
    storage.write_json(join(run_url, "config.json"), cfg.to_json())
    rs = RunState()
    rs.new_life()
    rs.save(storage, run_url)
    text, png = report_mod.build_report(storage, run_url)
    assert "no sample grids yet" in text
    assert Image.open(io.BytesIO(png)).size == report_mod.PNG_SIZE
    assert "no ticks recorded yet" in status_mod.format_status(status_mod.gather(storage, run_url))


def test_huge_grids_are_downsampled_in_the_html():
    big = Image.new("RGB", (4096, 4096), (10, 20, 30))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    shown, size = report_mod._grid_for_html(buf.getvalue())
    assert size == (4096, 4096) and Image.open(io.BytesIO(shown)).size == (2048, 2048)


def test_nice_ticks_are_round_steps_inside_the_range():
    assert report_mod.nice_ticks(0, 47, 8) == [0, 10, 20, 30, 40]
    assert report_mod.nice_ticks(0, 0.64, 8) == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert report_mod.nice_ticks(-0.013, 0.021, 5) == [-0.01, 0, 0.01, 0.02]


# ---- integration: a real tiny run on moto's S3 -----------------------------------------------------

@pytest.mark.integration
def test_status_and_report_on_a_real_tiny_run_on_s3(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/runs"
    sets = TINY_SETS + [f"storage.url={url}", f"storage.endpoint_url={endpoint}", "data.synthetic_images=256",
                        "metrics.tick_kimg=0.064", "metrics.tick_kimg_dict={}", "metrics.swd_images=64",
                        "checkpoint.every_kimg=0.064", "ema.half_life_kimg=0.1", "ema.rampup=null"]
    env = {**os.environ, **SERVICE_ENV}
    cmd = [sys.executable, "service/launch.py", "--preset", "demo", *[a for s in sets for a in ("--set", s)]]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]

    run_url = f"{url}/tiny"
    cli = [sys.executable, "service/launch.py"]
    st = subprocess.run(cli + ["status", run_url, "--endpoint-url", endpoint], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stderr
    print(st.stdout)
    assert "state      completed" in st.stdout and "stage 5/5 04-16-stable" in st.stdout
    assert "SWD x1e3" in st.stdout
    js = subprocess.run(cli + ["status", run_url, "--endpoint-url", endpoint, "--json"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    s = json.loads(js.stdout)
    assert s["state"] == "completed" and s["nimg"] == s["total_nimg"] == 640 and s["img_per_s_by_resolution"]

    missing = subprocess.run(cli + ["status", f"{url}/nope", "--endpoint-url", endpoint], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no run at")

    html_out = tmp_path / "report.html"
    rep = subprocess.run(cli + ["report", run_url, "--endpoint-url", endpoint, "--out", str(html_out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert Image.open(tmp_path / "report.png").size == report_mod.PNG_SIZE
    text = html_out.read_text()
    storage = Storage(endpoint_url=endpoint)
    for st_ in stages(tiny_cfg(url)):
        grid = storage.read_bytes(join(run_url, "samples", f"{st_.name}.png"))
        assert base64.b64encode(grid).decode() in text, st_.name
