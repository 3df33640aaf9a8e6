"""deploy/ and k8s/: the Helm chart lints and renders with the real helm CLI, with and without the Prometheus
Operator's API; rendered manifests validate (core kinds with kubernetes-validate, RayJob and Prometheus Operator kinds
against their CRD schemas, the dashboard against Grafana's schema); the dashboard and alert rules query only metrics
Telemetry exports; promtool checks and unit-tests the rules; no credential value ever reaches a manifest; k8s/ is a
fresh render of the chart; the Dockerfile's contract (pinned dependencies resolve, non-root user, entrypoint)."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import FAKE_SECRET, ROOT, have_binary, need
from pggan.config import load_config
from pggan.telemetry import EXTRA_METRICS, METRICS, SERIES_NAMES

CHART = ROOT / "deploy" / "helm" / "pggan"
README = ROOT / "README.md"
MONITORING_API = ("--api-versions", "monitoring.coreos.com/v1")  # as where the Prometheus Operator's CRDs are
RUNBOOK_BASE = "https://github.com/example/pggan-ray/blob/main/README.md"
RULES = ROOT / "deploy" / "prometheus" / "pggan-rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "pggan-rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pggan-dashboard.json"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S_README = ROOT / "k8s" / "README.md"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
K8S_VERSION = "1.33"  # a Kubernetes release the chart targets (Chart.yaml kubeVersion >= 1.25)

CRD_FILES = {
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml",
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


# --- helpers -----------------------------------------------------------------------------------------------

def _need_helm() -> None:
    need("helm", have_binary("helm"), "install the helm CLI (.ci/install-system.sh)")


def _need_schemas() -> None:
    need("shared/k8s-schemas", SCHEMAS.is_dir(), f"{SCHEMAS} holds the CRD and Grafana schemas")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    _need_helm()
    proc = subprocess.run(["helm", *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(*sets: str, check: bool = True, monitoring: bool = True) -> subprocess.CompletedProcess:
    """helm template with --set values; by default as on a cluster that serves monitoring.coreos.com/v1."""
    args = ["template", "pggan", str(CHART), *(MONITORING_API if monitoring else ())]
    for s in sets:
        args += ["--set", s]
    return helm(*args, check=check)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.lru_cache(maxsize=2)
def _default_docs_text(monitoring: bool = True) -> str:
    return render(monitoring=monitoring).stdout


@pytest.fixture
def rendered() -> list[dict]:
    return docs(_default_docs_text())


@pytest.fixture
def rendered_bare() -> list[dict]:
    """The default render on a cluster without the Prometheus Operator's CRDs."""
    return docs(_default_docs_text(monitoring=False))


def one(manifests: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in manifests if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def crd_jsonschema(path: Path, version: str = "v1") -> dict:
    """The CRD's openAPIV3Schema as JSON Schema, applying SOURCES.txt's notes: nullable admits null,
    x-kubernetes-int-or-string admits integer or string, a required field with a default is not required.
    Objects with declared properties admit no others (the API server's strict field validation rejects them)."""
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # RayJob's is 1.4 MB
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _to_jsonschema(v["schema"]["openAPIV3Schema"])


def _to_jsonschema(s: Any) -> Any:
    if not isinstance(s, dict):
        return s
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: _to_jsonschema(v) for k, v in s["properties"].items()}
        if "required" in s:
            s["required"] = [r for r in s["required"] if "default" not in s["properties"].get(r, {})]
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _to_jsonschema(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_to_jsonschema(x) for x in s[key]]
    if s.pop("x-kubernetes-int-or-string", False):
        s["type"] = ["integer", "string"]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [*([s["type"]] if isinstance(s["type"], str) else s["type"]), "null"]
        if "enum" in s:
            s["enum"] = [*s["enum"], None]
    return s


@functools.lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    _need_schemas()
    return jsonschema.Draft7Validator(crd_jsonschema(SCHEMAS / CRD_FILES[(api_version, kind)]))


def crd_errors(doc: dict) -> list[str]:
    v = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in v.iter_errors(doc)]


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges, grouping lists, functions and
    keywords removed). Grafana variables inside strings and ranges go with them."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    names = set()
    for m in re.finditer(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if word and not call and word.lower() not in _PROMQL_WORDS:
            names.add(word)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", []) if "expr" in t]
    return exprs + [a["expr"] for a in d["annotations"]["list"] if "expr" in a]


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def _need_promtool() -> None:
    need("promtool", have_binary("promtool"), "install Debian's prometheus package (.ci/install-system.sh)")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    _need_promtool()
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)


# --- the test helpers themselves ---------------------------------------------------------------------------

def test_promql_metric_names_finds_selectors_and_skips_functions_labels_and_keywords():
    expr = ('histogram_quantile(0.95, sum by (le, run) (increase(foo_bucket{run=~"$run", x="a{b}"}[$__rate_interval])))'
            ' / on(run, trial) group_left bar offset 5m + 1e3 * time() unless baz:rec > 0 and qux')
    assert promql_metric_names(expr) == {"foo_bucket", "bar", "baz:rec", "qux"}


@pytest.mark.integration
def test_crd_validation_rejects_unknown_fields_and_wrong_types(rendered):
    _need_schemas()
    job = copy.deepcopy(one(rendered, "RayJob"))
    assert crd_errors(job) == []
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["templat"] = {}
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "8"
    errors = crd_errors(job)
    assert any("templat" in e for e in errors) and any("replicas" in e for e in errors), errors


# --- helm --------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_helm_lint_strict_passes():
    out = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.integration
def test_chart_renders_the_expected_kinds(rendered):
    assert sorted(d["kind"] for d in rendered) == sorted(
        ["ConfigMap", "ConfigMap", "RayJob", "Service", "ServiceMonitor", "PodMonitor", "PrometheusRule"])
    # No namespace in the manifests: `helm install -n X` and `kubectl -n X apply -f k8s/` both place them.
    assert all("namespace" not in d["metadata"] for d in rendered)


@pytest.mark.integration
def test_without_the_monitoring_api_no_prometheus_operator_object_renders(rendered_bare):
    # helm install would fail on a cluster without the CRDs if they rendered there.
    assert sorted(d["kind"] for d in rendered_bare) == ["ConfigMap", "ConfigMap", "RayJob", "Service"]
    assert not [d for d in rendered_bare if d["apiVersion"].startswith("monitoring.coreos.com/")]


@pytest.mark.integration
@pytest.mark.parametrize("monitoring", [True, False], ids=["monitoring-api", "no-monitoring-api"])
def test_core_kinds_validate_with_kubernetes_validate(monitoring):
    core = [d for d in docs(_default_docs_text(monitoring)) if (d["apiVersion"], d["kind"]) not in CRD_FILES]
    assert {d["kind"] for d in core} == {"ConfigMap", "Service"}
    for d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


@pytest.mark.integration
@pytest.mark.parametrize("monitoring", [True, False], ids=["monitoring-api", "no-monitoring-api"])
def test_custom_resources_validate_against_their_crd_schemas(monitoring):
    custom = [d for d in docs(_default_docs_text(monitoring)) if (d["apiVersion"], d["kind"]) in CRD_FILES]
    expected = {"RayJob", "ServiceMonitor", "PodMonitor", "PrometheusRule"} if monitoring else {"RayJob"}
    assert {d["kind"] for d in custom} == expected
    for d in custom:
        assert crd_errors(d) == [], d["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])


@pytest.mark.integration
def test_non_default_values_still_validate_against_the_crd_schemas():
    out = docs(render("worker.gpusPerPod=0", "ray.auth.secretName=my-ray-token", "priorityClassName=training",
                      "job.labels.kueue\\.x-k8s\\.io/queue-name=gpu", "job.annotations.team=ml",
                      "ray.dashboard.prometheusHost=http://prom:9090", "ray.dashboard.grafanaHost=http://grafana",
                      "job.deletionStrategy.onSuccess.policy=DeleteCluster",
                      "job.deletionStrategy.onFailure.policy=DeleteWorkers").stdout)
    for d in out:
        if (d["apiVersion"], d["kind"]) in CRD_FILES:
            assert crd_errors(d) == [], d["kind"]


@pytest.mark.integration
def test_pod_templates_inside_the_rayjob_validate_as_core_pod_specs(rendered):
    job = one(rendered, "RayJob")["spec"]
    templates = [job["submitterPodTemplate"], job["rayClusterSpec"]["headGroupSpec"]["template"],
                 *[g["template"] for g in job["rayClusterSpec"]["workerGroupSpecs"]]]
    for t in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **t.get("metadata", {})},
               "spec": t["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.integration
def test_rayjob_runs_launch_py_with_the_mounted_config_on_head_and_gpu_workers(rendered):
    job = one(rendered, "RayJob")["spec"]
    assert job["entrypoint"] == "python service/launch.py --config /config/config.yaml"
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (c,) = head["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/config"]
    (vol,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert vol["configMap"]["name"] == one(rendered, "ConfigMap", "-config")["metadata"]["name"]
    (workers,) = job["rayClusterSpec"]["workerGroupSpecs"]
    w = workers["template"]["spec"]
    assert w["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for spec in (head, w):  # /dev/shm in memory: Ray's object store (and NCCL on the workers)
        (shm,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (vol,) = [v for v in spec["volumes"] if v["name"] == shm["name"]]
        assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"]
    assert w["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in w["tolerations"]
    for spec in (head, w):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["containers"][0]["resources"]["requests"] and spec["containers"][0]["resources"]["limits"]


@pytest.mark.integration
def test_config_in_the_configmap_is_a_valid_run_config_matching_the_cluster(rendered, tmp_path):
    cm = one(rendered, "ConfigMap", "-config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    cfg = load_config(str(path))
    job = one(rendered, "RayJob")["spec"]["rayClusterSpec"]
    (group,) = job["workerGroupSpecs"]
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.cluster.num_workers == group["replicas"] * gpus
    assert cfg.cluster.use_gpu is True
    ports = {p["name"]: p["containerPort"] for p in job["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert cfg.metrics.port == ports["pggan-metrics"] and cfg.metrics.host == "0.0.0.0"


@pytest.mark.integration
def test_values_set_resources_node_selection_and_worker_count():
    out = docs(render("worker.gpusPerPod=4", "worker.replicas=2", "worker.nodeSelector.pool=a100",
                      "worker.resources.limits.memory=200Gi", "head.nodeSelector.pool=cpu",
                      "metrics.port=9200").stdout)
    spec = one(out, "RayJob")["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    w = group["template"]["spec"]
    assert w["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "200Gi", "nvidia.com/gpu": 4}
    assert w["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    assert spec["headGroupSpec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    cfg = yaml.safe_load(one(out, "ConfigMap", "-config")["data"]["config.yaml"])
    assert cfg["cluster"]["num_workers"] == 8 and cfg["metrics"]["port"] == 9200
    assert one(out, "Service")["spec"]["ports"][0]["port"] == 9200


@pytest.mark.integration
def test_cpu_workers_get_no_gpu_request_node_selector_or_toleration():
    out = docs(render("worker.gpusPerPod=0", "worker.nodeSelector.pool=cpu").stdout)
    w = one(out, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(w)
    assert w["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in w
    cfg = yaml.safe_load(one(out, "ConfigMap", "-config")["data"]["config.yaml"])
    assert cfg["cluster"]["use_gpu"] is False and cfg["cluster"]["num_workers"] == 8


@pytest.mark.integration
def test_rayjob_labels_annotations_and_priority_class_reach_the_rayjob_and_every_pod():
    out = docs(render("job.labels.kueue\\.x-k8s\\.io/queue-name=gpu-queue", "job.annotations.team=ml",
                      "priorityClassName=training").stdout)
    job = one(out, "RayJob")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["annotations"] == {"team": "ml"}
    spec = job["spec"]
    pods = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"],
            spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]]
    assert [p["spec"]["priorityClassName"] for p in pods] == ["training"] * 3
    assert "priorityClassName" not in json.dumps(one(docs(_default_docs_text()), "RayJob"))


@pytest.mark.integration
def test_chart_works_as_a_subchart_with_global_values():
    out = docs(render("global.imageRegistry=registry.example.com", "global.storageClass=fast").stdout)
    assert one(out, "RayJob")


@pytest.mark.integration
def test_the_exporter_outlives_the_run_by_at_least_two_scrape_intervals():
    def linger(*sets: str) -> float:
        out = docs(render(*sets).stdout)
        return yaml.safe_load(one(out, "ConfigMap", "-config")["data"]["config.yaml"])["metrics"]["linger_s"]

    assert linger() == 75  # 30 s scrapes
    assert linger("metrics.serviceMonitor.interval=60s") == 150
    assert linger("metrics.serviceMonitor.interval=2m") == 300
    assert linger("metrics.serviceMonitor.interval=60s", "config.metrics.linger_s=20") == 20  # the config wins


@pytest.mark.integration
def test_more_train_workers_than_the_worker_group_holds_is_refused():
    proc = render("config.cluster.num_workers=16", check=False)
    assert proc.returncode != 0 and "num_workers" in proc.stderr


@pytest.mark.integration
def test_service_and_servicemonitor_scrape_the_exporter_port_on_the_head(rendered):
    svc, sm = one(rendered, "Service"), one(rendered, "ServiceMonitor")
    head = one(rendered, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert svc["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    ports = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in ports
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"] and endpoint["path"] == "/metrics"
    workers = one(rendered, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert not svc["spec"]["selector"].items() <= workers["metadata"]["labels"].items()


@pytest.mark.integration
def test_prometheusrule_carries_the_rules_file_verbatim(rendered):
    assert one(rendered, "PrometheusRule")["spec"] == yaml.safe_load(RULES.read_text())


@pytest.mark.integration
def test_runbook_base_url_is_rewritten_in_the_prometheusrule_only():
    out = docs(render("metrics.prometheusRule.runbookBaseUrl=https://git.example.com/ml/pggan/README.md").stdout)
    urls = [r["annotations"]["runbook_url"] for g in one(out, "PrometheusRule")["spec"]["groups"]
            for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith("https://git.example.com/ml/pggan/README.md#pggan") for u in urls), urls


@pytest.mark.integration
def test_monitoring_objects_carry_the_kube_prometheus_stack_release_label(rendered):
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert one(rendered, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
    out = docs(render("metrics.prometheusRelease=monitoring", "metrics.serviceMonitor.labels.team=ml",
                      "metrics.prometheusRule.labels.release=rules-only").stdout)
    sm_labels = one(out, "ServiceMonitor")["metadata"]["labels"]
    assert sm_labels["release"] == "monitoring" and sm_labels["team"] == "ml"
    assert one(out, "PodMonitor")["metadata"]["labels"]["release"] == "monitoring"
    assert one(out, "PrometheusRule")["metadata"]["labels"]["release"] == "rules-only"  # per-object label wins
    out = docs(render("metrics.prometheusRelease=").stdout)
    assert all("release" not in one(out, k)["metadata"]["labels"] for k in ("ServiceMonitor", "PodMonitor"))


@pytest.mark.integration
def test_podmonitor_scrapes_rays_metrics_port_on_head_and_workers_only(rendered):
    pm = one(rendered, "PodMonitor")
    job = one(rendered, "RayJob")["spec"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]
    worker = job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    submitter = job["submitterPodTemplate"]

    def selected(pod: dict) -> bool:
        labels = pod["metadata"]["labels"]
        sel = pm["spec"]["selector"]
        ok = sel["matchLabels"].items() <= labels.items()
        for e in sel.get("matchExpressions", []):
            assert e["operator"] == "In"
            ok = ok and labels.get(e["key"]) in e["values"]
        return ok

    assert selected(head) and selected(worker) and not selected(submitter)
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    for pod in (head, worker):
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0].get("ports", [])}
        assert ports[endpoint["port"]] == 8080  # Ray's metrics-export-port as KubeRay sets it
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster",
            "action": "replace"} in endpoint["relabelings"]


@pytest.mark.integration
def test_ray_dashboard_is_pointed_at_prometheus_and_grafana_on_the_head_only():
    out = docs(render("ray.dashboard.prometheusHost=http://prom.monitoring.svc:9090",
                      "ray.dashboard.grafanaHost=http://grafana.monitoring.svc",
                      "ray.dashboard.grafanaIframeHost=https://grafana.example.com").stdout)
    spec = one(out, "RayJob")["spec"]["rayClusterSpec"]
    head_env = {e["name"]: e.get("value") for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_PROMETHEUS_HOST"] == "http://prom.monitoring.svc:9090"
    assert head_env["RAY_GRAFANA_HOST"] == "http://grafana.monitoring.svc"
    assert head_env["RAY_GRAFANA_IFRAME_HOST"] == "https://grafana.example.com"
    assert "RAY_PROMETHEUS_NAME" not in head_env  # unset values stay unset
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert not [e for e in worker.get("env", []) if e["name"].startswith(("RAY_PROMETHEUS", "RAY_GRAFANA"))]
    default = one(docs(_default_docs_text()), "RayJob")
    assert "RAY_PROMETHEUS_HOST" not in json.dumps(default)


# --- Ray token auth ----------------------------------------------------------------------------------------

@pytest.mark.integration
def test_ray_token_auth_is_on_by_default_and_can_name_a_secret_or_be_disabled(rendered):
    assert one(rendered, "RayJob")["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    out = docs(render("ray.auth.secretName=team-ray-token").stdout)
    assert one(out, "RayJob")["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token",
                                                                           "secretName": "team-ray-token"}
    out = docs(render("ray.auth.mode=disabled").stdout)
    assert one(out, "RayJob")["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "disabled"}
    assert render("ray.auth.mode=open", check=False).returncode != 0


@pytest.mark.integration
def test_no_pod_sets_ray_auth_env_itself(rendered):
    # KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on Ray containers and the submitter only where they are unset.
    assert "RAY_AUTH" not in json.dumps(one(rendered, "RayJob"))


def test_chart_and_readme_state_the_kuberay_version_token_auth_needs():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert re.search(r"kuberay-operator>=1\.5\.1\b", chart["annotations"]["pggan/requires"])
    helm_section = README.read_text().split("### Helm chart (KubeRay)", 1)[1].split("\n## ", 1)[0]
    assert "1.5.1" in helm_section and "RAY_AUTH_TOKEN" in helm_section


def _notes(*sets: str) -> str:
    args = ["install", "notes", str(CHART), "--dry-run=client"]  # no cluster: no monitoring.coreos.com/v1
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return out.split("NOTES:", 1)[1]


@pytest.mark.integration
def test_notes_say_how_to_reach_the_dashboard_with_the_token_and_name_no_empty_secret():
    notes = _notes()
    assert "RAY_AUTH_TOKEN" in notes and "auth_token" in notes and "notes-pggan-head-svc 8265" in notes
    assert 'Secret "pggan-s3"' in notes
    assert "no ServiceMonitor, PodMonitor or PrometheusRule was created" in notes
    notes = _notes("s3.existingSecret=", "ray.auth.mode=disabled")
    assert 'Secret ""' not in notes and "service account" in notes
    assert "RAY_AUTH_TOKEN" not in notes


# --- lifecycle ---------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_the_ray_cluster_is_deleted_soon_after_the_run_ends(rendered):
    spec = one(rendered, "RayJob")["spec"]
    # GPU pods freed within a minute; the exporter's target is down for less than a TargetDown alert's 10 min.
    assert spec["shutdownAfterJobFinishes"] is True and 0 <= spec["ttlSecondsAfterFinished"] <= 60


@pytest.mark.integration
def test_a_deletion_strategy_replaces_shutdown_after_job_finishes():
    out = docs(render("job.deletionStrategy.onSuccess.policy=DeleteCluster",
                      "job.deletionStrategy.onFailure.policy=DeleteWorkers").stdout)
    spec = one(out, "RayJob")["spec"]
    assert spec["deletionStrategy"] == {"onSuccess": {"policy": "DeleteCluster"},
                                        "onFailure": {"policy": "DeleteWorkers"}}
    # KubeRay refuses deletionRules together with shutdownAfterJobFinishes, and a TTL without the shutdown.
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec


@pytest.mark.integration
def test_dashboard_configmap_carries_the_dashboard_file_for_the_grafana_sidecar(rendered):
    cm = one(rendered, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["pggan-dashboard.json"]) == dashboard()


@pytest.mark.integration
def test_monitoring_objects_can_be_switched_off():
    out = docs(render("metrics.serviceMonitor.enabled=false", "metrics.prometheusRule.enabled=false",
                      "metrics.rayPodMonitor.enabled=false", "metrics.grafanaDashboard.enabled=false").stdout)
    assert sorted(d["kind"] for d in out) == ["ConfigMap", "RayJob", "Service"]


# --- secrets -----------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_credentials_come_only_from_the_named_secret(rendered):
    text = _default_docs_text()
    assert "kind: Secret" not in text
    out = docs(render("s3.existingSecret=team-s3-creds").stdout)
    spec = one(out, "RayJob")["spec"]["rayClusterSpec"]
    for pod in (spec["headGroupSpec"]["template"], spec["workerGroupSpecs"][0]["template"]):
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name]
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "team-s3-creds"


@pytest.mark.parametrize("setting", [
    f"s3.secretAccessKey={FAKE_SECRET}",
    f"s3.accessKey={FAKE_SECRET}",
    f"config.storage.options.secret={FAKE_SECRET}",
    f"config.storage.options.aws_secret_access_key={FAKE_SECRET}",
    f"config.storage.options.key={FAKE_SECRET}",
    f"config.storage.url=s3://AKIA:{FAKE_SECRET}@bucket/runs",
    f"config.data.source=s3://AKIA:{FAKE_SECRET}@bucket/data",
    f"s3.endpointUrl=http://minio:{FAKE_SECRET}@minio:9000",
    f"extraEnv[0].name=AWS_SECRET_ACCESS_KEY,extraEnv[0].value={FAKE_SECRET}",
])
@pytest.mark.integration
def test_a_secret_value_in_values_is_refused_and_never_rendered(setting):
    proc = render(setting, check=False)
    assert proc.returncode != 0
    assert FAKE_SECRET not in proc.stdout


@pytest.mark.integration
def test_non_secret_storage_options_and_env_still_render():
    out = render("config.storage.options.anon=false", "extraEnv[0].name=NCCL_DEBUG", "extraEnv[0].value=WARN",
                 "s3.endpointUrl=http://minio:9000").stdout
    cfg = yaml.safe_load(one(docs(out), "ConfigMap", "-config")["data"]["config.yaml"])
    assert cfg["storage"]["options"] == {"anon": False}
    assert "NCCL_DEBUG" in out and "http://minio:9000" in out


# --- k8s/ --------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_k8s_manifests_equal_a_fresh_render_by_the_documented_command():
    cmd = next(line.strip() for line in K8S_README.read_text().splitlines() if line.strip().startswith("helm template"))
    argv, target = cmd.split(">")
    rendered_now = helm(*shlex.split(argv)[1:]).stdout
    on_disk = (ROOT / target.strip()).read_text()
    assert rendered_now == on_disk, f"k8s/ is stale: run `{cmd}`"


# --- Dockerfile --------------------------------------------------------------------------------------------

def test_image_runs_as_the_non_root_user_the_chart_expects():
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", _dockerfile_final_stage(), re.M)
    assert users, "the Dockerfile sets no numeric USER"
    uid, gid = users[-1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) != 0
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    assert int(gid or uid) == values["podSecurityContext"]["runAsGroup"]
    assert re.search(r"^WORKDIR /app$", DOCKERFILE.read_text(), re.M)  # the entrypoint's service/launch.py


def _dockerfile_final_stage() -> str:
    return re.split(r"^FROM\s", DOCKERFILE.read_text(), flags=re.M)[-1]


def _dockerignore_includes(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore lets path into the build context (last matching rule wins)."""
    import fnmatch

    included = True
    for line in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pat = line.startswith("!"), line.lstrip("!").rstrip("/")
        pat = pat.replace("**", "*")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):  # path or a parent
            included = negate
    return included


def test_dockerignore_matcher_sees_exclusions():
    assert not _dockerignore_includes("tests/test_deploy.py")
    assert not _dockerignore_includes("service/pggan/__pycache__/x.pyc")
    assert _dockerignore_includes("pyproject.toml")


def test_the_charts_entrypoint_script_is_in_the_image_under_its_workdir():
    entry = yaml.safe_load((CHART / "templates" / "rayjob.yaml").read_text().split("entrypoint:", 1)[1]
                           .splitlines()[0])
    argv = shlex.split(entry)
    assert argv[0] == "python" and argv[1] == "service/launch.py", argv
    assert (ROOT / argv[1]).is_file() and _dockerignore_includes(argv[1])
    final = _dockerfile_final_stage()
    assert re.search(r"^WORKDIR /app$", final, re.M)
    assert re.search(r"^COPY --from=build\b.*\s/app /app$", DOCKERFILE.read_text(), re.M)  # /app/service/launch.py
    assert re.search(r"^COPY service/ service/$", DOCKERFILE.read_text(), re.M)
    assert re.search(r"^ENV PATH=/opt/venv/bin:\$PATH", final, re.M)  # `python` and `ray` are the venv's


def test_a_login_shell_keeps_the_images_virtualenv_on_path(tmp_path):
    # KubeRay (ENABLE_LOGIN_SHELL=true) starts Ray with bash -l: Debian's /etc/profile resets PATH to the
    # system default, then sources /etc/profile.d/*.sh, where the image puts deploy/docker/profile.sh.
    final = _dockerfile_final_stage()
    (src,) = re.findall(r"^COPY (\S+) /etc/profile\.d/[\w.-]+\.sh$", final, re.M)
    assert _dockerignore_includes(src)
    profile = tmp_path / "profile"
    profile.write_text('PATH="/usr/local/bin:/usr/bin:/bin"; export PATH\n'  # what Debian's /etc/profile does
                       f'. "{ROOT / src}"\n. "{ROOT / src}"\n')  # sourced twice: no duplicate entry
    out = subprocess.run(["bash", "--noprofile", "--norc", "-c", f'. "{profile}"; printf %s "$PATH"'],
                         capture_output=True, text=True, check=True, env={"PATH": "/opt/venv/bin:/bin"}).stdout
    assert out == "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"


def _dockerfile_pins() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+_VERSION)=(\S+)$", DOCKERFILE.read_text(), re.M))


def test_the_images_pins_are_the_projects():
    pins = _dockerfile_pins()
    project = yaml.safe_load(json.dumps(__import__("tomllib").loads((ROOT / "pyproject.toml").read_text())))
    deps = project["project"]["dependencies"]
    assert f"torch=={pins['TORCH_VERSION']}" in deps
    assert any(re.fullmatch(rf"ray\[[\w,]+\]=={re.escape(pins['RAY_VERSION'])}", d) for d in deps), deps
    assert yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"] == pins["RAY_VERSION"]


@pytest.mark.integration
def test_the_python_dependencies_the_image_installs_resolve_with_the_pinned_torch_and_ray(tmp_path):
    """The Dockerfile's `pip install` requirement lines, with its ARG defaults, resolve (pip --dry-run from the
    package index; there is no Docker daemon to build the image here)."""
    import sys

    pins = _dockerfile_pins()
    reqs: list[str] = []
    for run in re.findall(r"^RUN (.*?)(?<!\\)$", DOCKERFILE.read_text().replace("\\\n", " "), re.M | re.S):
        for cmd in re.findall(r"pip install ([^;&]+)", run):
            for arg in shlex.split(cmd):
                if arg.startswith("--"):
                    break  # --index-url ...: the alternative CUDA index, not a requirement
                reqs.append(re.sub(r"\$\{(\w+)\}", lambda m: pins[m.group(1)], arg))
    assert reqs.count(".") == 1 and f"torch=={pins['TORCH_VERSION']}" in reqs, reqs
    assert any(r.startswith("ray[") and r.endswith(f"=={pins['RAY_VERSION']}") for r in reqs), reqs
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), *sorted(set(reqs))], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 and re.search(r"(?i)connection|network|resolve host|Max retries", proc.stderr):
        need("the package index", False, proc.stderr[-500:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {re.sub(r"[-_.]+", "-", i["metadata"]["name"].lower()): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    assert got["torch"].split("+")[0] == pins["TORCH_VERSION"] and got["ray"] == pins["RAY_VERSION"], got
    assert got["pggan-ray"] and {"fsspec", "s3fs", "pydantic", "prometheus-client"} <= got.keys()


# --- Grafana dashboard -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_dashboard_validates_against_the_grafana_schema():
    _need_schemas()
    schema = json.loads((SCHEMAS / "grafana" / "dashboard.jsonschema.json").read_text())
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(dashboard())]
    assert errors == []


def test_dashboard_queries_only_metrics_telemetry_exports_and_shows_them_all():
    d = dashboard()
    used: set[str] = set()
    for expr in dashboard_exprs(d):
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= SERIES_NAMES, f"{expr}: unknown {names - SERIES_NAMES}"
        used |= names
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+)(?:\{.*\})?,\s*(\w+)\)", var["query"])
            assert m and m.group(1) in SERIES_NAMES, var["query"]
    families = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                if n.startswith("pggan_checkpoint_duration_seconds") else n for n in used}
    assert families == set(METRICS) | set(EXTRA_METRICS)  # every exported metric has a panel


def test_dashboard_is_templated_on_run_and_trial():
    d = dashboard()
    assert {v["name"] for v in d["templating"]["list"]} >= {"run", "trial"}
    for expr in dashboard_exprs(d):
        for selector in re.findall(r"pggan_\w+(\{[^}]*\})?", expr):
            assert 'run=~"$run"' in selector and 'trial=~"$trial"' in selector, expr


def test_dashboard_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p.get('title')} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p.get("title", "")
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])


@pytest.mark.integration
def test_dashboard_queries_are_valid_promql(tmp_path):
    _need_promtool()
    subst = {"run": "demo", "trial": ".*", "__rate_interval": "1m"}
    rules = [{"record": f"dashboard:query_{i}", "expr": re.sub(r"\$\{?(\w+)\}?", lambda m: subst[m.group(1)], e)}
             for i, e in enumerate(dashboard_exprs(dashboard()))]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Prometheus rules --------------------------------------------------------------------------------------

def test_rules_use_only_metrics_telemetry_exports():
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    alerts = [r for g in rule_groups() for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} >= {"PgganRunFailed", "PgganNoProgress", "PgganCheckpointStale",
                                            "PgganCheckpointFailures", "PgganNonFiniteSteps", "PgganWorkerRestarts"}
    for r in (r for g in rule_groups() for r in g["rules"]):
        names = promql_metric_names(r["expr"])
        assert names and names <= SERIES_NAMES | recorded, f"{r.get('alert') or r['record']}: {names}"
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical") and a["annotations"]["summary"]


def test_every_alert_has_a_runbook_url_to_its_readme_entry():
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")  # GitHub's heading slugs
               for h in re.findall(r"^#+ (.+)$", README.read_text(), re.M)}
    for r in (r for g in rule_groups() for r in g["rules"] if "alert" in r):
        url = r["annotations"].get("runbook_url", "")
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_BASE and anchor == r["alert"].lower() and anchor in anchors, (r["alert"], url)


def test_every_recording_rule_is_used_by_an_alert():
    rules = [r for g in rule_groups() for r in g["rules"]]
    used = set().union(*(promql_metric_names(r["expr"]) for r in rules if "alert" in r))
    assert {r["record"] for r in rules if "record" in r} <= used


def test_every_alert_has_a_promtool_unit_test():
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert tested == {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}


@pytest.mark.integration
def test_promtool_check_rules_passes():
    proc = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.integration
def test_promtool_rule_unit_tests_pass():
    proc = promtool("test", "rules", RULES_TEST.name, cwd=RULES.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
