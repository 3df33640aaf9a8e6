"""The run's metric history: tick records, stage-end evaluations and the untrained baseline, in order.

Object stores have no append, so the history is a series of small objects, one per batch of records
(``history/part-<seq>.jsonl``, JSON lines), written once and never rewritten; reading lists the parts and
concatenates them in sequence order. Runs written before this layout kept one ``metrics.jsonl``: it is read
first, as part zero. Only the driver writes the history (one writer per run directory), so the next sequence
number is one past the highest part listed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from .storage import Storage, join

HISTORY_DIR = "history"
LEGACY_FILE = "metrics.jsonl"
_PART = re.compile(r"part-(\d{8})\.jsonl$")


def _parts(storage: Storage, run_url: str) -> list[tuple[int, str]]:
    url = join(run_url, HISTORY_DIR)
    if not storage.exists(url):
        return []
    out = []
    for name in storage.listdir(url):
        m = _PART.search(name)
        if m:
            out.append((int(m.group(1)), join(url, f"part-{m.group(1)}.jsonl")))
    return sorted(out)


def append_records(storage: Storage, run_url: str, records: Iterable[dict[str, Any]]) -> None:
    """Append records to the history as one new object (nothing written for an empty batch)."""
    records = list(records)
    if not records:
        return
    parts = _parts(storage, run_url)
    seq = parts[-1][0] + 1 if parts else 1
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    storage.write_bytes(join(run_url, HISTORY_DIR, f"part-{seq:08d}.jsonl"), body)


def read_records(storage: Storage, run_url: str) -> list[dict[str, Any]]:
    """Every record of the run's history, oldest first."""
    urls = [join(run_url, LEGACY_FILE)] if storage.exists(join(run_url, LEGACY_FILE)) else []
    urls += [u for _, u in _parts(storage, run_url)]
    out: list[dict[str, Any]] = []
    for url in urls:
        out.extend(json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip())
    return out
