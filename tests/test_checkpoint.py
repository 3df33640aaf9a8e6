"""Checkpoints: committed only once meta.json lands, verified on load, pruned, safe to unpickle."""

from __future__ import annotations

import io
import os

import pytest
import torch

from pggan.checkpoint import (CheckpointError, ckpt_name, latest_nimg, list_checkpoints, load_checkpoint_at,
                              load_latest, prune, save_checkpoint)
from pggan.storage import Storage, join


@pytest.fixture(params=["memory", "local"])
def run(request, tmp_path):
    storage = Storage(retry_attempts=2, retry_max_wait_s=1)
    if request.param == "memory":
        url = f"memory://ck-{os.getpid()}-{abs(hash(request.node.name))}"  # no glob characters
    else:
        url = str(tmp_path / "run")
    yield storage, url
    storage.rm(url, recursive=True)


def _state(v: float) -> dict:
    return {"trainer": {"G": {"w": torch.full((3, 3), v)}, "step": int(v)}, "nimg": int(v)}


def test_save_then_load_round_trips_tensors_and_plain_values(run):
    storage, url = run
    save_checkpoint(storage, url, 1000, _state(1.0), {"stage": "00-4-stable"})
    ck = load_checkpoint_at(storage, url, 1000)
    assert torch.equal(ck.state["trainer"]["G"]["w"], torch.ones(3, 3))
    assert ck.state["trainer"]["step"] == 1 and ck.meta["stage"] == "00-4-stable" and ck.nimg == 1000


def test_a_checkpoint_without_meta_json_is_invisible(run):
    storage, url = run
    save_checkpoint(storage, url, 1000, _state(1.0), {})
    # A crash after state.pt but before meta.json: the newer checkpoint must not count.
    storage.write_bytes(join(url, "checkpoints", ckpt_name(2000), "state.pt"), b"partial")
    assert list_checkpoints(storage, url) == [1000]
    assert latest_nimg(storage, url) == 1000
    assert load_latest(storage, url).nimg == 1000


def test_truncated_latest_falls_back_to_the_previous_and_says_so(run):
    storage, url = run
    save_checkpoint(storage, url, 1000, _state(1.0), {})
    save_checkpoint(storage, url, 2000, _state(2.0), {})
    state_url = join(url, "checkpoints", ckpt_name(2000), "state.pt")
    storage.write_bytes(state_url, storage.read_bytes(state_url)[:100])
    logs = []
    ck = load_latest(storage, url, log=logs.append)
    assert ck.nimg == 1000
    assert ck.skipped and "truncated" in ck.skipped[0][1]
    assert any("falling back" in line for line in logs)


def test_deleted_state_file_falls_back(run):
    storage, url = run
    save_checkpoint(storage, url, 1000, _state(1.0), {})
    save_checkpoint(storage, url, 2000, _state(2.0), {})
    storage.rm(join(url, "checkpoints", ckpt_name(2000), "state.pt"))
    assert load_latest(storage, url).nimg == 1000


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/pggan-pwned",))


def test_a_tampered_pickle_is_refused_even_with_a_matching_checksum(run, tmp_path):
    import hashlib

    storage, url = run
    save_checkpoint(storage, url, 1000, _state(1.0), {})
    save_checkpoint(storage, url, 2000, _state(2.0), {})
    buf = io.BytesIO()
    torch.save({"trainer": _Evil()}, buf)
    data = buf.getvalue()
    ck_url = join(url, "checkpoints", ckpt_name(2000))
    storage.write_bytes(join(ck_url, "state.pt"), data)
    meta = storage.read_json(join(ck_url, "meta.json"))
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    storage.write_json(join(ck_url, "meta.json"), meta)
    if os.path.exists("/tmp/pggan-pwned"):
        os.remove("/tmp/pggan-pwned")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint_at(storage, url, 2000)
    assert load_latest(storage, url).nimg == 1000
    assert not os.path.exists("/tmp/pggan-pwned")


def test_prune_keeps_the_newest_and_removes_uncommitted_leftovers(run):
    storage, url = run
    for n in (1000, 2000, 3000, 4000):
        save_checkpoint(storage, url, n, _state(n / 1000), {})
    storage.write_bytes(join(url, "checkpoints", ckpt_name(2500), "state.pt"), b"orphan")
    deleted = prune(storage, url, keep=2)
    assert deleted == [1000, 2000, 2500]
    assert list_checkpoints(storage, url) == [3000, 4000]
    assert ckpt_name(2500) not in storage.listdir(join(url, "checkpoints"))


def test_load_latest_respects_max_nimg(run):
    storage, url = run
    for n in (1000, 2000, 3000):
        save_checkpoint(storage, url, n, _state(n / 1000), {})
    assert load_latest(storage, url, max_nimg=2500).nimg == 2000
    assert load_latest(storage, url, max_nimg=500) is None
