"""Config: presets, YAML + --set loading, JSON round trip, and every bad value reported with its dotted key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pggan.config import ConfigError, RunConfig, from_json, load_config
from pggan.models.mbstd import mbstd_group

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "service" / "launch.py")]


@pytest.mark.parametrize("preset", ["demo", "paper", "paper-8gpu"])
def test_presets_are_valid_and_round_trip_through_json(preset):
    cfg = load_config(preset=preset)
    wire = json.dumps(cfg.to_json())
    back = from_json(wire)
    assert back == cfg
    assert back.to_json() == cfg.to_json()


def test_paper_defaults_follow_the_paper():
    cfg = RunConfig()
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.0, 0.99, 1e-8)
    assert (cfg.schedule.fade_kimg, cfg.schedule.stable_kimg, cfg.schedule.lr_base) == (800, 800, 0.001)
    assert (cfg.loss.kind, cfg.loss.gp_lambda, cfg.loss.drift) == ("wgan-gp", 10.0, 0.001)
    assert (cfg.model.latent_size, cfg.model.fmap_base, cfg.model.fmap_max, cfg.model.mbstd_group_size) == (
        512, 8192, 512, 4)


def test_yaml_file_names_its_preset_and_set_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: paper\nrun: {name: celeb}\nschedule: {lr_base: 0.002}\n")
    cfg = load_config(str(f), sets=["schedule.lr_base=0.003", "schedule.minibatch_dict.8=32", "loss.kind=lsgan"])
    assert cfg.preset == "paper" and cfg.model.max_resolution == 1024
    assert cfg.run.name == "celeb"
    assert cfg.schedule.lr_base == 0.003
    assert cfg.schedule.minibatch(8) == 32 and cfg.schedule.minibatch(256) == 14
    assert cfg.loss.kind == "lsgan"


BAD = [
    ("model.max_resolution=48", "model.max_resolution"),
    ("model.max_resolution=2048", "model.max_resolution"),
    ("schedule.start_resolution=64", "schedule.start_resolution"),  # above demo's max 32
    ("schedule.start_resolution=3", "schedule.start_resolution"),
    ("schedule.lr_base=-0.1", "schedule.lr_base"),
    ("schedule.fade_kimg=0", "schedule.fade_kimg"),
    ("schedule.minibatch_dict.12=16", "schedule.minibatch_dict"),
    ("schedule.minibatch_dict.16=0", "schedule.minibatch_dict"),
    ("cluster.num_workers=3", "schedule.minibatch_base"),  # 16 not divisible by 3
    ("cluster.num_workers=0", "cluster.num_workers"),
    ("schedule.minibatch_dict.32=13", "schedule.minibatch_dict.32"),  # prime: mbstd groups of one
    ("loss.kind=hinge", "loss.kind"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("ema.half_life_kimg=-1", "ema.half_life_kimg"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("metrics.port=70000", "metrics.port"),
    ("run.name=../escape", "run.name"),
    ("data.resolution=16", "data.resolution"),  # below model.max_resolution 32
    ("data.source=synthetic:faces", "data.source"),
    ("storage.options.secret=abc", "storage.options"),
    ("storage.url=s3://AKIA:topsecret@bucket/x", "storage.url"),
    ("modle.max_resolution=32", "modle"),
    ("model.max_res=32", "model.max_res"),
    ("cluster.amp=fp8", "cluster.amp"),
    ("sweep.search_space={schedule.lr_base: {normal: [0, 1]}}", "sweep.search_space"),
    ("sweep.search_space={schedule.nope: {choice: [1, 2]}}", "sweep.search_space.schedule.nope"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[1] + ":" + b[0] for b in BAD])
def test_bad_config_is_rejected_with_its_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(preset="demo", sets=[override])
    keys = [k for k, _, _ in e.value.problems]
    assert any(k == key or k.startswith(key + ".") for k in keys), keys


def test_secret_values_are_not_echoed_in_url_errors():
    with pytest.raises(ConfigError) as e:
        load_config(preset="demo", sets=["storage.url=s3://AKIA:topsecret@bucket/x"])
    # The value is shown (the user typed it) but the message says to move credentials to the environment.
    assert "environment" in str(e.value)


def test_several_bad_fields_in_one_file_are_all_reported(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: {max_resolution: 48, latent_size: 0}\nschedule: {lr_base: -1}\nloss: {kind: nope}\n"
                 "surprise: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    keys = {k for k, _, _ in e.value.problems}
    assert {"model.max_resolution", "model.latent_size", "schedule.lr_base", "loss.kind", "surprise"} <= keys


def test_cross_field_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(preset="demo", sets=["schedule.start_resolution=64", "data.resolution=16"])
    keys = {k for k, _, _ in e.value.problems}
    assert {"schedule.start_resolution", "data.resolution"} <= keys


def test_missing_or_invalid_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "nope.yaml"))
    assert e.value.problems[0][0] == "--config"
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError):
        load_config(str(bad))


@pytest.mark.parametrize("group,n,expect", [(4, 16, 4), (4, 14, 2), (4, 6, 3), (4, 3, 3), (4, 5, 1), (4, 2, 2),
                                            (0, 8, 1)])
def test_mbstd_group_is_the_largest_divisor_within_the_group_size(group, n, expect):
    assert mbstd_group(group, n) == expect


def test_cli_dry_run_prints_the_resolved_config():
    out = subprocess.run([*LAUNCH, "--dry-run"], capture_output=True, text=True, check=True)
    cfg = json.loads(out.stdout)
    assert cfg["preset"] == "demo" and cfg["model"]["max_resolution"] == 32
    out = subprocess.run([*LAUNCH, "--preset", "paper", "--dry-run", "--set", "run.name=x"], capture_output=True,
                         text=True, check=True)
    cfg = json.loads(out.stdout)
    assert cfg["model"]["max_resolution"] == 1024 and cfg["run"]["name"] == "x"
    assert cfg["schedule"]["minibatch_dict"] == {"256": 14, "512": 6, "1024": 3}


def test_cli_bad_set_gives_one_line_per_problem_and_exit_2():
    out = subprocess.run([*LAUNCH, "--dry-run", "--set", "schedule.lr_base=-1", "--set", "model.max_resolution=48",
                          "--set", "nokey"], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert len(lines) == 1 and lines[0].startswith("config error: nokey")
    out = subprocess.run([*LAUNCH, "--dry-run", "--set", "schedule.lr_base=-1", "--set", "model.max_resolution=48"],
                         capture_output=True, text=True)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2
    assert any("schedule.lr_base" in ln and "-1" in ln for ln in lines)
    assert any("model.max_resolution" in ln and "48" in ln for ln in lines)


def test_readme_config_reference_lists_every_field_as_the_code_does():
    readme = (ROOT / "README.md").read_text()
    from pggan.config import reference_markdown

    start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end].strip() == reference_markdown().strip(), "regenerate with python -m pggan.config"
