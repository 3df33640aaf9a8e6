"""Our training step against pytorch_GAN_zoo's PGAN step, in one process, interleaved step by step (A B A B).

    GAN_ZOO_DIR=/tmp/gan_zoo python tests/benchmarks/peer_step.py [--res 16 32] [--rounds 60] [--threads 2]

Setting up the peer: ../shared/peer-bench/README.md (fetch facebookresearch/pytorch_GAN_zoo, extract it to
GAN_ZOO_DIR). The peer is imported through ../shared/peer-bench/bench_gan_zoo.py (``--peer-bench`` points
elsewhere), never copied here. Both run the same work per step: a D step with WGAN-GP and the drift term, a G
step and the G_ema update, minibatch 16, at most ``--fmap-max`` channels, stable phase (alpha 1).

Each round times one step of ours, then one of theirs; the ratio of a round is their time / ours, so drift of
the machine's speed hits both sides of a ratio alike. One JSON line per resolution: the median ratio with its
quartiles (wall clock, and process CPU time, which other tenants' load moves less), each side's median
ms/step, and the FLOPs of one step of each (torch.utils.flop_counter): speed ratio = FLOP ratio x the ratio
of the FLOP rates achieved.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "service"))

import torch  # noqa: E402

from pggan.config import EmaSection, LossSection, ModelSection, OptimSection  # noqa: E402
from pggan.training import GanTrainer, StepOptions  # noqa: E402
from pggan.training.bench import _NoModuleTracker, count_step_flops  # noqa: E402


def _peer_flops(model: object, reals: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()  # the gradient penalty's autograd.grad, as in count_step_flops
    with counter:
        model.optimizeParameters(reals)  # type: ignore[attr-defined]
    return int(counter.get_total_flops())


def _quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [round(q[0], 3), round(statistics.median(xs), 3), round(q[2], 3)]


def compare(peer: object, res: int, rounds: int, fmap_max: int, batch: int) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # the peer prints as it grows
        theirs = peer.build_model(res, fmap_max, 0.0)  # type: ignore[attr-defined]
    ours = GanTrainer(ModelSection(max_resolution=res, fmap_max=fmap_max), LossSection(), OptimSection(),
                      EmaSection(), device="cpu", options=StepOptions())
    reals = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    flops = {"ours": count_step_flops(ours, reals, res), "peer": _peer_flops(theirs, reals)}
    for _ in range(3):  # warm-up
        ours.train_step(reals, res, 1.0)
        theirs.optimizeParameters(reals)  # type: ignore[attr-defined]
    wall: dict[str, list[float]] = {"ours": [], "peer": []}
    cpu: dict[str, list[float]] = {"ours": [], "peer": []}
    for _ in range(rounds):
        for side, step in (("ours", lambda: ours.train_step(reals, res, 1.0)),
                           ("peer", lambda: theirs.optimizeParameters(reals))):  # type: ignore[attr-defined]
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[side].append(time.perf_counter() - w0)
            cpu[side].append(time.process_time() - c0)
    ratio_wall = [p / o for p, o in zip(wall["peer"], wall["ours"])]
    ratio_cpu = [p / o for p, o in zip(cpu["peer"], cpu["ours"])]
    return {
        "bench": "peer_step", "resolution": res, "batch": batch, "fmap_max": fmap_max, "rounds": rounds,
        "threads": torch.get_num_threads(),
        "ratio_wall_q1_median_q3": _quartiles(ratio_wall),
        "ratio_cpu_q1_median_q3": _quartiles(ratio_cpu),
        "ms_per_step_ours": round(statistics.median(wall["ours"]) * 1e3, 1),
        "ms_per_step_peer": round(statistics.median(wall["peer"]) * 1e3, 1),
        "gflop_per_step_ours": round(flops["ours"] / 1e9, 2),
        "gflop_per_step_peer": round(flops["peer"] / 1e9, 2),
        "flop_ratio": round(flops["peer"] / flops["ours"], 3),
        "loadavg_1min_after": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fmap-max", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peer-bench", default=str(ROOT.parent / "shared" / "peer-bench"),
                    help="folder with bench_gan_zoo.py")
    a = ap.parse_args()
    if not os.environ.get("GAN_ZOO_DIR"):
        print("set GAN_ZOO_DIR to an extracted pytorch_GAN_zoo (see ../shared/peer-bench/README.md)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    sys.path.insert(0, a.peer_bench)
    import bench_gan_zoo as peer  # noqa: E402  (patches Adam's betas check for the 2020 code; same math)

    for res in a.res:
        print(json.dumps(compare(peer, res, a.rounds, a.fmap_max, a.batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
