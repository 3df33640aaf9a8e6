"""Checkpoints (complete training state, for resume) and snapshots (exported G_ema, for use)."""

from .store import (CheckpointError, LoadedCheckpoint, ckpt_name, latest_nimg, list_checkpoints,
                    load_checkpoint_at, load_latest, load_snapshot, prune, save_checkpoint, save_snapshot,
                    snapshot_url)
from .generator import load_generator, resolve_snapshot

__all__ = ["CheckpointError", "LoadedCheckpoint", "ckpt_name", "latest_nimg", "list_checkpoints",
           "load_checkpoint_at", "load_latest", "load_snapshot", "prune", "save_checkpoint", "save_snapshot",
           "snapshot_url", "load_generator", "resolve_snapshot"]
