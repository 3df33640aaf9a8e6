"""Shared fixtures: real components started on free loopback ports (moto's S3 server), tiny configs."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

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


def have_binary(name: str) -> bool:
    return shutil.which(name) is not None
