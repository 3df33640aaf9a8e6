"""Sweep: the config's search space becomes Tune samplers; each trial gets its own validated config."""

from __future__ import annotations

import pytest

from pggan.config import load_config


def test_search_space_maps_to_tune_samplers_and_trials_get_their_own_run_dir():
    from ray import tune

    from pggan.sweep import param_space, trial_config

    cfg = load_config(preset="demo", sets=[
        "sweep.search_space={schedule.lr_base: {loguniform: [0.0005, 0.005]}, loss.kind: {grid: [wgan-gp, lsgan]}}"])
    space = param_space(cfg)
    assert space["loss.kind"] == tune.grid_search(["wgan-gp", "lsgan"])
    lr = space["schedule.lr_base"]
    assert isinstance(lr, tune.search.sample.Float)
    assert (lr.lower, lr.upper) == (0.0005, 0.005)
    trial = trial_config(cfg.to_json(), {"schedule.lr_base": 0.001, "loss.kind": "lsgan"}, "t00001")
    assert trial.schedule.lr_base == 0.001 and trial.loss.kind == "lsgan"
    assert trial.run.name == "demo-t00001"
    assert cfg.run.name == "demo"  # the base is untouched


def test_a_trial_value_that_breaks_the_config_is_a_config_error():
    from pggan.config import ConfigError
    from pggan.sweep import trial_config

    cfg = load_config(preset="demo")
    with pytest.raises(ConfigError) as e:
        trial_config(cfg.to_json(), {"schedule.lr_base": -1.0}, "bad")
    assert e.value.problems[0][0] == "schedule.lr_base"


def _cfg(*sets):
    return load_config(preset="demo", sets=[
        "sweep.search_space={loss.kind: {grid: [wgan-gp, lsgan]}, schedule.lr_base: {loguniform: [0.0005, 0.005]}}",
        *sets])


def test_trials_are_the_grid_times_num_samples_in_a_fixed_order_with_seeded_draws():
    from pggan.sweep import expand_trials

    trials = expand_trials(_cfg("sweep.num_samples=2"))
    assert [t["name"] for t in trials] == ["t00", "t01", "t02", "t03"]
    assert [t["params"]["loss.kind"] for t in trials] == ["wgan-gp", "lsgan"] * 2
    assert all(0.0005 <= t["params"]["schedule.lr_base"] <= 0.005 for t in trials)
    assert expand_trials(_cfg("sweep.num_samples=2")) == trials            # a rerun finds the same trials
    assert expand_trials(_cfg("sweep.num_samples=2", "run.seed=1")) != trials


def test_a_sweep_refuses_keys_that_would_make_the_comparison_unfair_and_configs_without_swd():
    from pggan.errors import UserError
    from pggan.sweep import check_sweep

    check_sweep(_cfg())
    with pytest.raises(UserError) as e:
        check_sweep(load_config(preset="demo", sets=["sweep.search_space={run.seed: {grid: [0, 1]}}",
                                                     "metrics.swd_images=0"]))
    assert "sweep.search_space.run.seed" in str(e.value) and "metrics.swd_images" in str(e.value)


def _row(name, state, ends, params=None):
    return {"trial": name, "index": int(name[1:]), "params": params or {"loss.kind": "lsgan"}, "state": state,
            "message": "", "run_url": f"/x/{name}", "kimg": ends[-1][0] if ends else 0,
            "stage_ends": [{"stage": f"s{i}", "stage_index": i, "resolution": 8, "nimg": int(k * 1000), "kimg": k,
                            "swd_x1e3": {"8": v}, "swd_avg": v} for i, (k, v) in enumerate(ends)],
            "swd_avg": ends[-1][1] if ends else None, "swd_kimg": ends[-1][0] if ends else None}


def test_trials_are_ranked_at_equal_kimg_and_the_table_has_one_column_per_stage_end():
    from pggan.sweep import rank, table

    rows = rank([_row("t00", "stopped", [(0.2, 10.0)]),                 # best SWD, but stopped at the first rung
                 _row("t01", "completed", [(0.2, 30.0), (0.4, 25.0)]),
                 _row("t02", "completed", [(0.2, 20.0), (0.4, 22.0)]),
                 _row("t03", "failed", [])])
    assert [(r["trial"], r["rank"]) for r in rows] == [("t02", 1), ("t01", 2), ("t00", 3), ("t03", None)]
    text = table(rows)
    assert "0.2" in text.splitlines()[1] and "0.4" in text.splitlines()[1]
    assert "22.00" in text and "stopped" in text


def test_the_plot_is_a_png_and_the_best_config_revalidates_with_the_trials_values(tmp_path):
    from PIL import Image

    from pggan.sweep import best_yaml, plot_png

    png = plot_png([_row("t00", "completed", [(0.2, 30.0), (0.4, 25.0)]), _row("t01", "stopped", [(0.2, 40.0)])],
                   "sweep x")
    assert Image.open(__import__("io").BytesIO(png)).size == (800, 474)
    cfg = _cfg()
    best = _row("t01", "completed", [(0.4, 25.0)], params={"loss.kind": "lsgan", "schedule.lr_base": 0.002})
    (tmp_path / "best.yaml").write_text(best_yaml(cfg, best))
    again = load_config(str(tmp_path / "best.yaml"))
    assert (again.loss.kind, again.schedule.lr_base, again.run.name) == ("lsgan", 0.002, "demo-t01")
    assert again.metrics.linger_s == cfg.metrics.linger_s  # trials run with 0; the best config gets the base's


def test_the_chart_runs_a_sweep_when_job_command_is_sweep():
    import shutil
    import subprocess

    from conftest import ROOT, need

    need("helm", shutil.which("helm") is not None, "install the helm CLI (.ci/install-system.sh)")
    out = subprocess.run(["helm", "template", "x", str(ROOT / "deploy/helm/pggan"), "--set", "job.command=sweep"],
                         capture_output=True, text=True, check=True).stdout
    assert "entrypoint: python service/launch.py sweep --config /config/config.yaml" in out


def test_the_dashboard_has_a_sweep_row_with_swd_avg_and_states_per_trial():
    import json

    from conftest import ROOT

    d = json.loads((ROOT / "deploy/grafana/pggan-dashboard.json").read_text())
    titles = [p["title"] for p in d["panels"]]
    assert "Sweep (Ray Tune trials)" in titles
    exprs = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in d["panels"]}
    assert any('level="avg"' in e and 'trial!=""' in e for e in exprs["SWD x1e3 avg per trial"])
    assert any(e.startswith("pggan_run_state") for e in exprs["Trial states"])
