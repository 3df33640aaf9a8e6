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
