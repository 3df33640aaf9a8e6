"""The alert rules and the exporter against the real tools: `promtool check metrics` on a live /metrics exposition
of the exporter, and a real Prometheus (Debian's binary, on free loopback ports) that scrapes a real run failing
fast and evaluates deploy/prometheus/pggan-rules.yaml as shipped: the failed alert shows up in its ALERTS series
and stays after the run's exporter is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, SERVICE_ENV, free_port, have_binary, need
from pggan.telemetry import METRICS, Exporter, Telemetry

RULES = ROOT / "deploy" / "prometheus" / "pggan-rules.yaml"
LAUNCH = ROOT / "service" / "launch.py"

pytestmark = pytest.mark.integration


def _busy_exporter() -> tuple[Exporter, list[Telemetry]]:
    """An exporter with a run and a Tune trial that have set every metric (as a run in progress does)."""
    ex = Exporter()
    run = Telemetry("live", exporter=ex)
    trial = Telemetry("live", trial="t1", exporter=ex)
    for t in (run, trial):
        t.set_state("training")
        t.on_tick(dict(nimg=64_000, resolution=16, stage_index=3, alpha=0.5, progress=0.25, img_per_s=900.0,
                       loss_G=1.5, loss_D=-0.5, gp=0.02, nonfinite_total=1))
        t.on_checkpoint(True, 2.0, time.time())
        t.on_checkpoint(False, 1.0, time.time())
        t.on_swd({4: 2.0, 8: 3.0}, 2.5)
        t.on_worker_restart()
    return ex, [run, trial]


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def test_promtool_check_metrics_passes_on_the_exporters_live_exposition():
    need("promtool", have_binary("promtool"), "install Debian's prometheus package (.ci/install-system.sh)")
    ex, _ = _busy_exporter()
    port = ex.start_http_server("127.0.0.1", 0)
    try:
        text = _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        ex.stop()
    assert all(f"# TYPE {name} " in text or f"# TYPE {name.removesuffix('_total')} " in text for name in METRICS)
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    # promtool prints one line per lint problem (e.g. "non-counter metrics should not have _total suffix").
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_promtool_check_metrics_would_catch_a_total_suffix_on_a_gauge():
    # The check above can fail: the lint the renamed pggan_images_seen gauge used to trip.
    need("promtool", have_binary("promtool"), "install Debian's prometheus package (.ci/install-system.sh)")
    bad = "# HELP pggan_x_total x\n# TYPE pggan_x_total gauge\npggan_x_total 1\n"
    proc = subprocess.run(["promtool", "check", "metrics"], input=bad, capture_output=True, text=True)
    assert proc.returncode != 0 and "_total" in proc.stdout + proc.stderr


# --- a real run fails; Prometheus alerts ---------------------------------------------------------------------

class _Prometheus:
    """Debian's prometheus on a free 127.0.0.1 port, scraping and evaluating every second."""

    def __init__(self, tmp: Path, target_port: int, rule_files: list[Path]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "pggan",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                _get(f"{self.url}/-/ready", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "prometheus did not get ready within 60 s"
                time.sleep(0.3)
        rules = json.loads(_get(f"{self.url}/api/v1/rules"))["data"]["groups"]
        assert rules, f"prometheus loaded no rules from {rule_files}: {self.log_path.read_text()}"

    def query(self, q: str) -> list[dict]:
        body = json.loads(_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": q})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


def test_a_run_that_fails_fast_raises_the_failed_alert_in_prometheus_and_it_outlives_the_exporter(tmp_path):
    need("prometheus", have_binary("prometheus"), "install Debian's prometheus (.ci/install-system.sh)")
    exporter_port, linger_s = free_port(), 40
    prom = _Prometheus(tmp_path, exporter_port, [RULES])
    # Workers that ask for a resource no node has: the stage cannot be placed and the run fails after
    # cluster.start_timeout_s, with the driver's exporter up (a real failure through the state machine).
    cmd = [sys.executable, str(LAUNCH), "--preset", "demo",
           "--set", "run.name=failfast", "--set", f"storage.url={tmp_path / 'runs'}",
           "--set", "metrics.host=127.0.0.1", "--set", f"metrics.port={exporter_port}",
           "--set", f"metrics.linger_s={linger_s}", "--set", "metrics.swd_images=0",
           "--set", "cluster.num_workers=1", "--set", "cluster.resources_per_worker={pggan_test_absent: 1}",
           "--set", "cluster.start_timeout_s=5"]
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **SERVICE_ENV}, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The run is scraped while it runs ...
        _wait(lambda: prom.query('pggan_run_state{run="failfast"} == 1'), 180, "the run's state in Prometheus",
              log=log_path)
        # ... fails, and Prometheus's own ALERTS series has the failed alert, firing (no `for:`) or pending.
        alerts = _wait(lambda: prom.query('ALERTS{alertname="PgganRunFailed",run="failfast"}'), 240,
                       "PgganRunFailed in ALERTS", log=log_path)
        assert driver.poll() is None, "the driver exited before its failed state was alerted on (no linger?)"
        (alert,) = alerts
        assert alert["metric"]["alertstate"] in ("pending", "firing") and alert["metric"]["severity"] == "critical"
        assert alert["metric"]["state"] == "failed"
        assert prom.query('pggan_run_state{run="failfast",state="failed"} == 1')

        rc = driver.wait(timeout=linger_s + 60)
        assert rc == 1, log_path.read_text()[-4000:]
        # The exporter is gone (the target is down and the run's series are stale) ...
        _wait(lambda: not prom.query('pggan_run_state{run="failfast"}'), 30, "the run's series to go stale")
        # ... and the failed alert still fires, while the run does not count as vanished mid-training.
        time.sleep(3)
        firing = prom.query('ALERTS{alertname="PgganRunFailed",run="failfast",alertstate="firing"}')
        assert len(firing) == 1, firing
        assert not prom.query('last_over_time(pggan:run_state{run="failfast",state=~"training|evaluating"}[1h]) == 1')
        assert "cluster.start_timeout_s" in log_path.read_text()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 15)
            try:
                driver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, 9)
                driver.wait()
        prom.stop()
