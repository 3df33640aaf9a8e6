"""The storage seam: every file the product reads or writes goes through fsspec with a `str` URL.

Local paths, file://, memory:// (unit tests), s3:// (with a custom endpoint for S3-compatible stores:
MinIO, Ceph, moto) and anything else fsspec knows. Credentials are never passed here: s3fs/botocore
read them from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or a
web-identity / instance role), so they never reach a config, a log or the run directory.

Object stores have no directories: ``exists`` on a prefix, directory markers and listing after a write
are handled tolerantly. Transient errors are retried with exponential backoff (:func:`retry`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

from .errors import UserError

T = TypeVar("T")


def normalize(url: str) -> str:
    """Absolute form of a URL: local paths become absolute (workers run in another directory)."""
    if url.startswith("file://"):
        return "file://" + os.path.abspath(url[len("file://"):])
    if "://" in url:
        return url.rstrip("/") if url not in ("memory://",) else url
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


@dataclass(frozen=True)
class Storage:
    """A filesystem plus how to reach it. Cheap to build; pass ``endpoint_url``/``options`` across processes
    (they are plain data), never the filesystem object."""

    endpoint_url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    retry_attempts: int = 8
    retry_max_wait_s: float = 120.0

    @classmethod
    def from_config(cls, storage_cfg: Any) -> "Storage":
        return cls(endpoint_url=storage_cfg.endpoint_url, options=dict(storage_cfg.options),
                   retry_attempts=storage_cfg.retry_attempts, retry_max_wait_s=storage_cfg.retry_max_wait_s)

    def fs(self, url: str, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path inside it) for a URL; ``fresh``: a new instance, not fsspec's cached one."""
        url = normalize(url)
        opts = dict(self.options)
        if url.startswith(("s3://", "s3a://")):
            if self.endpoint_url:
                opts.setdefault("endpoint_url", self.endpoint_url)
            elif os.environ.get("AWS_ENDPOINT_URL"):
                opts.setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
            opts.setdefault("config_kwargs", {"connect_timeout": 10, "read_timeout": 60,
                                              "retries": {"max_attempts": 2}})
            # Listings are never cached, so other processes' writes stay visible.
            opts.setdefault("use_listings_cache", False)
            if not fresh and "skip_instance_cache" not in opts:
                return _reused_s3(url, opts)
            opts.setdefault("skip_instance_cache", True)
        return url_to_fs(url, **opts)

    # ---- small, retried operations -------------------------------------------------------------

    def retry(self, what: str, fn: Callable[[], T], on_retry: Callable[[int, BaseException], None] | None = None) -> T:
        return retry(what, fn, attempts=self.retry_attempts, max_wait_s=self.retry_max_wait_s, on_retry=on_retry)

    def exists(self, url: str) -> bool:
        fs, path = self.fs(url)
        return self.retry(f"check {url}", lambda: fs.exists(path))

    def read_bytes(self, url: str) -> bytes:
        fs, path = self.fs(url)
        return self.retry(f"read {url}", lambda: fs.cat_file(path))

    def write_bytes(self, url: str, data: bytes,
                    on_retry: Callable[[int, BaseException], None] | None = None) -> None:
        """Write a whole object. On object stores a PUT is atomic; locally we write a temp file and rename."""
        fs, path = self.fs(url)

        def put() -> None:
            if "file" in _protocols(fs):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                parent = path.rsplit("/", 1)[0]
                if "memory" in _protocols(fs):
                    fs.makedirs(parent, exist_ok=True)
                fs.pipe_file(path, data)

        self.retry(f"write {url}", put, on_retry=on_retry)

    def read_json(self, url: str) -> Any:
        return json.loads(self.read_bytes(url))

    def write_json(self, url: str, obj: Any, on_retry: Callable[[int, BaseException], None] | None = None) -> None:
        self.write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode(), on_retry=on_retry)

    def listdir(self, url: str) -> list[str]:
        """Names (not paths) directly under a prefix; [] if it does not exist. Ignores directory markers."""
        fs, path = self.fs(url)

        def ls() -> list[str]:
            try:
                entries = fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            own = path.rstrip("/")
            names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != own}
            names.discard("")
            return sorted(names)

        return self.retry(f"list {url}", ls)

    def rm(self, url: str, recursive: bool = False) -> None:
        fs, path = self.fs(url)

        def rm() -> None:
            try:
                fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self.retry(f"delete {url}", rm)

    def open(self, url: str, mode: str = "rb") -> Any:
        fs, path = self.fs(url)
        if "w" in mode and "file" in _protocols(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return fs.open(path, mode)

    def check_writable(self, url: str) -> None:
        """Fail early with a clear message when the bucket is missing or credentials are absent or wrong."""
        probe = join(url, f".write-probe-{os.getpid()}-{random.randrange(1 << 30)}")
        try:
            fs, path = self.fs(probe, fresh=True)  # the environment's credentials as they are now
            if "file" in _protocols(fs):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            fs.pipe_file(path, b"ok")
            fs.rm(path)
        except Exception as e:  # noqa: BLE001 - translated into one actionable message
            raise UserError(explain_storage_error(url, e)) from None


# One S3 client per process, options and credentials in the environment: a new client per call reloads botocore's
# service model and credentials, 0.2-0.5 s per operation and seconds per checkpoint. Threads share it (fsspec runs
# every sync call on its one IO loop). Keyed on the credential variables (hashed), so a changed environment gets a
# new client as it did before.
_S3_CLIENTS: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


def _reused_s3(url: str, opts: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    creds = hashlib.sha256("\0".join(os.environ.get(k, "") for k in _CREDENTIAL_VARS).encode()).hexdigest()
    key = (os.getpid(), json.dumps(opts, sort_keys=True, default=str), creds)
    fs = _S3_CLIENTS.get(key)
    if fs is None:
        fs = _S3_CLIENTS[key] = url_to_fs(url, skip_instance_cache=True, **opts)[0]
        _quiet_reset_uploads()
    return fs, fs._strip_protocol(url)


def _quiet_reset_uploads() -> None:
    """When a connection is reset mid-request, aiohttp leaves the task writing the request body unretrieved and
    asyncio prints its traceback ("Task exception was never retrieved"), although the request's own error is
    raised, retried and reported. Drop just those, on fsspec's IO loop (where every S3 call runs)."""
    import fsspec.asyn

    def handler(loop: Any, context: dict[str, Any]) -> None:
        exc, message = context.get("exception"), context.get("message", "")
        if isinstance(exc, ConnectionResetError) and "never retrieved" in message:
            return
        loop.default_exception_handler(context)

    fsspec.asyn.get_loop().set_exception_handler(handler)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def explain_storage_error(url: str, e: BaseException) -> str:
    """One actionable sentence for the usual storage failures (no credentials are ever echoed)."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or ("bucket" in low and "not" in low and "exist" in low):
        return f"storage {url}: the bucket does not exist; create it or fix storage.url"
    if "nocredentials" in low or "unable to locate credentials" in low or "credentials" in low and "not" in low:
        return (f"storage {url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or a role) in the environment")
    # s3fs turns S3's error codes into PermissionError with only the message, e.g. "The AWS Access Key Id you
    # provided does not exist in our records." (InvalidAccessKeyId) or "The request signature we calculated does
    # not match ..." (SignatureDoesNotMatch): match the messages as well as the codes.
    if any(k in low for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "access denied",
                              "forbidden", "access key id you provided", "signature we calculated",
                              "security token", "expiredtoken", "invalidtoken")):
        return (f"storage {url}: access denied; check the credentials in the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket policy")
    if isinstance(e, (ConnectionError, TimeoutError)) or "connect" in low or "endpoint" in low:
        return f"storage {url}: cannot reach the endpoint ({type(e).__name__}); check storage.endpoint_url and the network"
    if isinstance(e, PermissionError):
        return f"storage {url}: permission denied; choose a writable storage.url"
    return f"storage {url}: {type(e).__name__}: {str(e)[:200]}"


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, UserError)


def retry(what: str, fn: Callable[[], T], attempts: int = 8, max_wait_s: float = 120.0,
          base_s: float = 0.5, on_retry: Callable[[int, BaseException], None] | None = None) -> T:
    """Call fn, retrying transient failures with jittered exponential backoff within a time budget.

    Missing files and permission errors are permanent and raised at once.
    """
    deadline = time.monotonic() + max_wait_s
    for i in range(attempts):
        try:
            return fn()
        except _PERMANENT:
            raise
        except Exception as e:  # noqa: BLE001 - transient storage/network errors
            wait = min(base_s * 2**i, 30.0) * (0.5 + random.random() / 2)
            if i == attempts - 1 or time.monotonic() + wait > deadline:
                raise StorageUnavailable(f"{what}: gave up after {i + 1} attempts: {type(e).__name__}: "
                                         f"{str(e)[:200]}") from e
            if on_retry is not None:
                on_retry(i + 1, e)
            time.sleep(wait)
    raise AssertionError("unreachable")


class StorageUnavailable(RuntimeError):
    """Storage kept failing past the retry budget (storage.retry_attempts / storage.retry_max_wait_s)."""
