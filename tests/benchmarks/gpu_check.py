"""Prepared GPU check for the training step (run on a machine with a CUDA device).

    python tests/benchmarks/gpu_check.py OUT_DIR [--smoke] [--budget-s 420]

1. Consistency: a small network trained two steps on CPU (fp32) and on the GPU (fp32, TF32 off) from the
   same weights, data and noise: forward outputs, losses and weight updates must agree.
2. Step benchmark at every resolution 4..1024 with the paper's channels (fmap_base 8192, fmap_max 512,
   latent 512) and minibatches (16 up to 128, then 14, 6, 3), in fp32 and in bf16 autocast.

Writes OUT_DIR/gpu_check.json (rewritten after every result, so a run cut short still leaves its data).
``--smoke`` runs a tiny version on whatever device is present (CPU here) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "service"))

import torch  # noqa: E402

from pggan.config import EmaSection, LossSection, ModelSection, OptimSection  # noqa: E402
from pggan.training import GanTrainer, StepNoise, StepOptions  # noqa: E402
from pggan.training.bench import run_step_bench  # noqa: E402

PAPER_MINIBATCH = {4: 16, 8: 16, 16: 16, 32: 16, 64: 16, 128: 16, 256: 14, 512: 6, 1024: 3}


def consistency(device: str) -> dict:
    """Two training steps of a small network on CPU and on ``device`` from identical state and inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = ModelSection(max_resolution=16, latent_size=32, fmap_base=256, fmap_max=32, mbstd_group_size=4)
    runs = {}
    for dev in ("cpu", device):
        tr = GanTrainer(model, LossSection(), OptimSection(), EmaSection(half_life_kimg=0.01), device=dev,
                        options=StepOptions(amp="none", channels_last=True), seed=0, lr=0.001)
        gen = torch.Generator().manual_seed(1)
        reals = [torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1 for _ in range(2)]
        noise = [StepNoise(torch.randn(8, 32, generator=gen), torch.randn(8, 32, generator=gen),
                           torch.rand(8, generator=gen)) for _ in range(2)]
        w0 = {k: v.detach().cpu().clone() for k, v in tr.D.state_dict().items()}
        with torch.no_grad():
            fwd_g = tr.G(noise[0].z_d.to(dev), 16, 0.5).cpu()
            fwd_d = tr.D(reals[0].to(dev), 16, 0.5).cpu()
        losses = []
        for i in range(2):
            n = noise[i]
            out = tr.train_step(reals[i].to(dev), 16, 0.5,
                                noise=StepNoise(n.z_d.to(dev), n.z_g.to(dev), n.mix.to(dev)))
            losses.append([out["loss_D"], out["loss_G"], out["gp"]])
        w1 = {k: v.detach().cpu() for k, v in tr.D.state_dict().items()}
        runs[dev] = dict(fwd_g=fwd_g, fwd_d=fwd_d, losses=torch.tensor(losses, dtype=torch.float64), w0=w0, w1=w1)
    a, b = runs["cpu"], runs[device]
    g_err = ((a["fwd_g"] - b["fwd_g"]).abs().max() / a["fwd_g"].abs().max()).item()
    d_err = ((a["fwd_d"] - b["fwd_d"]).abs().max() / a["fwd_d"].abs().max()).item()
    loss_err = ((a["losses"] - b["losses"]).abs() / a["losses"].abs().clamp_min(1e-3)).max().item()
    # Weight updates: the CPU-vs-device difference relative to the update itself (Adam with beta1 = 0 makes
    # updates sign-like, so tiny gradient differences can flip a few; compare in aggregate).
    upd = sum((a["w1"][k] - a["w0"][k]).abs().sum().item() for k in a["w0"])
    diff = sum((a["w1"][k] - b["w1"][k]).abs().sum().item() for k in a["w0"])
    upd_err = diff / max(upd, 1e-12)
    ok = g_err < 1e-4 and d_err < 1e-4 and loss_err < 1e-3 and upd_err < 0.02
    return {"device": device, "forward_G_rel_err": g_err, "forward_D_rel_err": d_err, "loss_rel_err": loss_err,
            "weight_update_rel_diff": upd_err, "losses_cpu": a["losses"].tolist(),
            "losses_device": b["losses"].tolist(), "ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop benchmarking after this long")
    ap.add_argument("--resolutions", type=int, nargs="*", default=list(PAPER_MINIBATCH))
    args = ap.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    else:
        torch.backends.cudnn.benchmark = True
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "gpu_check.json"
    report: dict = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "consistency": None,
        "results": [],
        "errors": [],
    }

    def write() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out_path)

    t_start = time.perf_counter()
    try:
        report["consistency"] = consistency(device)
    except Exception:  # keep going: the benchmark numbers are still worth having
        report["errors"].append({"what": "consistency", "error": traceback.format_exc()[-4000:]})
    print("consistency:", json.dumps(report["consistency"]), flush=True)
    write()

    if args.smoke:
        model = ModelSection(latent_size=16, fmap_base=64, fmap_max=8)
        plan = [(r, 4, amp) for r in (4, 8) for amp in ("none", "bf16")]
        steps, warmup = 1, 1
    else:
        model = ModelSection()  # the paper's channels
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs as a user would run them
        torch.backends.cudnn.allow_tf32 = True
        plan = [(r, PAPER_MINIBATCH[r], amp) for amp in ("bf16", "none") for r in args.resolutions]
        steps, warmup = args.steps, args.warmup
    for res, batch, amp in plan:
        if time.perf_counter() - t_start > args.budget_s:
            report["errors"].append({"what": f"{res}/{amp}", "error": "skipped: time budget spent"})
            continue
        try:
            rec = run_step_bench(res, batch, model, LossSection(), StepOptions(amp=amp), device=device,
                                 steps=steps, warmup=warmup)
            if device.startswith("cuda"):
                rec["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            report["results"].append(rec)
            print(json.dumps(rec), flush=True)
        except Exception:
            report["errors"].append({"what": f"{res}/{amp}", "error": traceback.format_exc()[-4000:]})
            print(f"error at {res}/{amp}", file=sys.stderr, flush=True)
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        write()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write()
    ok = report["consistency"] is not None and report["consistency"]["ok"] and not report["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
