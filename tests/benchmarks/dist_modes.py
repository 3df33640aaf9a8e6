"""Step time of the two data-parallel modes on a 2-rank gloo group (CPU): flat-gradient all-reduce vs DDP.

    python tests/benchmarks/dist_modes.py [--res 8 16 32] [--batch-per-rank 8] [--fmap-max 128] [--steps 6]

Both ranks build one trainer per mode and alternate steps between them (so load from other processes
hits both modes alike). Rank 0 prints one JSON line per (mode, resolution): median and best ms per step.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "service"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MODES = ("allreduce", "ddp")


def _worker(rank: int, port: int, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "service"))
    from pggan.config import EmaSection, LossSection, ModelSection, OptimSection
    from pggan.training import GanTrainer

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for res in args.res:
            model = ModelSection(max_resolution=res, fmap_max=args.fmap_max, latent_size=args.latent_size)
            trainers = {m: GanTrainer(model, LossSection(), OptimSection(), EmaSection(), dist_mode=m) for m in MODES}
            reals = torch.rand(args.batch_per_rank, 3, res, res) * 2 - 1
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for i in range(args.warmup + args.steps):
                for m, tr in trainers.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    tr.train_step(reals, res, 1.0)
                    dist.barrier()
                    if i >= args.warmup:
                        times[m].append(time.perf_counter() - t0)
            if rank == 0:
                for m in MODES:
                    med = statistics.median(times[m])
                    print(json.dumps({"mode": m, "resolution": res, "world_size": 2,
                                      "batch_per_rank": args.batch_per_rank, "fmap_max": args.fmap_max,
                                      "threads_per_rank": args.threads, "ms_median": round(med * 1e3, 1),
                                      "ms_best": round(min(times[m]) * 1e3, 1),
                                      "img_per_s": round(2 * args.batch_per_rank / med, 2)}), flush=True)
    finally:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--batch-per-rank", type=int, default=8)
    ap.add_argument("--fmap-max", type=int, default=128)
    ap.add_argument("--latent-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
