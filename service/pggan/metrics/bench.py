"""`launch.py bench swd --images N --resolution R [--device cpu|cuda] [--threads T]`: SWD throughput and memory.

Prints one JSON line per resolution: seconds for the SWD of N fake vs N real images (pyramids, descriptors,
512 projections per level, W1), excluding the time spent rendering the images, which are streamed in
batches from the synthetic dataset (two disjoint samples), and the process's peak RSS so far (MB).
cpu_seconds (user + system time of the process, rendering included) is the steadier figure on a shared
machine: wall time there depends on what else runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .swd import swd


def _render(first: int, n: int, resolution: int, batch: int, clock: list[float]) -> Iterator[np.ndarray]:
    """Synthetic images first..first+n in batches; time spent rendering is added to clock[0]."""
    from ..data import render_shapes

    for i in range(first, first + n, batch):
        t = time.perf_counter()
        imgs = render_shapes(1, np.arange(i, min(i + batch, first + n)), resolution)
        clock[0] += time.perf_counter() - t
        yield imgs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_swd_bench(images: int, resolution: int, *, device: str = "cpu", batch: int = 256,
                  seed: int = 0) -> dict[str, Any]:
    """Time one SWD of `images` vs `images` synthetic images at `resolution` (both streamed)."""
    clock = [0.0]
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    result = swd(_render(0, images, resolution, batch, clock), _render(images, images, resolution, batch, clock),
                 seed=seed, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {"bench": "swd", "images": images, "resolution": resolution, "device": device,
            "threads": torch.get_num_threads(), "seconds": round(total - clock[0], 2),
            "render_seconds": round(clock[0], 2), "cpu_seconds": round(cpu_seconds() - cpu0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "storage": result["storage"], "swd_x1e3_avg": round(result["avg"], 4)}


def bench_swd(args: argparse.Namespace) -> int:
    """Entry point of `launch.py bench swd`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    for res in args.resolution or [128]:
        print(json.dumps(run_swd_bench(args.images, res, device=args.device)), flush=True)
    return 0
