"""Shared fixtures: real components started on free loopback ports (moto's S3 server), tiny configs."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"
if str(SERVICE) not in sys.path:
    sys.path.insert(0, str(SERVICE))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(component: str, available: bool, why: str) -> None:
    """A test that needs a component fails under CI=true when it is missing, and skips (saying why) elsewhere."""
    if available:
        return
    msg = f"{component} is not available: {why}"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Fake credentials for moto; distinctive so leak tests can grep for them.
FAKE_KEY_ID = "AKIAPGGANTESTKEY0001"
FAKE_SECRET = "pggan-test-secret-DO-NOT-LEAK-7f3a9c"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 endpoint). Yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:  # pragma: no cover - depends on the environment
        need("moto server", False, f"pip install 'moto[server]' ({e})")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                          "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server. Yields (endpoint_url, bucket name)."""
    import s3fs

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    yield s3_server, name


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a shared 2-core machine torch's pool is ~10x slower oversubscribed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def have_binary(name: str) -> bool:
    return shutil.which(name) is not None


SERVICE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # Ray 2.59+ enables token auth on local clusters; tests opt out explicitly
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # faster report polling in tests (see RAY-NOTES.md)
    "PYTHONPATH": str(SERVICE),
}


def _wait_for_job_agent(dashboard: str, deadline: float) -> None:
    """The dashboard answers before the node's job agent does; submit a no-op job until one runs."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    while True:
        try:
            job = client.submit_job(entrypoint="python -c 'pass'")
            while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                time.sleep(0.5)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """A real local Ray cluster (`ray start --head --block`) on free ports, with 2 CPUs.

    Started after moto so the cluster's processes inherit the (fake) S3 credentials from the environment.
    Runs in its own session so teardown kills exactly this cluster (never `ray stop`, which would kill
    any other Ray cluster on the machine). Yields a dict with address, dashboard URL and env.
    """
    import signal
    import subprocess
    import time
    import urllib.request

    ray_bin = Path(sys.executable).with_name("ray")
    need("ray CLI", ray_bin.exists(), f"{ray_bin} not found; pip install 'ray[default]'")
    gcs, dash, client, node_mgr, obj_mgr, metrics, agent_http, agent_grpc, rt_env = (free_port() for _ in range(9))
    temp = tmp_path_factory.mktemp("ray")
    # `python` in a job's entrypoint must be this environment's, as it is in a cluster's image.
    env = {**os.environ, **SERVICE_ENV, "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--metrics-export-port={metrics}", "--num-cpus=2",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={rt_env}",
           "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).read()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"ray start failed:\n{(temp / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)
    _wait_for_job_agent(dashboard, deadline=time.monotonic() + 120)
    yield {"address": f"127.0.0.1:{gcs}", "dashboard": dashboard, "env": env, "temp": temp, "pid": proc.pid}
    # TERM lets ray clean up; KILL reaps whatever is left, including worker processes in process groups of
    # their own. `ray start --block` takes ~30 s to exit on TERM (measured), so the wait is short: the session
    # is over and its temp dirs go with it.
    descendants = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=3 if sig == signal.SIGTERM else 20)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(1)
    for d in descendants:
        try:
            d.kill()
        except Exception:  # noqa: BLE001 - gone already
            pass
    log.close()


class LocalKubeRayCluster:
    """A local Ray cluster shaped like KubeRay's: a head that offers no CPUs for training (the driver, the Train
    controller and the exporter run there) and worker nodes, each its own `ray start --address` process group on
    its own free ports, so a test can lose a node (its raylet and workers: SIGKILL to its process group) and add a
    replacement. Only processes started here are ever signalled."""

    def __init__(self, temp: Path, env: dict[str, str]):
        self.temp, self.env = temp, env
        self.ray_bin = Path(sys.executable).with_name("ray")
        self.head: Any = None
        self.nodes: dict[str, Any] = {}   # name -> Popen of `ray start --block` (the node's process group)
        self.node_ids: dict[str, str] = {}
        self._logs: list[Any] = []
        self.node_temps: list[Path] = []
        self._next = 0
        self.address = self.dashboard = ""

    def _ports(self) -> list[str]:
        obj, node_mgr, metrics, agent_http, agent_grpc, rt_env = (free_port() for _ in range(6))
        # Worker processes of different nodes on one machine must not pick the same ports: a range per node.
        lo = 20000 + 400 * self._next
        self._next += 1
        return [f"--node-manager-port={node_mgr}", f"--object-manager-port={obj}", f"--metrics-export-port={metrics}",
                f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_env}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 399}"]

    def _short_temp(self) -> Path:
        """A node's Ray temp dir: short, since Unix socket paths under it are limited to 107 bytes (pytest's
        tmp_path leaves too few)."""
        temp = Path(tempfile.mkdtemp(prefix="rk-", dir="/tmp"))
        self.node_temps.append(temp)
        return temp

    def _start(self, args: list[str], name: str) -> Any:
        import subprocess

        log = open(self.temp / f"{name}.log", "w")
        self._logs.append(log)
        return subprocess.Popen([str(self.ray_bin), "start", "--block", *args, "--disable-usage-stats"], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_head(self, attempts: int = 2) -> None:
        """The head, retried once: on a loaded machine a dashboard module sometimes fails to start."""
        for attempt in range(attempts):
            try:
                return self._start_head()
            except RuntimeError as e:
                import signal

                if attempt == attempts - 1:
                    pytest.fail(str(e))
                try:
                    os.killpg(self.head.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.head.wait(timeout=30)

    def _start_head(self) -> None:
        import time
        import urllib.request

        gcs, dash, client = free_port(), free_port(), free_port()
        self.head = self._start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                                 f"--ray-client-server-port={client}", "--num-cpus=0", "--include-dashboard=true",
                                 f"--temp-dir={self._short_temp()}", *self._ports()], "head")
        self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2).read()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if self.head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start --head failed:\n{(self.temp / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        _wait_for_job_agent(self.dashboard, deadline=time.monotonic() + 120)

    def add_worker_node(self, cpus: int = 1, timeout: float = 120) -> str:
        """Start a worker node; returns its name once it is alive in the cluster (its node id in node_ids)."""
        import time

        name = f"worker-{self._next}"
        before = set(self.alive_node_ids())
        # Its own temp dir, as on its own machine: nodes sharing one would each forward every node's worker logs.
        self.nodes[name] = self._start([f"--address={self.address}", f"--num-cpus={cpus}",
                                        f"--temp-dir={self._short_temp()}", *self._ports()], name)
        deadline = time.monotonic() + timeout
        while True:
            new = set(self.alive_node_ids()) - before - set(self.node_ids.values())
            if new:
                self.node_ids[name] = new.pop()
                return name
            if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                log = (self.temp / f"{name}.log").read_text()[-3000:]
                pytest.fail(f"worker node {name} did not join (exit code {self.nodes[name].poll()}):\n{log}")
            time.sleep(0.5)

    def kill_node(self, name: str) -> None:
        """Lose a node at once, as when its pod or VM goes: SIGKILL to its raylet and every process it started
        (Ray starts worker processes in process groups of their own, so the node's group alone would leave them
        running until they notice their raylet is gone)."""
        _kill_tree(self.nodes.pop(name))

    def alive_node_ids(self) -> list[str]:
        from ray.util.state import list_nodes

        try:
            return [n.node_id for n in list_nodes(address=self.dashboard, limit=1000, raise_on_missing_output=False)
                    if n.state == "ALIVE"]
        except Exception as e:  # noqa: BLE001 - the state API may be busy
            print(f"list_nodes: {type(e).__name__}: {str(e)[:300]}")
            return []

    def head_node_id(self) -> str:
        from ray.util.state import list_nodes

        return next(n.node_id for n in list_nodes(address=self.dashboard, detail=True, limit=1000) if n.is_head_node)

    def worker_node_ids(self) -> dict[str, str]:
        """name -> node id of the worker nodes started here and not killed."""
        return {n: self.node_ids[n] for n in self.nodes}

    def node_of_id(self, node_id: str) -> str | None:
        return next((n for n, i in self.worker_node_ids().items() if i == node_id), None)

    def stop(self) -> None:
        import signal
        import subprocess
        import time

        procs = [*self.nodes.values(), *([self.head] if self.head is not None else [])]
        descendants = [d for p in procs for d in _descendants(p.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):  # TERM lets ray clean up; KILL reaps whatever is left
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            for p in procs:
                try:
                    p.wait(timeout=3 if sig == signal.SIGTERM else 20)  # see ray_cluster's teardown
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(1)
        for d in descendants:  # worker processes left in groups of their own
            try:
                d.kill()
            except Exception:  # noqa: BLE001 - gone already
                pass
        for log in self._logs:
            log.close()
        for temp in self.node_temps:
            shutil.rmtree(temp, ignore_errors=True)


def _descendants(pid: int) -> list[Any]:
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: Any) -> None:
    """SIGKILL a `ray start` process, its process group and every process below it, all at once."""
    import signal

    for d in _descendants(proc.pid):
        try:
            d.send_signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - gone already
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def kuberay_cluster(tmp_path_factory, s3_server):
    """A head with 0 CPUs plus two 1-CPU worker nodes (separate `ray start --address` processes), on free ports.

    The head detects a lost node within a few seconds (Ray's health check: every 1 s, 3 misses) instead of the
    default ~30 s. Started after moto so every node inherits the (fake) S3 credentials. Yields the
    :class:`LocalKubeRayCluster`; tests that kill nodes leave two live worker nodes behind them."""
    ray_bin = Path(sys.executable).with_name("ray")
    need("ray CLI", ray_bin.exists(), f"{ray_bin} not found; pip install 'ray[default]'")
    env = {**os.environ, **SERVICE_ENV, "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    cluster = LocalKubeRayCluster(tmp_path_factory.mktemp("ray-kuberay"), env)
    try:
        cluster.start_head()
        cluster.add_worker_node()
        cluster.add_worker_node()
        yield cluster
    finally:
        cluster.stop()
