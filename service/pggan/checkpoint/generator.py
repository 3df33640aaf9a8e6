"""Rebuild a generator from a snapshot or a run directory (for generate / evaluate)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..storage import Storage, join
from .store import FINAL_SNAPSHOT, SNAPSHOT_DIR, CheckpointError, load_snapshot


def resolve_snapshot(storage: Storage, source: str) -> str:
    """A snapshot file as given, or for a run directory its final generator, else its newest stage snapshot."""
    if source.endswith(".pt"):
        return source
    final = join(source, FINAL_SNAPSHOT)
    if storage.exists(final):
        return final
    snaps = sorted(n for n in storage.listdir(join(source, SNAPSHOT_DIR)) if n.endswith(".pt"))
    if snaps:
        return join(source, SNAPSHOT_DIR, snaps[-1])
    raise UserError(f"{source}: no snapshot found (expected {FINAL_SNAPSHOT} or {SNAPSHOT_DIR}/*.pt); "
                    "train first or pass a snapshot file")


def load_generator(source: str, storage: Storage | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, int, dict[str, Any]]:
    """(G_ema in eval mode, the resolution it was trained to, the snapshot's metadata) from a run or snapshot."""
    from ..config import ModelSection
    from ..models import build_networks

    storage = storage or Storage()
    url = resolve_snapshot(storage, source)
    try:
        snap = load_snapshot(storage, url)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    model_cfg = ModelSection.model_validate(snap["model_config"])
    G, _ = build_networks(model_cfg)
    G.load_state_dict(snap["G_ema"])
    G.eval().requires_grad_(False).to(device)
    meta = {k: v for k, v in snap.items() if k != "G_ema"}
    return G, int(snap["resolution"]), meta
