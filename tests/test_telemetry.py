"""Telemetry: the Prometheus metrics of a run, their labels and values, served over HTTP and scraped by a real
Prometheus (Debian's binary, started on free loopback ports)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, SERVICE, free_port, have_binary, need
from pggan.telemetry import METRICS, STATES, TICK_KEYS, Exporter, Telemetry

DESIGN = ROOT.parent / "shared" / "DESIGN.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "pggan-dashboard.json"


def tick(**over) -> dict:
    t = dict(nimg=120_000, resolution=16, stage_index=3, alpha=0.25, progress=0.125, img_per_s=850.0,
             loss_G=1.5, loss_D=-0.75, gp=0.03, nonfinite_total=0)
    t.update(over)
    return t


def samples(t: Telemetry | Exporter) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of everything the registry exposes, parsed back from the exposition."""
    return [(s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(t.render()) for s in fam.samples]


def value(t: Telemetry | Exporter, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples(t) if n == name and lab == labels]
    assert len(found) == 1, f"expected one {name}{labels}, found {found}"
    return found[0]


def families(t: Telemetry | Exporter) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(t.render())}


# --- names and types ---------------------------------------------------------------------------------------

@pytest.mark.integration  # needs ../shared
def test_metric_names_are_exactly_those_in_design_md():
    need("shared/DESIGN.md", DESIGN.exists(), f"{DESIGN} holds the metric contract")
    section = DESIGN.read_text().split("### Prometheus metrics", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(pggan_[a-z0-9_]+)", section)) == set(METRICS)


def test_a_busy_run_exposes_every_metric_with_its_declared_type():
    t = Telemetry("r")
    t.set_state("training")
    t.on_tick(tick(nonfinite_total=2))
    t.on_checkpoint(True, 3.0, 1_700_000_000.0)
    t.on_checkpoint(False, 1.0, 1_700_000_100.0)
    t.on_swd({4: 2.5, 8: 3.5}, 3.0)
    t.on_worker_restart()
    exposed = {n for n, _, _ in samples(t)}
    for name, (typ, _) in METRICS.items():
        if typ == "histogram":
            assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= exposed
        else:
            assert name in exposed
    # prometheus_client's parser names a counter family without _total; the sample keeps it.
    fams = families(t)
    assert fams["pggan_images_seen"] == "gauge"  # set (from the checkpoint), not incremented
    assert fams["pggan_worker_restarts"] == "counter"
    assert fams["pggan_checkpoint_duration_seconds"] == "histogram"


# --- run state ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", STATES)
def test_run_state_has_one_series_per_state_and_only_the_current_one_is_1(state):
    t = Telemetry("r")
    t.set_state("training")
    t.set_state(state)
    series = {lab["state"]: v for n, lab, v in samples(t) if n == "pggan_run_state"}
    assert set(series) == set(STATES)
    assert [s for s, v in series.items() if v == 1.0] == [state]
    assert all(v == 0.0 for s, v in series.items() if s != state)


def test_a_new_run_is_pending():
    assert value(Telemetry("r"), "pggan_run_state", run="r", state="pending") == 1.0


def test_unknown_state_is_refused_and_the_current_state_kept():
    t = Telemetry("r")
    t.set_state("evaluating")
    with pytest.raises(ValueError, match="unknown run state 'paused'"):
        t.set_state("paused")
    assert value(t, "pggan_run_state", run="r", state="evaluating") == 1.0


# --- labels ------------------------------------------------------------------------------------------------

def test_series_carry_the_run_label_and_trial_only_when_given():
    ex = Exporter()
    plain = Telemetry("celeba", exporter=ex)
    trial = Telemetry("sweep", trial="trial_0001", exporter=ex)
    plain.on_tick(tick(resolution=8))
    trial.on_tick(tick(resolution=32))
    assert value(ex, "pggan_resolution", run="celeba") == 8.0
    assert value(ex, "pggan_resolution", run="sweep", trial="trial_0001") == 32.0
    for name, labels, _ in samples(ex):
        assert labels["run"] in ("celeba", "sweep")
        assert ("trial" in labels) == (labels["run"] == "sweep"), (name, labels)


def test_losses_are_labelled_by_net_and_swd_by_level():
    t = Telemetry("r")
    t.on_tick(tick(loss_G=2.0, loss_D=-1.0))
    t.on_swd({4: 1.25, "8": 2.5, 16: 4.0}, 2.5)
    assert value(t, "pggan_loss", run="r", net="G") == 2.0
    assert value(t, "pggan_loss", run="r", net="D") == -1.0
    levels = {lab["level"]: v for n, lab, v in samples(t) if n == "pggan_swd_x1e3"}
    assert levels == {"4": 1.25, "8": 2.5, "16": 4.0, "avg": 2.5}
    t.on_swd({32: 9.0}, 9.0)  # a later evaluation replaces the levels of the previous one
    assert {lab["level"] for n, lab, _ in samples(t) if n == "pggan_swd_x1e3"} == {"32", "avg"}


def test_several_trials_share_one_exporter_but_not_a_run_and_trial_pair():
    ex = Exporter()
    Telemetry("sweep", trial="a", exporter=ex)
    Telemetry("sweep", trial="b", exporter=ex)
    with pytest.raises(ValueError, match="already registered"):
        Telemetry("sweep", trial="a", exporter=ex)
    assert {lab.get("trial") for n, lab, _ in samples(ex) if n == "pggan_run_state"} == {"a", "b"}


def test_close_removes_a_trials_series_from_the_shared_exporter():
    ex = Exporter()
    a = Telemetry("sweep", trial="a", exporter=ex)
    Telemetry("sweep", trial="b", exporter=ex)
    a.close()
    assert {lab.get("trial") for _, lab, _ in samples(ex)} == {"b"}


# --- values ------------------------------------------------------------------------------------------------

def test_tick_sets_the_progress_gauges():
    t = Telemetry("r")
    t.on_tick(tick(nimg=64_000, resolution=8, stage_index=1, alpha=0.5, progress=0.5, img_per_s=1234.5, gp=0.25))
    assert value(t, "pggan_images_seen", run="r") == 64_000
    assert value(t, "pggan_resolution", run="r") == 8
    assert value(t, "pggan_stage_index", run="r") == 1
    assert value(t, "pggan_fade_alpha", run="r") == 0.5
    assert value(t, "pggan_stage_progress_ratio", run="r") == 0.5
    assert value(t, "pggan_train_images_per_second", run="r") == 1234.5
    assert value(t, "pggan_gradient_penalty", run="r") == 0.25


def test_resume_sets_images_seen_to_the_checkpointed_count_not_a_count_from_zero():
    # A new driver resumes from a checkpoint at 2.4M images: the metric starts there, not at 0 or at a sum.
    t = Telemetry("r")
    t.set_images_seen(2_400_000)
    assert value(t, "pggan_images_seen", run="r") == 2_400_000
    t.on_tick(tick(nimg=2_404_000))
    assert value(t, "pggan_images_seen", run="r") == 2_404_000
    # A rollback to an older checkpoint moves it back.
    t.on_tick(tick(nimg=2_300_000))
    assert value(t, "pggan_images_seen", run="r") == 2_300_000


def test_tick_without_a_key_is_refused_naming_it():
    bad = tick()
    del bad["img_per_s"], bad["gp"]
    with pytest.raises(ValueError, match="img_per_s, gp"):
        Telemetry("r").on_tick(bad)
    assert set(TICK_KEYS) == set(tick())


def test_lsgan_ticks_without_a_penalty_drop_the_gp_series():
    t = Telemetry("r")
    t.on_tick(tick(gp=0.5))
    t.on_tick(tick(gp=None))
    assert "pggan_gradient_penalty" not in {n for n, _, _ in samples(t)}


def test_a_loss_no_rank_could_compute_is_left_out_and_extra_tick_keys_are_ignored():
    t = Telemetry("r")
    t.on_tick(tick(loss_D=None, checkpoints=[], kimg=120.0))
    assert {lab["net"] for n, lab, _ in samples(t) if n == "pggan_loss"} == {"G"}


def test_checkpoint_success_sets_timestamp_and_observes_duration_failure_counts():
    t = Telemetry("r")
    t.on_checkpoint(True, 3.0, 1_700_000_000.0)
    t.on_checkpoint(True, 45.0, 1_700_000_600.0)
    t.on_checkpoint(False, 2.0, 1_700_001_200.0)
    assert value(t, "pggan_checkpoint_last_success_timestamp_seconds", run="r") == 1_700_000_600.0
    assert value(t, "pggan_checkpoint_failures_total", run="r") == 1
    assert value(t, "pggan_checkpoint_duration_seconds_count", run="r") == 2
    assert value(t, "pggan_checkpoint_duration_seconds_sum", run="r") == 48.0
    assert value(t, "pggan_checkpoint_duration_seconds_bucket", run="r", le="5.0") == 1
    assert value(t, "pggan_checkpoint_duration_seconds_bucket", run="r", le="60.0") == 2
    assert value(t, "pggan_checkpoint_duration_seconds_bucket", run="r", le="+Inf") == 2


def test_nonfinite_counter_stays_monotone_when_the_reported_total_starts_again():
    t = Telemetry("r")
    for reported in (2, 5, 5, 1, 3):  # a new stage's workers count from zero after the 5
        t.on_tick(tick(nonfinite_total=reported))
    assert value(t, "pggan_nonfinite_steps_total", run="r") == 5 + 3


def test_worker_restarts_add_up():
    t = Telemetry("r")
    t.on_worker_restart()
    t.on_worker_restart(2)
    assert value(t, "pggan_worker_restarts_total", run="r") == 3


# --- HTTP --------------------------------------------------------------------------------------------------

def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_http_server_on_port_0_picks_a_free_port_serves_metrics_and_stop_frees_it():
    t = Telemetry("web")
    t.on_tick(tick(resolution=64))
    port = t.start_http_server("127.0.0.1", 0)
    try:
        assert port > 0
        assert 'pggan_resolution{run="web"} 64.0' in _get(port)
        assert t.start_http_server("127.0.0.1", 0) == port  # idempotent
    finally:
        t.stop()
    with pytest.raises(urllib.error.URLError):
        _get(port)


def test_trials_on_a_shared_exporter_are_served_from_one_port():
    ex = Exporter()
    a = Telemetry("sweep", trial="a", exporter=ex)
    b = Telemetry("sweep", trial="b", exporter=ex)
    port = a.start_http_server("127.0.0.1", 0)
    try:
        assert b.start_http_server("127.0.0.1", 0) == port
        with pytest.raises(RuntimeError, match="already serves"):
            ex.start_http_server("127.0.0.1", free_port())
        b.stop()  # a trial does not own the shared server
        text = _get(port)
        assert 'trial="a"' in text and 'trial="b"' in text
    finally:
        ex.stop()


def test_telemetry_imports_neither_ray_nor_torch():
    code = ("import sys, pggan.telemetry; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SERVICE)


# --- a real Prometheus scrapes the exporter ----------------------------------------------------------------

def _query(prom: str, q: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, with its variables filled in for run 'itest'."""
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    subst = {"run": "itest", "trial": ".*", "__rate_interval": "1m"}
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: subst[m.group(1)], e) for e in exprs]


@pytest.mark.integration
def test_prometheus_scrapes_the_exporter_and_the_dashboard_queries_return_data(tmp_path):
    need("prometheus", have_binary("prometheus"), "install Debian's prometheus (.ci/install-system.sh)")
    ex = Exporter()
    run = Telemetry("itest", exporter=ex)
    trial = Telemetry("itest", trial="t1", exporter=ex)
    run.set_state("training")
    run.set_images_seen(1_000_000)
    run.on_tick(tick(nimg=1_004_000, resolution=16, nonfinite_total=1))
    run.on_checkpoint(True, 2.0, time.time())
    run.on_checkpoint(False, 1.0, time.time())
    run.on_swd({4: 2.0, 8: 3.0, 16: 4.0}, 3.0)
    run.on_worker_restart()
    trial.set_state("evaluating")
    trial.on_tick(tick(resolution=32))
    trial.on_checkpoint(True, 1.0, time.time())
    trial.on_swd({4: 1.0}, 1.0)
    exporter_port = ex.start_http_server("127.0.0.1", 0)

    prom_port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: pggan\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{prom_port}"
    try:
        # Wait until it has scraped three times, so that increase()/changes() have samples to work on.
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                got = _query(prom, 'count_over_time(pggan_resolution{run="itest",trial=""}[1m])')
                if got and float(got[0]["value"][1]) >= 3:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "prometheus did not scrape the exporter within 60 s"
            time.sleep(0.5)

        up = _query(prom, 'up{job="pggan"}')
        assert [float(r["value"][1]) for r in up] == [1.0]
        res = {r["metric"].get("trial", ""): float(r["value"][1]) for r in _query(prom, "pggan_resolution")}
        assert res == {"": 16.0, "t1": 32.0}
        seen = _query(prom, 'pggan_images_seen{run="itest",trial=""}')
        assert float(seen[0]["value"][1]) == 1_004_000
        state = _query(prom, "pggan_run_state == 1")
        assert {(r["metric"].get("trial", ""), r["metric"]["state"]) for r in state} == {("", "training"),
                                                                                        ("t1", "evaluating")}
        assert float(_query(prom, 'pggan_checkpoint_failures_total{trial=""}')[0]["value"][1]) == 1
        assert float(_query(prom, 'pggan_checkpoint_duration_seconds_count{trial=""}')[0]["value"][1]) == 1
        swd = {r["metric"]["level"] for r in _query(prom, 'pggan_swd_x1e3{trial=""}')}
        assert swd == {"4", "8", "16", "avg"}

        # Every query of the dashboard runs, and every panel query finds series for this run.
        empty = []
        for q in _dashboard_queries():
            result = _query(prom, q)
            if not result and "changes(" not in q:  # the stage-change annotation is empty without a change
                empty.append(q)
        assert not empty, f"dashboard queries with no data: {empty}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        ex.stop()
