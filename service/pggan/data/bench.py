"""`launch.py bench data --resolution R [--batch B --images N --source S]`: loader throughput per worker.

Prints one JSON line per resolution: images per second that one rank's loader delivers (float tensors in
[-1, 1], mirror on), measured after the first batch, and the time to that first batch (the first one of a
process includes importing torch). A synthetic source is rendered at the largest --resolution given. Compare it with
`bench step` at the same resolution: the loader must be several times faster than the step it feeds.
:func:`bench_prepare` measures `prepare` itself (used by tests/benchmarks/bench_data.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from ..errors import UserError
from ..resolution import check as check_resolution
from ..storage import Storage
from .dataset import SYNTHETIC_PREFIX, open_dataset


def loader_throughput(source: str, storage: Storage, resolution: int, *, batch: int, images: int,
                      seed: int = 0, top_resolution: int | None = None) -> dict[str, Any]:
    """Time one rank's loader at ``resolution``: {'img_per_s', 'first_batch_s', ...}.

    ``top_resolution``: the top a synthetic source is rendered at (a run's model.max_resolution; default
    ``resolution``). A prepared source has every level already.
    """
    top = max(top_resolution or resolution, resolution)
    ds = open_dataset(source, storage, top, synthetic_images=max(16384, 2 * images), seed=seed)
    t0 = time.perf_counter()
    with ds.loader(resolution, rank=0, world_size=1, batch_size=batch, seed=seed, mirror=True) as it:
        first = next(it)
        t1 = time.perf_counter()
        n_batches = max(1, -(-images // batch))
        checksum = float(first.mean())
        for _ in range(n_batches):
            checksum += float(next(it)[0, 0, 0, 0])       # touch each batch, as a consumer would
        t2 = time.perf_counter()
    out = {"bench": "data", "source": source, "resolution": resolution, "batch": batch,
           "images": n_batches * batch, "dataset_images": ds.num_images,
           "img_per_s": round(n_batches * batch / (t2 - t1), 1), "first_batch_s": round(t1 - t0, 3)}
    if source.startswith(SYNTHETIC_PREFIX):
        out["top_resolution"] = top
    return out


def bench_data(args: argparse.Namespace) -> int:
    """Entry point of `launch.py bench data`."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    resolutions = args.resolution or [16, 64, 256]
    for r in resolutions:
        check_resolution(r, "--resolution")
    if args.batch < 1 or args.images < 1:
        raise UserError("--batch and --images must be positive")
    storage = Storage()
    if not args.source.startswith(SYNTHETIC_PREFIX):
        ds = open_dataset(args.source, storage, min(resolutions))
        too_high = [r for r in resolutions if r > ds.max_resolution]
        if too_high:
            raise UserError(f"{args.source} is prepared up to {ds.max_resolution}; cannot bench {too_high}")
    # A synthetic source renders at the largest resolution asked for (as a run with that top does) and
    # box-downsamples; bench one resolution at a time to render each at its own size.
    for r in resolutions:
        print(json.dumps(loader_throughput(args.source, storage, r, batch=args.batch, images=args.images,
                                           top_resolution=max(resolutions))), flush=True)
    return 0


def write_png_folder(folder: str, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """n synthetic PNGs of ``size`` (w, h) in a local folder: the input of :func:`bench_prepare`."""
    from PIL import Image

    from .synthetic import render_shapes

    os.makedirs(folder, exist_ok=True)
    w, h = size
    side = max(w, h)
    for s in range(0, n, 64):
        block = render_shapes(seed, np.arange(s, min(n, s + 64)), side)          # [b, 3, S, S]
        for i, img in enumerate(block):
            Image.fromarray(img.transpose(1, 2, 0)[:h, :w]).save(os.path.join(folder, f"{s + i:06d}.png"))


def bench_prepare(src: str, dst: str, resolution: int, workers: int = 0) -> dict[str, Any]:
    """Time `prepare` of ``src`` into a fresh ``dst``: {'images_per_s', 'seconds', ...}."""
    from .prepare import prepare_dataset

    res = prepare_dataset(src, dst, Storage(), resolution, workers=workers, progress=False)
    return {"bench": "prepare", "resolution": resolution, "workers": workers or os.cpu_count(),
            "images": res.manifest["num_images"], "seconds": round(res.seconds, 2),
            "images_per_s": round(res.images_per_second, 1)}
