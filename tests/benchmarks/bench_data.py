"""Data benchmark for the note: prepare throughput and loader img/s per worker on local disk.

    .venv/bin/python tests/benchmarks/bench_data.py [--images 2000] [--resolution 256] [--workers 0]

Writes N synthetic PNGs at the resolution into a temp folder, times `prepare` (decode, Lanczos, pyramid,
shards, checksums) into a temp destination, then `bench data` at 16, 64 and 256 (batch 16) on the result.
Prints JSON lines. Not run by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "service"))

from pggan.data.bench import bench_prepare, loader_throughput, write_png_folder  # noqa: E402
from pggan.storage import Storage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="prepare processes (0 = one per CPU)")
    p.add_argument("--source-size", default=None, metavar="WxH",
                   help="size of the generated PNGs (default: square at --resolution; larger = crop + Lanczos)")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--loader-images", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2, help="loader measurements per resolution")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
        t = time.perf_counter()
        size = tuple(int(v) for v in a.source_size.split("x")) if a.source_size else (a.resolution, a.resolution)
        write_png_folder(src, a.images, size)
        print(json.dumps({"bench": "write_pngs", "images": a.images, "size": list(size),
                          "seconds": round(time.perf_counter() - t, 1)}))
        print(json.dumps(bench_prepare(src, dst, a.resolution, workers=a.workers)), flush=True)
        for r in [x for x in (16, 64, 256) if x <= a.resolution and not a.skip_loader]:
            for _ in range(a.repeats):
                print(json.dumps(loader_throughput(dst, Storage(), r, batch=a.batch, images=a.loader_images)),
                      flush=True)


if __name__ == "__main__":
    main()
