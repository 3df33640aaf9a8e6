"""Helpers for the reliability drills (tests/test_drills.py): real processes, real sockets, no mocks.

- :class:`TcpProxy` sits between the cluster and moto's S3 server; ``cut()`` resets every open connection and
  every new one until ``restore()``: an S3 endpoint outage as clients see it.
- :class:`Driver` runs one driver life (``python service/launch.py ...`` or ``ray job submit ...``) as a child
  process and keeps its output with a timestamp per line.
- :class:`MetricsPoller` scrapes the driver-side Prometheus exporter while the run is alive.
- small readers of the run directory on S3 and of the cluster's state API.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "service" / "launch.py"
RAY_BIN = Path(sys.executable).with_name("ray")


# ---- waiting -------------------------------------------------------------------------------------------

def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
               alive: Callable[[], bool] | None = None) -> Any:
    """Poll cond() until it returns something truthy; fail with ``what`` after timeout (or when alive() is False)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if alive is not None and not alive():
            v = cond()
            if v:
                return v
            raise AssertionError(f"gave up waiting for {what}: the process ended")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


# ---- an S3 outage: a TCP proxy that can be cut -----------------------------------------------------------

class TcpProxy:
    """127.0.0.1:<port> -> target. While cut, open connections are reset and new ones are accepted and reset
    at once (clients see ECONNRESET), so the endpoint URL stays the same across the outage."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self._lsock.settimeout(0.2)
        self.port = self._lsock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self.reset_count = 0  # connections reset because the proxy was cut
        self._thread = threading.Thread(target=self._accept_loop, name="drill-proxy", daemon=True)
        self._thread.start()

    @classmethod
    def to_url(cls, url: str) -> "TcpProxy":
        m = re.match(r"^https?://([^:/]+):(\d+)", url)
        assert m, url
        return cls(m.group(1), int(m.group(2)))

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for a, b in pairs:
            _reset(a)
            _reset(b)
            self.reset_count += 1

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._thread.join(timeout=5)
        self._lsock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._lsock.accept()
            except (socket.timeout, OSError):
                continue
            if not self._up.is_set():
                _reset(client)
                self.reset_count += 1
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair,), name="drill-proxy-pump", daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        peer = {a: b, b: a}
        try:
            while True:
                r, _, _ = select.select([a, b], [], [], 0.5)
                if not self._up.is_set():
                    break
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError
                    peer[s].sendall(data)
        except (OSError, ValueError, ConnectionError):
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            if self._up.is_set():
                for s in pair:
                    try:
                        s.close()
                    except OSError:
                        pass
            else:
                _reset(a)
                _reset(b)


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# ---- one driver life ------------------------------------------------------------------------------------

class Driver:
    """A child process (a driver, or `ray job submit`), its output kept as (time, stream, line)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT):
        self.cmd = cmd
        self.log_path = log_path
        self.lines: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        self.pid = self.proc.pid
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, "out"), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, "err"), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any, name: str) -> None:
        for line in stream:
            with self._lock:
                self.lines.append((time.time(), name, line.rstrip("\n")))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"driver did not finish within {timeout:.0f} s; last output:\n{self.tail()}")
        for t in self._readers:
            t.join(timeout=10)
        self.log_path.write_text(self.text(with_time=True))
        return rc

    def kill_group(self) -> None:
        """Last resort cleanup of this process group only (never anything else)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def text(self, stream: str | None = None, with_time: bool = False) -> str:
        with self._lock:
            rows = list(self.lines)
        return "\n".join((f"{t:.3f} {s} {x}" if with_time else x) for t, s, x in rows if stream in (None, s))

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def find(self, pattern: str, after: float = 0.0) -> list[tuple[float, re.Match]]:
        rx = re.compile(pattern)
        with self._lock:
            rows = list(self.lines)
        return [(t, m) for t, _, x in rows if t >= after for m in [rx.search(x)] if m]

    def wait_for(self, pattern: str, timeout: float, after: float = 0.0) -> tuple[float, re.Match]:
        hit = wait_until(lambda: self.find(pattern, after), timeout, f"output matching {pattern!r}",
                         alive=self.alive)
        return hit[0]


def driver_cmd(cfg_file: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, str(LAUNCH), "--config", str(cfg_file), "--address", address, *extra]


def submit_cmd(dashboard: str, cfg_file: Path, submission_id: str | None = None, no_wait: bool = False,
               *extra: str) -> list[str]:
    cmd = [str(RAY_BIN), "job", "submit", "--address", dashboard, "--working-dir", str(ROOT)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if no_wait:
        cmd += ["--no-wait"]
    return cmd + ["--", "python", "service/launch.py", "--config", str(cfg_file), *extra]


# ---- the driver-side Prometheus exporter ----------------------------------------------------------------

class MetricsPoller:
    """Scrapes http://127.0.0.1:<port>/metrics in a thread; keeps every scrape's time and text."""

    def __init__(self, port: int, interval: float = 0.25):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.scrapes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drill-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
                self.scrapes.append((time.time(), text))
            except OSError:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def value(self, name: str, run: str, before: float | None = None, **labels: str) -> float | None:
        """The sample's value in the newest scrape (taken before ``before``) that has it."""
        for t, text in reversed(self.scrapes):
            if before is not None and t > before:
                continue
            v = sample(text, name, run=run, **labels)
            if v is not None:
                return v
        return None


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


# ---- the run directory on S3 ------------------------------------------------------------------------------

def s3fs_for(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False)


class RunDir:
    """Reads of one run directory ``<bucket>/runs/<name>`` through moto's endpoint (not the proxy)."""

    def __init__(self, endpoint: str, bucket: str, name: str):
        self.endpoint, self.bucket, self.name = endpoint, bucket, name
        self.path = f"{bucket}/runs/{name}"
        self.url = f"s3://{self.path}"
        self.fs = s3fs_for(endpoint)

    def storage(self) -> Any:
        from pggan.storage import Storage

        return Storage(endpoint_url=self.endpoint, retry_attempts=2, retry_max_wait_s=5)

    def run_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/run_state.json"))
        except FileNotFoundError:
            return None

    def committed(self) -> list[int]:
        """Image counts of checkpoints with a meta.json (committed), oldest first."""
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.path}/checkpoints", detail=False)]
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            m = re.match(r"^ckpt-(\d{12})$", n)
            if m and self.fs.exists(f"{self.path}/checkpoints/{n}/meta.json"):
                out.append(int(m.group(1)))
        return sorted(out)

    def uncommitted(self) -> list[int]:
        """Checkpoint directories without a meta.json: writes cut off before their commit marker."""
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.path}/checkpoints", detail=False)]
        except FileNotFoundError:
            return []
        done = set(self.committed())
        return sorted(int(m.group(1)) for n in names for m in [re.match(r"^ckpt-(\d{12})$", n)]
                      if m and int(m.group(1)) not in done)

    def ckpt_path(self, nimg: int) -> str:
        return f"{self.path}/checkpoints/ckpt-{nimg:012d}"

    def metrics(self) -> list[dict[str, Any]]:
        """The run's metric history (history/part-*.jsonl in order; see pggan.history)."""
        try:
            parts = sorted(p for p in self.fs.ls(f"{self.path}/history", detail=False) if p.endswith(".jsonl"))
        except FileNotFoundError:
            return []
        return [json.loads(x) for p in parts for x in self.fs.cat_file(p).decode().splitlines() if x.strip()]


# ---- the cluster's state API ------------------------------------------------------------------------------

# Ray's own cluster-wide singletons: detached by design, shared by every Train run, not state of one run.
RAY_SINGLETONS = ("_AutoscalingCoordinatorActor",)


def alive_actors(dashboard: str, job_id: str | None = None, class_name: str | None = None) -> list[Any]:
    from ray.util.state import list_actors

    filters: list[tuple[str, str, Any]] = [("state", "!=", "DEAD")]
    if job_id:
        filters.append(("job_id", "=", job_id))
    if class_name:
        filters.append(("class_name", "=", class_name))
    return [a for a in list_actors(address=dashboard, filters=filters, limit=10000, detail=True)
            if a.class_name not in RAY_SINGLETONS]


def live_placement_groups(dashboard: str, job_id: str | None = None) -> list[Any]:
    from ray.util.state import list_placement_groups

    filters: list[tuple[str, str, Any]] = [("state", "!=", "REMOVED")]
    if job_id:
        filters.append(("creator_job_id", "=", job_id))
    return list_placement_groups(address=dashboard, filters=filters, limit=10000, detail=True)


def job_id_of(dashboard: str, submission_id: str | None = None, driver_pid: int | None = None) -> str | None:
    from ray.util.state import list_jobs

    for j in list_jobs(address=dashboard, limit=10000, detail=True):
        if submission_id and j.submission_id == submission_id:
            return j.job_id
        info = j.driver_info
        pid = getattr(info, "pid", None) if info is not None and not isinstance(info, dict) else (info or {}).get("pid")
        if driver_pid and pid is not None and int(pid) == driver_pid:
            return j.job_id
    return None


def train_worker_pids(dashboard: str) -> list[int]:
    """pids of live RayTrainWorker processes of this cluster (state API), checked against the process table."""
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
    import psutil

    pids = []
    for a in alive_actors(dashboard, class_name="RayTrainWorker"):
        if a.state != "ALIVE" or not a.pid:
            continue
        try:
            if "RayTrainWorker" in " ".join(psutil.Process(a.pid).cmdline()):
                pids.append(a.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(pids)


def last_logged_nimg(ray_temp: Path, job_id: str, tick_nimg: int) -> int | None:
    """The last image count a job's workers printed in their progress lines ("kimg 0.9/6.1") in the Ray session's
    worker logs: where the workers of a killed driver got to. Ticks fall on multiples of ``tick_nimg`` from 0, more
    than 0.1 kimg apart, so the rounded kimg identifies the tick."""
    best = None
    for f in Path(ray_temp).glob(f"session_latest/logs/worker-*-{job_id}-*.out"):
        for m in re.finditer(r"kimg\s+([\d.]+)/", f.read_text(errors="replace")):
            n = round(float(m.group(1)) * 1000 / tick_nimg) * tick_nimg
            best = n if best is None else max(best, n)
    return best
