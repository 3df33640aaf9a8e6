"""Training-state checkpoints and exported snapshots in the run directory.

Layout under ``<run_url>/``::

    checkpoints/ckpt-<nimg:012d>/state.pt    torch.save of tensors and plain types only
    checkpoints/ckpt-<nimg:012d>/meta.json   written LAST: size + sha256 of state.pt, nimg, stage, fingerprint
    snapshots/snapshot-<nimg:012d>.pt        G_ema weights + model config (for generate/evaluate)
    final/generator.pt                       the final G_ema snapshot

A checkpoint counts only once its meta.json exists and state.pt matches it, so a crash or an outage
mid-write never leaves a half-written checkpoint that looks like the latest. Loading verifies the
checksum and uses ``torch.load(weights_only=True)``: a truncated or tampered file is refused and the
next older complete checkpoint is used instead (and the caller is told which were skipped).
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..storage import Storage, join

CKPT_DIR = "checkpoints"
SNAPSHOT_DIR = "snapshots"
FINAL_SNAPSHOT = "final/generator.pt"
FORMAT = 1
_CKPT_RE = re.compile(r"^ckpt-(\d{12})$")


def ckpt_name(nimg: int) -> str:
    return f"ckpt-{nimg:012d}"


@dataclass
class LoadedCheckpoint:
    nimg: int
    url: str
    meta: dict[str, Any]
    state: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (url, why) of newer, unusable checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or unsafe."""


def serialize(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(storage: Storage, run_url: str, nimg: int, state: dict[str, Any], meta: dict[str, Any],
                    on_retry: Callable[[int, BaseException], None] | None = None) -> tuple[str, int]:
    """Write state.pt then meta.json (the commit point). Returns (checkpoint url, bytes written)."""
    url = join(run_url, CKPT_DIR, ckpt_name(nimg))
    data = serialize(state)
    meta = dict(meta, nimg=nimg, format=FORMAT, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                written_at=time.time())
    storage.write_bytes(join(url, "state.pt"), data, on_retry=on_retry)
    storage.write_json(join(url, "meta.json"), meta, on_retry=on_retry)
    return url, len(data)


def list_checkpoints(storage: Storage, run_url: str) -> list[int]:
    """Image counts of checkpoints that have a meta.json (committed), oldest first. Not yet verified."""
    base = join(run_url, CKPT_DIR)
    out = []
    for name in storage.listdir(base):
        m = _CKPT_RE.match(name)
        if m and storage.exists(join(base, name, "meta.json")):
            out.append(int(m.group(1)))
    return sorted(out)


def load_checkpoint_at(storage: Storage, run_url: str, nimg: int) -> LoadedCheckpoint:
    url = join(run_url, CKPT_DIR, ckpt_name(nimg))
    try:
        meta = storage.read_json(join(url, "meta.json"))
        data = storage.read_bytes(join(url, "state.pt"))
    except FileNotFoundError as e:
        raise CheckpointError(f"missing file ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"unreadable meta.json ({e})") from None
    if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"state.pt is {len(data)} bytes and does not match meta.json (truncated or altered)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means: refuse this file
        raise CheckpointError(f"refused to load state.pt safely: {type(e).__name__}: {str(e)[:200]}") from None
    return LoadedCheckpoint(nimg=nimg, url=url, meta=meta, state=state)


def load_latest(storage: Storage, run_url: str, max_nimg: int | None = None,
                log: Callable[[str], None] | None = None) -> LoadedCheckpoint | None:
    """The newest complete, verified checkpoint (at most ``max_nimg``), falling back past bad ones."""
    skipped: list[tuple[str, str]] = []
    for nimg in reversed(list_checkpoints(storage, run_url)):
        if max_nimg is not None and nimg > max_nimg:
            continue
        try:
            ck = load_checkpoint_at(storage, run_url, nimg)
        except CheckpointError as e:
            url = join(run_url, CKPT_DIR, ckpt_name(nimg))
            skipped.append((url, str(e)))
            if log:
                log(f"checkpoint {url} is unusable: {e}; falling back to an older one")
            continue
        ck.skipped = skipped
        return ck
    if skipped and log:
        log("no usable checkpoint left: starting from scratch")
    return None


def latest_nimg(storage: Storage, run_url: str) -> int:
    """Image count of the newest committed checkpoint (0 if none). Cheap: reads no tensors."""
    found = list_checkpoints(storage, run_url)
    return found[-1] if found else 0


def prune(storage: Storage, run_url: str, keep: int, protect: int | None = None) -> list[int]:
    """Delete all but the newest ``keep`` committed checkpoints (never ``protect``). Uncommitted leftovers
    older than the newest committed one are removed too. Returns the image counts deleted."""
    base = join(run_url, CKPT_DIR)
    committed = list_checkpoints(storage, run_url)
    doomed = [n for n in committed[:-keep] if n != protect] if len(committed) > keep else []
    newest = committed[-1] if committed else -1
    for name in storage.listdir(base):
        m = _CKPT_RE.match(name)
        if m and int(m.group(1)) not in committed and int(m.group(1)) < newest:
            doomed.append(int(m.group(1)))
    for nimg in doomed:
        url = join(base, ckpt_name(nimg))
        storage.rm(join(url, "meta.json"))  # uncommit first, so a crash mid-delete leaves no "complete" husk
        storage.rm(url, recursive=True)
    return sorted(doomed)


# ---- exported generator snapshots ----------------------------------------------------------------

def save_snapshot(storage: Storage, url: str, g_ema_state: dict[str, torch.Tensor], model_config: dict[str, Any],
                  resolution: int, nimg: int, extra: dict[str, Any] | None = None) -> None:
    """G_ema weights with everything needed to rebuild the generator (no code is pickled)."""
    payload = {"format": FORMAT, "G_ema": g_ema_state, "model_config": model_config, "resolution": resolution,
               "nimg": nimg, **(extra or {})}
    storage.write_bytes(url, serialize(payload))


def load_snapshot(storage: Storage, url: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise CheckpointError(f"snapshot {url} not found") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"refused to load snapshot {url} safely: {type(e).__name__}: {str(e)[:200]}") from None


def snapshot_url(run_url: str, nimg: int) -> str:
    return join(run_url, SNAPSHOT_DIR, f"snapshot-{nimg:012d}.pt")  # images, as checkpoints: unique below 1 kimg
