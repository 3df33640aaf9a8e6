"""Peak memory of one rank's stage-end SWD (fakes + reals descriptors, distances, floor off), in one process.

    .venv/bin/python tests/benchmarks/eval_memory.py --resolution 256 --images 4096

Prints one JSON line: resolution, images, the descriptor bytes per set and rank, whether they spilled to disk,
the process's peak RSS before and after the evaluation (ru_maxrss), and the wall time. Networks are tiny (the
generator's own memory is not what is measured); the reals are the synthetic shapes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "service"))


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import torch

    from pggan.config import load_config
    from pggan.data import open_dataset
    from pggan.metrics import swd_dist
    from pggan.stage_eval import StageEvaluator
    from pggan.storage import Storage
    from pggan.training import GanTrainer

    torch.set_num_threads(a.threads)
    cfg = load_config(preset="demo", sets=[f"model.max_resolution={a.resolution}", "model.latent_size=16",
                                           "model.fmap_base=2048", "model.fmap_max=8", f"metrics.swd_images={a.images}",
                                           f"data.synthetic_images={2 * a.images}"])
    import tempfile

    storage, run = Storage(), tempfile.mkdtemp(prefix="pggan-eval-memory-")  # local disk, as a run directory
    ds = open_dataset("synthetic:shapes", storage, a.resolution, synthetic_images=cfg.data.synthetic_images)
    G = GanTrainer.from_config(cfg).G_ema
    ev = StageEvaluator(cfg, storage, run, ds, "synthetic:shapes", torch.device("cpu"))
    ds.images(a.resolution, [0])
    before = _rss_gib()
    t0 = time.perf_counter()
    result, _ = ev._swd(G, a.resolution, 1.0, floor=False)
    print(json.dumps({"resolution": a.resolution, "images": a.images,
                      "share_bytes_f16": swd_dist.share_bytes(a.images, a.resolution, 1, 2),
                      "spilled": swd_dist.needs_spill(a.images, a.resolution, 1),
                      "rss_gib_before": round(before, 3),
                      "peak_rss_gib_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "seconds": round(time.perf_counter() - t0, 1), "swd_avg": result["avg"]}))
    import shutil

    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
