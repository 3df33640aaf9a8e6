"""The driver's state machine, persisted as run_state.json in the run directory.

States: pending -> training (stage k) -> evaluating (stage k) -> training (stage k+1) ... -> completed,
or failed / stopped from any of them. Every transition is appended to ``history`` with the driver life
that made it, so a restarted driver (after a crash, on another machine) shows up as a new life and
continues from the last complete checkpoint.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .storage import Storage, join

STATES = ("pending", "training", "evaluating", "completed", "failed", "stopped")
TERMINAL = ("completed", "failed", "stopped")
_ALLOWED = {
    "pending": {"training", "evaluating", "completed", "failed", "stopped"},
    "training": {"training", "evaluating", "completed", "failed", "stopped"},
    "evaluating": {"training", "evaluating", "completed", "failed", "stopped"},
    # A terminal state is left only by a new driver life (resume, or a larger total_kimg).
    "completed": {"pending"},
    "failed": {"pending"},
    "stopped": {"pending"},
}

RUN_STATE = "run_state.json"


class TransitionError(RuntimeError):
    pass


@dataclass
class RunState:
    """In-memory view of run_state.json; :meth:`save` writes it whole (one atomic object write)."""

    state: str = "pending"
    stage_index: int | None = None
    stage: str | None = None
    nimg: int = 0
    total_nimg: int = 0
    worker_restarts: int = 0
    preemptions: int = 0      # worker-group restarts after a node preemption, apart from failures
    nonfinite_steps: int = 0
    message: str = ""
    lives: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, storage: Storage, run_url: str) -> "RunState":
        url = join(run_url, RUN_STATE)
        if not storage.exists(url):
            return cls()
        d = storage.read_json(url)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, storage: Storage, run_url: str) -> None:
        storage.write_json(join(run_url, RUN_STATE), self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "stage_index": self.stage_index, "stage": self.stage, "nimg": self.nimg,
                "total_nimg": self.total_nimg, "worker_restarts": self.worker_restarts,
                "preemptions": self.preemptions,
                "nonfinite_steps": self.nonfinite_steps, "message": self.message, "lives": self.lives,
                "history": self.history}

    @property
    def life(self) -> str | None:
        return self.lives[-1]["id"] if self.lives else None

    def new_life(self) -> str:
        """Register this driver process as a new life of the run; leaves a terminal state for pending."""
        life = {"id": uuid.uuid4().hex[:12], "started": time.time(), "host": socket.gethostname(),
                "pid": os.getpid()}
        self.lives.append(life)
        if self.state in TERMINAL:
            self.transition("pending", note=f"resumed from {self.state}")
        elif self.history:
            self.transition("pending", note=f"driver restarted (previous life ended while {self.state})", force=True)
        else:
            self._record("pending", note="run created")
        return life["id"]

    def transition(self, to: str, *, stage_index: int | None = None, stage: str | None = None,
                   nimg: int | None = None, note: str = "", force: bool = False) -> None:
        if to not in STATES:
            raise TransitionError(f"unknown state {to!r}")
        if not force and to not in _ALLOWED[self.state]:
            raise TransitionError(f"cannot go from {self.state} to {to}")
        self.state = to
        if stage_index is not None:
            self.stage_index, self.stage = stage_index, stage
        if nimg is not None:
            self.nimg = nimg
        if to in TERMINAL or note:
            self.message = note
        self._record(to, note)

    def _record(self, to: str, note: str = "") -> None:
        self.history.append({"time": time.time(), "state": to, "stage_index": self.stage_index, "stage": self.stage,
                             "nimg": self.nimg, "life": self.life, "note": note})
