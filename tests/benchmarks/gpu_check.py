"""GPU check of the training step: one command, under 10 minutes, one JSON file.

    python tests/benchmarks/gpu_check.py OUT_DIR [--smoke] [--budget-s 540] [--busbw-gbs 350]

Sections (OUT_DIR/gpu_check.json is rewritten after each, so a run cut short still leaves its data):

1. consistency: a small network trained two steps on CPU (fp32) and on the device (fp32, TF32 off) from the
   same weights, data and noise: forward outputs, losses and weight updates must agree.
2. host_syncs: one warm training step under torch.cuda.set_sync_debug_mode("error"), locally and in
   allreduce mode on a 1-rank NCCL group (the overlapped bucketed all-reduce): the step must not synchronise
   with the host. The allreduce trainer must also end with the local trainer's weights.
3. allreduce: time of a SUM all-reduce of G's and D's gradients (fp32) per resolution, on a 1-rank group
   (NCCL on CUDA, gloo on CPU). One rank moves no data, so this is the launch/copy floor only; the 8-GPU
   figure used below is modelled as a ring all-reduce, 2 (n-1)/n * bytes / busbw, with --busbw-gbs (nccl-tests'
   "busbw" of the target machine; about 350-450 GB/s on 8 NVLink H100/H200). When several GPUs are visible
   the same sizes are also timed on a real NCCL group of min(8, count) ranks.
4. step: every resolution 4..1024 with the paper's channels (fmap_base 8192, fmap_max 512, latent 512), at the
   paper's 1-GPU minibatches (16 up to 128, then 14, 6, 3) and at the 8-GPU preset's per-GPU minibatches
   (64, 32, 16, 8, then 4), in fp32 and bf16: img/s, ms/step, FLOPs per step (torch.utils.flop_counter),
   achieved TFLOP/s and model FLOP utilisation against the device's dense peak for that precision (TF32
   tensor cores for fp32 when cuDNN may use them, as by default).
5. projection: wall-clock of the 19,000-kimg paper schedule on 8 GPUs (per-GPU step times from 4, the all-reduce
   model from 3, with and without overlap), of the official 8-GPU preset (12,000 kimg), and of the paper
   run on 1 GPU, in fp32 and bf16.
6. ab: bf16 vs fp32 at equal kimg on a short schedule (paper channels, 4x4 -> 32x32, the paper's minibatch,
   lr and G_ema; built-in synthetic shapes held on the device), SWD of G_ema against the reals, a second fp32
   seed for the seed-to-seed spread, and the real-vs-real SWD floor.

7. compile: torch.compile (inductor) against eager, same networks, minibatch and precision, at a mid and a
   high resolution as the rest of the budget allows (--compile-reserve-s of it, 120 s, is kept for this):
   img/s of each, the speed-up, the seconds the first compiled steps took (compilation), and the losses after
   the same steps (the math must not change). ``cluster.compile`` stays off by default until this shows it
   faster.

``--smoke`` runs a tiny version of every section on whatever device is present (CPU here, in seconds) to
check the script itself; it is part of the default test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "service"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pggan.config import EmaSection, LossSection, ModelSection, OptimSection, RunConfig  # noqa: E402
from pggan.models.networks import build_networks  # noqa: E402
from pggan.schedule import stages  # noqa: E402
from pggan.training import GanTrainer, StepNoise, StepOptions  # noqa: E402
from pggan.training.bench import run_step_bench  # noqa: E402

RESOLUTIONS = [4, 8, 16, 32, 64, 128, 256, 512, 1024]
PAPER_MINIBATCH = {4: 16, 8: 16, 16: 16, 32: 16, 64: 16, 128: 16, 256: 14, 512: 6, 1024: 3}  # v1-1gpu, global
PAPER_8GPU_MINIBATCH = {4: 512, 8: 256, 16: 128, 32: 64, 64: 32}                         # v2-8gpus, base 32
PAPER_EMA = EmaSection(half_life_kimg=None, beta_per_step=0.999)

# Dense peak TFLOP/s per precision (vendor data sheets, SXM parts): bf16 tensor, tf32 tensor, fp32 CUDA cores.
PEAKS = [("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
         ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
         ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
         ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
         ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2})]


def per_gpu_8(res: int) -> int:
    return PAPER_8GPU_MINIBATCH.get(res, 32) // 8


def device_peaks(name: str) -> dict[str, float] | None:
    for key, peaks in PEAKS:
        if key.lower() in name.lower():
            return peaks
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pg_init(device: str) -> None:
    """A 1-rank process group in this process (NCCL on CUDA, gloo on CPU)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    backend = "nccl" if device.startswith("cuda") else "gloo"
    kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kw)


# ------------------------------------------------------------------------------------------- 1. consistency

def consistency(device: str) -> dict[str, Any]:
    """Two training steps of a small network on CPU and on ``device`` from identical state and inputs."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
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
                losses.append([float(out["loss_D"]), float(out["loss_G"]), float(out["gp"])])
            w1 = {k: v.detach().cpu() for k, v in tr.D.state_dict().items()}
            runs[dev] = dict(fwd_g=fwd_g, fwd_d=fwd_d, losses=torch.tensor(losses, dtype=torch.float64), w0=w0, w1=w1)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
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


# -------------------------------------------------------------------------------------------- 2. host syncs

def host_syncs(device: str, model: ModelSection, res: int, batch: int) -> dict[str, Any]:
    """A warm step under the CUDA sync debug mode, local and in allreduce mode (1-rank group); and the two
    trainers' weights after the same steps."""
    _pg_init(device)
    out: dict[str, Any] = {"resolution": res, "batch": batch}
    model = model.model_copy(update={"max_resolution": res})
    opts = StepOptions(amp="none", device_skip=True)
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # comparable runs
    try:
        trainers = {mode: GanTrainer(model, LossSection(), OptimSection(), PAPER_EMA, device=device, options=opts,
                                     dist_mode=mode) for mode in ("local", "allreduce")}
        torch.backends.cudnn.benchmark = False  # (the trainer turns it on for CUDA)
        _sync_check_steps(device, res, batch, trainers, out)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    return out


def _sync_check_steps(device: str, res: int, batch: int, trainers: dict[str, GanTrainer], out: dict[str, Any]) -> None:
    w0 = {k: v.detach().cpu().clone() for k, v in trainers["local"].state_dict()["D"].items()}
    gen = torch.Generator(device).manual_seed(0)
    reals = [torch.rand(batch, 3, res, res, generator=gen, device=device) * 2 - 1 for _ in range(3)]
    for mode, tr in trainers.items():
        for i, alpha in enumerate((1.0, 1.0)):  # the first step per key fixes the bucket plan (it may sync)
            tr.train_step(reals[i], res, alpha)
        _sync(device)
        err = None
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("error")
        try:
            stats = tr.train_step(reals[2], res, 1.0)
        except RuntimeError as e:
            err = str(e)[-2000:]
        finally:
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode(0)
        out[mode] = {"checked": device.startswith("cuda"), "sync_error": err,
                     "stat_types": sorted({type(v).__name__ for v in stats.values()}) if err is None else None}
    a, b = (trainers[m].state_dict() for m in ("local", "allreduce"))
    out["allreduce_vs_local_max_abs"] = max(
        (a[net][k].float() - b[net][k].float()).abs().max().item() for net in ("G", "D", "G_ema") for k in a[net])
    # As in consistency(): D's weight change, allreduce vs local, relative to the change itself.
    upd = sum((a["D"][k].cpu() - w0[k]).abs().sum().item() for k in w0)
    diff = sum((a["D"][k].cpu() - b["D"][k].cpu()).abs().sum().item() for k in w0)
    out["allreduce_vs_local_update_rel_diff"] = diff / max(upd, 1e-12)
    out["ok"] = (all(out[m]["sync_error"] is None for m in trainers)
                 and out["allreduce_vs_local_update_rel_diff"] < 0.02)


# ---------------------------------------------------------------------------------------------- 3. allreduce

def grad_sizes(model: ModelSection) -> dict[int, dict[str, int]]:
    """Parameters of G and D that get a gradient in a stable stage at each resolution (fade-ins add one
    toRGB/fromRGB layer, a rounding error)."""
    G, D = build_networks(model)
    out = {}
    for res in [r for r in RESOLUTIONS if r <= model.max_resolution]:
        def used(net: torch.nn.Module, rgb: str) -> int:
            n = 0
            for name, p in net.named_parameters():
                parts = name.split(".")
                if parts[0] == "blocks" and int(parts[1]) <= res or parts[0] == rgb and int(parts[1]) == res:
                    n += p.numel()
            return n
        out[res] = {"G": used(G, "to_rgb"), "D": used(D, "from_rgb")}
    return out


def time_allreduce(device: str, numel: int, reps: int) -> float:
    """Median seconds of a SUM all-reduce of ``numel`` fp32 values on the current group."""
    x = torch.ones(numel, device=device)
    for _ in range(2):
        dist.all_reduce(x)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ring_model_s(numel: int, ranks: int, busbw_gbs: float, latency_s: float = 30e-6, bucket_mb: float = 25.0) -> float:
    """A ring all-reduce of fp32 ``numel`` over ``ranks`` at nccl-tests bus bandwidth, per 25 MB bucket latency."""
    nbytes = numel * 4
    buckets = max(1, math.ceil(nbytes / (bucket_mb * 2**20)))
    return 2 * (ranks - 1) / ranks * nbytes / (busbw_gbs * 1e9) + buckets * latency_s


def _multi_gpu_worker(rank: int, world: int, port: int, sizes: list[int], reps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        res = [time_allreduce(f"cuda:{rank}", n, reps) for n in sizes]
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def allreduce_section(device: str, model: ModelSection, reps: int, busbw_gbs: float) -> dict[str, Any]:
    _pg_init(device)
    sizes = grad_sizes(model)
    rows = []
    for res, s in sizes.items():
        row = {"resolution": res, "G_params": s["G"], "D_params": s["D"]}
        for net in ("G", "D"):
            row[f"{net}_ms_1rank"] = round(time_allreduce(device, s[net], reps) * 1e3, 4)
            row[f"{net}_ms_8gpu_model"] = round(ring_model_s(s[net], 8, busbw_gbs) * 1e3, 4)
        rows.append(row)
    out: dict[str, Any] = {"backend": dist.get_backend(), "busbw_gbs_assumed": busbw_gbs, "rows": rows,
                           "how": "1-rank group: launch/copy floor only (no data leaves the GPU); 8gpu_model: "
                                  "ring all-reduce 2(n-1)/n*bytes/busbw + 30us per 25 MB bucket"}
    n_gpu = torch.cuda.device_count() if device.startswith("cuda") else 0
    if n_gpu >= 2:
        import tempfile

        import torch.multiprocessing as mp

        world = min(8, n_gpu)
        full = [sizes[max(sizes)]["G"], sizes[max(sizes)]["D"]]
        with tempfile.TemporaryDirectory() as tmp:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            path = os.path.join(tmp, "ar.json")
            mp.spawn(_multi_gpu_worker, args=(world, port, full, reps, path), nprocs=world, join=True)
            g_s, d_s = json.loads(Path(path).read_text())
        out["measured_multi_gpu"] = {"ranks": world, "G_ms": round(g_s * 1e3, 3), "D_ms": round(d_s * 1e3, 3),
                                     "busbw_gbs_G": round(2 * (world - 1) / world * full[0] * 4 / g_s / 1e9, 1)}
    return out


# --------------------------------------------------------------------------------------------------- 4. step

def step_section(device: str, model: ModelSection, plan: list[tuple[int, int, str]], steps: int, warmup: int,
                 deadline: float, errors: list[dict[str, Any]], on_result: Callable[[dict[str, Any]], None]) -> None:
    peaks = device_peaks(torch.cuda.get_device_name() if device.startswith("cuda") else "")
    flops_cache: dict[tuple[int, int], int] = {}
    for res, batch, amp in plan:
        if time.perf_counter() > deadline:
            errors.append({"what": f"step {res}/{batch}/{amp}", "error": "skipped: time budget spent"})
            continue
        try:
            known = flops_cache.get((res, batch))
            rec = run_step_bench(res, batch, model, LossSection(), StepOptions(amp=amp), device=device,
                                 steps=steps, warmup=warmup, count_flops=known is None)
            if known is None:
                flops_cache[(res, batch)] = rec["flop_per_step"]
            else:  # FLOPs do not depend on the precision: counted once per shape
                rec["flop_per_step"] = known
                rec["gflop_per_step"] = round(known / 1e9, 3)
                rec["gflop_per_s"] = round(known / (rec["ms_per_step"] / 1e3) / 1e9, 2)
            tflops = rec["gflop_per_s"] / 1e3
            rec["tflop_per_s"] = round(tflops, 3)
            if peaks is not None:
                kind = "bf16" if amp == "bf16" else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
                rec["peak_tflop_per_s"] = peaks[kind]
                rec["peak_kind"] = kind
                rec["mfu"] = round(tflops / peaks[kind], 4)
            if device.startswith("cuda"):
                rec["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            on_result(rec)
            print(json.dumps({k: rec[k] for k in ("resolution", "batch", "amp", "img_per_s", "ms_per_step")}
                             | {"mfu": rec.get("mfu")}), flush=True)
        except Exception:
            errors.append({"what": f"step {res}/{batch}/{amp}", "error": traceback.format_exc()[-4000:]})
            print(f"error at step {res}/{batch}/{amp}", file=sys.stderr, flush=True)
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- 5. projection

def _stage_images(cfg: RunConfig) -> dict[int, int]:
    per_res: dict[int, int] = {}
    for st in stages(cfg):
        per_res[st.resolution] = per_res.get(st.resolution, 0) + st.nimg
    return per_res


def projection(results: list[dict[str, Any]], allreduce: dict[str, Any] | None, max_res: int) -> dict[str, Any]:
    """Days of training from the measured per-GPU step times (stable-stage networks; a fade-in adds a 1x1
    conv and a resampled copy of the image, a few percent at most) and the all-reduce model."""
    ms = {(r["resolution"], r["batch"], r["amp"]): r["ms_per_step"] for r in results}
    comm = {row["resolution"]: (row["G_ms_8gpu_model"] + row["D_ms_8gpu_model"])
            for row in (allreduce or {}).get("rows", [])}
    from pggan.config import load_config

    paper = load_config(preset="paper")
    paper8 = load_config(preset="paper-8gpu")
    # The 19,000-kimg paper schedule on 8 GPUs: its stage lengths and total, the 8-GPU preset's minibatches
    # (the 1-GPU minibatches 14/6/3 do not split over 8 GPUs).
    paper_on_8 = paper.model_copy(update={"schedule": paper.schedule.model_copy(update={
        "minibatch_base": paper8.schedule.minibatch_base, "minibatch_dict": paper8.schedule.minibatch_dict}),
        "cluster": paper.cluster.model_copy(update={"num_workers": 8})})
    runs = {"paper_19000kimg_on_8gpus": (paper_on_8, 8), "paper-8gpu_preset_12000kimg": (paper8, 8),
            "paper_19000kimg_on_1gpu": (paper, 1)}
    out: dict[str, Any] = {}
    for name, (cfg, gpus) in runs.items():
        per_res = _stage_images(cfg)
        for amp in ("none", "bf16"):
            total = total_overlap = 0.0
            rows, missing = [], []
            for res, nimg in sorted(per_res.items()):
                if res > max_res:
                    continue
                b = cfg.schedule.minibatch(res) // gpus
                t = ms.get((res, b, amp))
                if t is None:
                    missing.append(res)
                    continue
                steps = nimg / cfg.schedule.minibatch(res)
                c = comm.get(res, 0.0) if gpus > 1 else 0.0
                total += steps * (t + c) / 1e3
                total_overlap += steps * max(t, c) / 1e3
                rows.append({"resolution": res, "kimg": round(nimg / 1e3, 1), "per_gpu_batch": b,
                             "ms_step": t, "ms_allreduce_model": round(c, 3),
                             "hours_no_overlap": round(steps * (t + c) / 3.6e6, 2)})
            out[f"{name}/{'fp32' if amp == 'none' else 'bf16'}"] = {
                "gpus": gpus, "days_no_overlap": round(total / 86400, 2),
                "days_full_overlap": round(total_overlap / 86400, 2),
                "per_resolution": rows, "missing_resolutions": missing}
    out["note"] = ("steps at each resolution x (measured per-GPU ms/step + modelled all-reduce of G and D grads); "
                   "'full overlap' assumes the bucketed all-reduce hides behind backward. Data loading, ticks, "
                   "checkpoints and stage-end evaluation are not counted. Paper: 8 V100s, about 4 days (v2-8gpus).")
    return out


# ------------------------------------------------------------------------------------------------------ 6. ab

def _reals_on_device(n: int, res: int, device: str, seed: int = 0) -> dict[int, torch.Tensor]:
    """The built-in synthetic shapes at every resolution up to ``res``, uint8 on the device."""
    from pggan.data.dataset import SyntheticDataset

    ds = SyntheticDataset(n, res, seed=seed)
    top = ds.images(res, range(n))
    out = {res: torch.from_numpy(top).to(device)}
    r = res
    while r > 4:  # the 2x2 box pyramid (as prepared data and SyntheticDataset do)
        x = out[r].float()
        out[r // 2] = torch.nn.functional.avg_pool2d(x, 2).round().to(torch.uint8)
        r //= 2
    return out


def ab_run(device: str, model: ModelSection, amp: str, seed: int, stage_kimg: float, data: dict[int, torch.Tensor],
           minibatch: int) -> tuple[torch.nn.Module, float, int]:
    """Train 4x4 -> max with the paper's step at ``minibatch``; returns (G_ema, seconds, images)."""
    cfg = RunConfig.model_validate({
        "run": {"seed": seed}, "model": model.model_dump(),
        "schedule": {"start_resolution": 4, "fade_kimg": stage_kimg, "stable_kimg": stage_kimg,
                     "minibatch_base": minibatch, "lr_base": 0.001},
        "ema": {"half_life_kimg": None, "beta_per_step": 0.999}, "cluster": {"amp": amp}})
    tr = GanTrainer.from_config(cfg, device=device)
    gen = torch.Generator(device).manual_seed(seed + 17)
    t0 = time.perf_counter()
    for st in stages(cfg):
        tr.reset_optimizers(st.lr)
        pool = data[st.resolution]
        for _ in range(st.steps):
            idx = torch.randint(0, pool.shape[0], (minibatch,), generator=gen, device=device)
            x = pool[idx].float() / 127.5 - 1
            flip = torch.rand(minibatch, generator=gen, device=device) < 0.5  # mirror augment
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            tr.train_step(x, st.resolution, st.alpha(tr.nimg))
    _sync(device)
    return tr.G_ema, time.perf_counter() - t0, tr.nimg


def ab_fit_kimg(results: list[dict[str, Any]], want: float, max_res: int, minibatch: int, seconds: float,
                runs: int = 3) -> float:
    """The stage kimg (at most ``want``) whose A/B runs fit in ``seconds``, from the measured step times
    (+20% for data and G_ema sampling, 15 s per run for SWD); ``want`` when the step times are unknown."""
    ms = {(r["resolution"], r["batch"], r["amp"]): r["ms_per_step"] for r in results}
    per_kimg = 0.0
    for amp, n in (("none", runs - 1), ("bf16", 1)):
        for res in [r for r in RESOLUTIONS if r <= max_res]:
            t = ms.get((res, minibatch, amp))
            if t is None:
                return want
            per_kimg += n * (1 if res == 4 else 2) * 1000 / minibatch * t / 1e3 * 1.2
    return max(min(want, (seconds - 15 * runs) / per_kimg), 0.5)


def ab_section(device: str, model: ModelSection, stage_kimg: float, swd_images: int, minibatch: int,
               with_seed_spread: bool) -> dict[str, Any]:
    from pggan.metrics.evaluate import generate_fakes
    from pggan.metrics.swd import swd

    res = model.max_resolution
    data = _reals_on_device(2 * swd_images, res, device)
    reals_a = data[res][:swd_images].cpu().numpy()
    reals_b = data[res][swd_images:].cpu().numpy()
    floor = swd(reals_a, reals_b, seed=0, device=device)["avg"]
    runs: dict[str, Any] = {}
    plan = [("fp32", "none", 0), ("bf16", "bf16", 0)] + ([("fp32_seed1", "none", 1)] if with_seed_spread else [])
    for name, amp, seed in plan:
        G, secs, nimg = ab_run(device, model, amp, seed, stage_kimg, data, minibatch)
        fakes = generate_fakes(G.float(), swd_images, res, seed=1234)
        s = swd(reals_a, fakes, seed=0, device=device)
        runs[name] = {"amp": amp, "seed": seed, "kimg": round(nimg / 1e3, 3), "train_s": round(secs, 1),
                      "img_per_s": round(nimg / secs, 1), "swd_avg": s["avg"], "swd_x1e3": s["swd_x1e3"]}
        print(json.dumps({"ab": name, **{k: runs[name][k] for k in ("kimg", "train_s", "swd_avg")}}), flush=True)
    out: dict[str, Any] = {"resolution": res, "stage_kimg": stage_kimg, "minibatch": minibatch,
                           "swd_images": swd_images, "real_vs_real_swd": floor, "runs": runs}
    diff = abs(runs["bf16"]["swd_avg"] - runs["fp32"]["swd_avg"])
    out["bf16_minus_fp32_swd"] = runs["bf16"]["swd_avg"] - runs["fp32"]["swd_avg"]
    if "fp32_seed1" in runs:
        spread = abs(runs["fp32_seed1"]["swd_avg"] - runs["fp32"]["swd_avg"])
        out["fp32_seed_spread_swd"] = spread
        out["bf16_within_seed_spread"] = bool(diff <= spread)
    return out


# -------------------------------------------------------------------------------------------------- 7. compile

def compile_section(device: str, model: ModelSection, plan: list[tuple[int, int, str]], steps: int, warmup: int,
                    deadline: float, backend: str, min_left_s: float) -> dict[str, Any]:
    """Eager vs compiled step per (resolution, minibatch, amp) in ``plan``, while ``min_left_s`` remain."""
    rows: list[dict[str, Any]] = []
    for res, batch, amp in plan:
        if deadline - time.perf_counter() < min_left_s:
            rows.append({"resolution": res, "batch": batch, "amp": amp, "skipped": "time budget spent"})
            continue
        eager = run_step_bench(res, batch, model, LossSection(), StepOptions(amp=amp), device=device,
                               steps=steps, warmup=warmup, count_flops=False)
        t0 = time.perf_counter()
        comp = run_step_bench(res, batch, model, LossSection(),
                              StepOptions(amp=amp, compile=True, compile_backend=backend), device=device,
                              steps=steps, warmup=warmup, count_flops=False)
        total_s = time.perf_counter() - t0
        row = {"resolution": res, "batch": batch, "amp": amp,
               "eager_img_per_s": eager["img_per_s"], "compiled_img_per_s": comp["img_per_s"],
               "speedup": round(comp["img_per_s"] / eager["img_per_s"], 3),
               # Warm-up steps carry the compilation: everything but the timed steps.
               "compile_s": round(total_s - steps * comp["ms_per_step"] / 1e3, 1),
               "loss_D_eager": eager["loss_D"], "loss_D_compiled": comp["loss_D"]}
        row["loss_D_rel_diff"] = abs(row["loss_D_compiled"] - row["loss_D_eager"]) / max(abs(row["loss_D_eager"]),
                                                                                         1e-6)
        rows.append(row)
        print(json.dumps({"compile": row}), flush=True)
        torch._dynamo.reset()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    done = [r for r in rows if "speedup" in r]
    return {"backend": backend, "rows": rows, "faster_at": [[r["resolution"], r["amp"]] for r in done
                                                            if r["speedup"] > 1.05],
            "how": f"{steps} timed steps after {warmup} warm-up steps each; compile_s = the compiled run's "
                   "wall time less its timed steps (compilation and warm-up); losses after the same steps"}


# ------------------------------------------------------------------------------------------------------ main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this long")
    ap.add_argument("--busbw-gbs", type=float, default=350.0, help="all-reduce bus bandwidth of the 8-GPU target")
    ap.add_argument("--ab-stage-kimg", type=float, default=20.0, help="A/B: kimg per fade-in and stable stage")
    ap.add_argument("--ab-resolution", type=int, default=32)
    ap.add_argument("--ab-swd-images", type=int, default=4096)
    ap.add_argument("--compile-reserve-s", type=float, default=120.0,
                    help="of the budget, kept for the compile section")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["consistency", "host_syncs", "allreduce", "step", "ab", "compile"])
    args = ap.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(min(os.cpu_count() or 1, 2) if args.smoke else (os.cpu_count() or 1))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "gpu_check.json"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    report: dict[str, Any] = {
        "device": device, "device_name": name, "device_count": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke,
        "peaks_tflop_per_s": device_peaks(name), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "consistency": None, "host_syncs": None, "allreduce": None, "results": [], "projection": None, "ab": None,
        "compile": None, "errors": [],
    }

    def write() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out_path)

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s

    def section(key: str, fn: Callable[[], Any]) -> None:
        if key in args.skip:
            return
        if time.perf_counter() > deadline:
            report["errors"].append({"what": key, "error": "skipped: time budget spent"})
            return
        t0 = time.perf_counter()
        try:
            report[key] = fn()
        except Exception:
            report["errors"].append({"what": key, "error": traceback.format_exc()[-4000:]})
            print(f"error in {key}", file=sys.stderr, flush=True)
        report.setdefault("section_s", {})[key] = round(time.perf_counter() - t0, 1)
        if key != "step":
            print(f"{key}:", json.dumps(report[key])[:2000], flush=True)
        write()

    if args.smoke:
        model = ModelSection(max_resolution=16, latent_size=16, fmap_base=64, fmap_max=8, mbstd_group_size=16)
        plan = [(r, b, amp) for r in (4, 8) for b in sorted({PAPER_MINIBATCH[r], per_gpu_8(r)})
                for amp in ("none", "bf16")]
        steps, warmup, reps = 1, 1, 2
        ab_model = ModelSection(max_resolution=16, latent_size=16, fmap_base=64, fmap_max=8, mbstd_group_size=16)
        ab_kimg, ab_images, ab_mb = 0.008, 64, 4
        # aot_eager: the compile path traced (dynamo + AOTAutograd), no code generation: seconds on a CPU.
        compile_plan, compile_backend, compile_min_left = [(8, 4, "none")], "aot_eager", 0.0
    else:
        model = ModelSection(mbstd_group_size=16)  # the paper's networks (v1-1gpu: group = the whole minibatch)
        plan = [(r, b, amp) for amp in ("none", "bf16") for r in RESOLUTIONS
                for b in sorted({PAPER_MINIBATCH[r], per_gpu_8(r)})]
        steps, warmup, reps = args.steps, args.warmup, 10
        ab_model = ModelSection(max_resolution=args.ab_resolution, mbstd_group_size=16)
        ab_kimg, ab_images, ab_mb = args.ab_stage_kimg, args.ab_swd_images, 16
        compile_plan = [(64, 16, "bf16"), (64, 16, "none"), (256, 14, "bf16"), (256, 14, "none")]
        compile_backend, compile_min_left = "inductor", 45.0
        # fp32 as a user runs it: cuDNN convolutions may use TF32 tensor cores (PyTorch's default); matmuls too.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    section("consistency", lambda: consistency(device))
    section("host_syncs", lambda: host_syncs(device, model, 16, 16 if not args.smoke else 4))
    section("allreduce", lambda: allreduce_section(device, model, reps, args.busbw_gbs))
    # The A/B gets its share of the budget first: the benchmark stops early instead.
    ab_reserve = 0.0 if "ab" in args.skip else (5.0 if args.smoke else 200.0)
    compile_reserve = 0.0 if "compile" in args.skip or args.smoke else args.compile_reserve_s
    if "step" not in args.skip:
        t0 = time.perf_counter()
        step_section(device, model, plan, steps, warmup, deadline - ab_reserve - compile_reserve, report["errors"],
                     lambda rec: (report["results"].append(rec), write()))
        report.setdefault("section_s", {})["step"] = round(time.perf_counter() - t0, 1)
    if report["results"]:
        report["projection"] = projection(report["results"], report["allreduce"], model.max_resolution)
        for k, v in report["projection"].items():
            if isinstance(v, dict):
                print(f"projection {k}: {v['days_no_overlap']} days (full overlap {v['days_full_overlap']})",
                      flush=True)
        write()
    if not args.smoke:  # equal kimg for every run, as much as the rest of the budget holds
        ab_kimg = ab_fit_kimg(report["results"], ab_kimg, ab_model.max_resolution, ab_mb,
                              deadline - compile_reserve - time.perf_counter())
    section("ab", lambda: ab_section(device, ab_model, ab_kimg, ab_images, ab_mb, with_seed_spread=True))
    section("compile", lambda: compile_section(device, model, compile_plan, steps, warmup, deadline,
                                               compile_backend, compile_min_left))
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write()
    if dist.is_initialized():
        dist.destroy_process_group()
    ok = (all(report[k] is not None and report[k].get("ok", True) for k in ("consistency", "host_syncs")
              if k not in args.skip) and not report["errors"])
    print(f"wrote {out_path} ({'ok' if ok else 'with problems: see errors'})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
