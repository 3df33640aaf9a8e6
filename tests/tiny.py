"""The tiny run config the end-to-end tests and the drills start from: the demo preset with a network and a
schedule small enough to train in seconds on two CPU workers. Each module states only what it changes."""

from __future__ import annotations

import json
from typing import Any

from pggan.config import deep_merge

TINY: dict[str, Any] = {
    "preset": "demo",
    "run": {"name": "tiny", "seed": 3},
    "data": {"source": "synthetic:shapes", "synthetic_images": 256},
    "model": {"max_resolution": 16, "latent_size": 16, "fmap_base": 64, "fmap_max": 16, "mbstd_group_size": 4},
    "schedule": {"start_resolution": 4, "fade_kimg": 0.128, "stable_kimg": 0.128, "fade_kimg_dict": {},
                 "stable_kimg_dict": {}, "minibatch_base": 16, "minibatch_dict": {}, "lr_base": 0.002},
    "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1, "start_timeout_s": 60},
    "checkpoint": {"every_kimg": 0.064, "keep": 2},
    "metrics": {"tick_kimg": 0.064, "swd_images": 64, "port": 0, "grid_size": 4},
    "ema": {"half_life_kimg": 0.1, "rampup": None},
}


def tiny_config(*overrides: dict[str, Any]) -> dict[str, Any]:
    """A fresh copy of TINY with each override deep-merged in turn (pggan.config.deep_merge: the merge --config
    files get; an empty mapping clears the one below it)."""
    out = json.loads(json.dumps(TINY))
    for over in overrides:
        out = deep_merge(out, json.loads(json.dumps(over)))
    return out
