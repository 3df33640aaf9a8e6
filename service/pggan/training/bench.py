"""`launch.py bench step`: throughput of one full training step (D step, G step, G_ema update).

Prints one JSON line per resolution: img/s (median over the timed steps after warm-up), ms per step,
FLOPs of one step counted by torch.utils.flop_counter, the achieved GFLOP/s, and every setting, so
lines from different runs can be compared. The networks are built with ``max_resolution`` equal to the
benchmarked resolution, so every layer takes part (as in a stable stage, alpha = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from ..config import EmaSection, LossSection, ModelSection, OptimSection
from ..errors import UserError
from ..resolution import check as check_resolution
from .step import GanTrainer, StepOptions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _NoModuleTracker:
    parents = {"Global"}

    def __enter__(self) -> "_NoModuleTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_step_flops(trainer: GanTrainer, reals: torch.Tensor, res: int) -> int:
    """FLOPs of one training step (all forwards and backwards, the double backward included)."""
    from torch.utils.flop_counter import FlopCounterMode

    state = trainer.state_dict()  # the counted step must not change what is timed afterwards
    counter = FlopCounterMode(display=False)
    # Its per-module tracker hooks reject autograd.grad (the gradient penalty); count globally instead.
    counter.mod_tracker = _NoModuleTracker()
    with counter:
        trainer.train_step(reals, res, 1.0)
    trainer.load_state_dict(state)
    return int(counter.get_total_flops())


def run_step_bench(res: int, batch: int, model: ModelSection, loss: LossSection, options: StepOptions,
                   device: str = "cpu", steps: int = 10, warmup: int = 3, scale_mode: str = "operand",
                   count_flops: bool = True) -> dict[str, Any]:
    """Time ``steps`` training steps at ``res`` after ``warmup`` untimed ones; returns one result record."""
    dev = torch.device(device)
    model = model.model_copy(update={"max_resolution": res})
    trainer = GanTrainer(model, loss, OptimSection(), EmaSection(), device=dev, options=options)
    for net in (trainer.G, trainer.D, trainer.G_ema):
        for m in net.modules():
            if hasattr(m, "scale_mode"):
                m.scale_mode = scale_mode
    gen = torch.Generator(dev).manual_seed(0)
    reals = torch.rand(batch, 3, res, res, generator=gen, device=dev) * 2 - 1
    times = []
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        out = trainer.train_step(reals, res, 1.0)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    flops = count_step_flops(trainer, reals, res) if count_flops else 0
    return {
        "bench": "step", "resolution": res, "batch": batch,
        "img_per_s": round(batch / sec, 3),
        "ms_per_step": round(sec * 1e3, 3),
        "ms_per_step_best": round(min(times) * 1e3, 3),
        "flop_per_step": flops,
        "gflop_per_step": round(flops / 1e9, 3),
        "gflop_per_s": round(flops / sec / 1e9, 2),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "amp": "bf16" if trainer.amp_dtype is not None else "none",
        "compile": options.compile,
        "channels_last": options.channels_last,
        "fused_scale": model.fused_scale,
        "scale_mode": scale_mode,
        "no_grad_fakes": options.no_grad_fakes,
        "freeze_d_in_g_step": options.freeze_d_in_g_step,
        "one_d_pass": options.one_d_pass,
        "fused_adam": options.fused_adam is not False,
        "loss": loss.kind,
        "fmap_base": model.fmap_base, "fmap_max": model.fmap_max, "latent_size": model.latent_size,
        "mbstd_group_size": model.mbstd_group_size, "steps": steps, "warmup": warmup,
        "device_skip": trainer._skip_on_device,
        "loss_D": float(out["loss_D"]),
        "nonfinite": float(out["nonfinite"]),
        "torch": torch.__version__,
    }


def bench_step(args: argparse.Namespace) -> int:
    """Entry point of `launch.py bench step`."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if args.device == "cpu" and args.amp == "bf16" and not torch.backends.mkldnn.is_available():
        raise UserError("--amp bf16 on CPU needs oneDNN")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    options = StepOptions(amp=args.amp,
                          channels_last=not args.no_channels_last,
                          compile=args.compile,
                          no_grad_fakes=not args.grad_fakes,
                          freeze_d_in_g_step=not args.no_freeze_d,
                          one_d_pass=not args.two_d_passes,
                          fused_adam=False if args.no_fused_adam else None,
                          device_skip=False if args.host_sync else None)
    resolutions = args.resolution or [4, 8, 16, 32, 64]
    for r in resolutions:
        check_resolution(r, "--resolution")
    try:
        model = ModelSection(max_resolution=max(resolutions),
                             latent_size=args.latent_size,
                             fmap_base=args.fmap_base,
                             fmap_max=args.fmap_max,
                             fused_scale=not args.no_fused)
    except ValueError as e:  # pydantic's ValidationError
        errors = getattr(e, "errors", lambda: [])()
        raise UserError("bad model arguments: " + "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in errors)
                        if errors else f"bad model arguments: {e}") from None
    loss = LossSection(kind=args.loss)
    for res in resolutions:
        rec = run_step_bench(res, args.batch, model, loss, options, device=args.device, steps=args.steps,
                             warmup=args.warmup, scale_mode=args.scale_mode,
                             count_flops=not args.no_flops)
        print(json.dumps(rec), flush=True)
    sys.stdout.flush()
    return 0
