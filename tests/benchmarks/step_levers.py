"""Effect of each speed lever on one full training step (D step WGAN-GP + drift, G step, G_ema).

    python tests/benchmarks/step_levers.py [--res 8 16 32 64] [--fmap-max 128] [--batch 16] [--threads 2]
                                           [--reps 3] [--levers all_on no_fused ...]

Configurations are interleaved (A B C ... A B C ...) so that load from other processes hits all of them
alike; for each configuration and resolution the best and the median of the per-repetition medians are
reported, as ms/step and img/s, with the count of samples during which other processes used more than 5%
of the machine (from /proc/stat; --tries N retries those). On a shared machine, --threads 1 --clock thread
ranks by this thread's CPU time, which load from other processes barely moves. One JSON line per (lever, resolution), then a table.
"""

from __future__ import annotations

import argparse
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

# name -> (StepOptions overrides, model overrides, scale_mode, flush_denormal); "aten_double_backward" is
# special-cased: D's convolutions use PyTorch's own double backward.
LEVERS = {
    "all_on": ({}, {}, "operand", False),
    "no_fused": ({}, {"fused_scale": False}, "operand", False),
    "no_channels_last": ({"channels_last": False}, {}, "operand", False),
    "scale_on_output": ({}, {}, "output", False),
    "grad_fakes": ({"no_grad_fakes": False}, {}, "operand", False),
    "no_freeze_d": ({"freeze_d_in_g_step": False}, {}, "operand", False),
    "two_d_passes": ({"one_d_pass": False}, {}, "operand", False),
    "foreach_adam": ({"fused_adam": False}, {}, "operand", False),
    "aten_double_backward": ({}, {}, "operand", False),
    "all_off": ({"channels_last": False, "no_grad_fakes": False, "freeze_d_in_g_step": False, "fused_adam": False,
                 "one_d_pass": False},
                {"fused_scale": False}, "output", False),
    "bf16": ({"amp": "bf16"}, {}, "operand", False),
    "compile": ({"compile": True}, {}, "operand", False),
    "flush_denormal": ({}, {}, "operand", True),
}


def build(name: str, res: int, args: argparse.Namespace) -> GanTrainer:
    opts, model_kw, scale_mode, _ = LEVERS[name]
    model = ModelSection(max_resolution=res, latent_size=args.latent_size, fmap_base=args.fmap_base,
                         fmap_max=args.fmap_max, **model_kw)
    tr = GanTrainer(model, LossSection(), OptimSection(), EmaSection(), options=StepOptions(**opts))
    for net in (tr.G, tr.D, tr.G_ema):
        for m in net.modules():
            if hasattr(m, "scale_mode"):
                m.scale_mode = scale_mode
            if name in ("aten_double_backward", "all_off") and hasattr(m, "fast_double_backward"):
                m.fast_double_backward = False
    return tr


def _busy_jiffies() -> tuple[int, int]:
    """(CPU time used by the whole machine, by this process), in clock ticks."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def time_steps(tr: GanTrainer, reals: torch.Tensor, res: int, steps: int, flush: bool,
               max_other: float = 0.05, max_tries: int = 1) -> tuple[float, float, int]:
    """Run ``steps`` steps; a step during which other processes used more than ``max_other`` of the machine is
    retried up to ``max_tries`` times. Returns (median wall s, median CPU s of this thread, noisy samples).

    With one torch thread every op runs on this thread (the CPU autograd engine runs backward on the
    caller), so its CPU time measures the work itself, whatever else the machine is doing."""
    torch.set_flush_denormal(flush)
    ncpu = os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK")
    try:
        walls, cpus, noisy = [], [], 0
        for _ in range(steps):
            for attempt in range(max_tries):
                b0, o0 = _busy_jiffies()
                c0, t0 = time.thread_time(), time.perf_counter()
                tr.train_step(reals, res, 1.0)
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                b1, o1 = _busy_jiffies()
                other = ((b1 - b0) - (o1 - o0)) / hz / (dt * ncpu)  # share of the machine others used
                if other <= max_other or attempt == max_tries - 1:
                    noisy += other > max_other
                    walls.append(dt)
                    cpus.append(dc)
                    break
        return statistics.median(walls), statistics.median(cpus), noisy
    finally:
        torch.set_flush_denormal(False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fmap-base", type=int, default=8192)
    ap.add_argument("--fmap-max", type=int, default=128)
    ap.add_argument("--latent-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clock", default="wall", choices=["wall", "thread"],
                    help="rank by wall time, or by this thread's CPU time (robust to load; needs --threads 1)")
    ap.add_argument("--tries", type=int, default=1, help="retries of a step disturbed by other processes")
    args = ap.parse_args()
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread needs --threads 1 (other threads' work is not on this thread's clock)")
    torch.set_num_threads(args.threads)

    rows = []
    for res in args.res:
        reals = torch.rand(args.batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
        trainers = {name: build(name, res, args) for name in args.levers}
        for name, tr in trainers.items():
            time_steps(tr, reals, res, args.warmup, LEVERS[name][3], max_tries=1)
        wall: dict[str, list[float]] = {name: [] for name in args.levers}
        cpu: dict[str, list[float]] = {name: [] for name in args.levers}
        noisy: dict[str, int] = {name: 0 for name in args.levers}
        for _ in range(args.reps):
            for name, tr in trainers.items():
                w, c, n_noisy = time_steps(tr, reals, res, args.steps, LEVERS[name][3], max_tries=args.tries)
                wall[name].append(w)
                cpu[name].append(c)
                noisy[name] += n_noisy
        per_rep = cpu if args.clock == "thread" else wall
        base = min(per_rep["all_on"]) if "all_on" in per_rep else None
        for name in args.levers:
            best, med = min(per_rep[name]), statistics.median(per_rep[name])
            rec = {"lever": name, "resolution": res, "batch": args.batch, "threads": args.threads, "clock": args.clock,
                   "fmap_max": args.fmap_max, "ms_best": round(best * 1e3, 1), "ms_median": round(med * 1e3, 1),
                   "img_per_s_best": round(args.batch / best, 2), "img_per_s_median": round(args.batch / med, 2),
                   "speedup_of_all_on_vs_this": round(best / base, 3) if base else None,
                   "wall_ms_best": round(min(wall[name]) * 1e3, 1), "cpu_ms_best": round(min(cpu[name]) * 1e3, 1),
                   "noisy_samples": noisy[name], "samples": args.reps * args.steps}
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        del trainers
    print(f"\n{'lever':<18}" + "".join(f"{r:>16}" for r in args.res))
    for name in args.levers:
        cells = []
        for res in args.res:
            rec = next(r for r in rows if r["lever"] == name and r["resolution"] == res)
            cells.append(f"{rec['img_per_s_best']:>8.2f} ({rec['speedup_of_all_on_vs_this'] or 0:.2f})")
        print(f"{name:<18}" + "".join(f"{c:>16}" for c in cells))
    print(f"img/s best-of-reps by {args.clock} clock (in brackets: all_on's speedup over the row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
