"""Stage-end work on the driver (no Ray): sample grid, SWD of G_ema against the stage's reals, snapshot.

Everything here reads the stage's final checkpoint from the run directory, so it can be re-run by a
restarted driver, and writes only under the run directory.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from .checkpoint import load_checkpoint_at, save_snapshot, snapshot_url
from .config import RunConfig
from .generate import generate_images, grid_png, latents
from .schedule import Stage
from .storage import Storage, join

METRICS_FILE = "metrics.jsonl"


def g_ema_from_state(cfg: RunConfig, trainer_state: dict[str, Any]) -> torch.nn.Module:
    from .models import build_networks

    G, _ = build_networks(cfg.model)
    G.load_state_dict(trainer_state["G_ema"])
    return G.eval().requires_grad_(False)


def sample_grid_url(run_url: str, stage: Stage) -> str:
    return join(run_url, "samples", f"{stage.name}.png")


def write_grid(cfg: RunConfig, storage: Storage, G: torch.nn.Module, url: str, resolution: int, alpha: float) -> None:
    n = cfg.metrics.grid_size ** 2
    z = latents(n, cfg.model.latent_size, cfg.run.seed + 12345)  # fixed latents: grids comparable across stages
    storage.write_bytes(url, grid_png(generate_images(G, n, resolution, alpha, z=z), cols=cfg.metrics.grid_size))


def swd_of(cfg: RunConfig, storage: Storage, G: torch.nn.Module, data_url: str, resolution: int,
           alpha: float = 1.0) -> dict[str, Any]:
    """SWD x1e3 (per level and average) of G at resolution against the data's reals there."""
    from .data import load_images
    from .metrics import swd

    n = cfg.metrics.swd_images
    # Reals from the same pyramid training sees (opened at the training's top resolution).
    reals = load_images(data_url, storage, resolution, n, seed=cfg.run.seed + 1,
                        synthetic_images=cfg.data.synthetic_images,
                        max_resolution=cfg.data.resolution or cfg.model.max_resolution)
    fakes = generate_images(G, n, resolution, alpha, seed=cfg.run.seed + 2)
    return swd(reals, fakes, seed=cfg.run.seed)


def swd_floor(cfg: RunConfig, storage: Storage, run_url: str, data_url: str, resolution: int) -> dict[str, Any]:
    """The real-vs-real SWD at a resolution (two disjoint real samples), cached in the run directory."""
    from .data import load_images
    from .metrics.swd import cached_swd_noise_floor

    top = cfg.data.resolution or cfg.model.max_resolution
    return cached_swd_noise_floor(
        join(run_url, "swd_floor"), storage, dataset=data_url, resolution=resolution, num_images=cfg.metrics.swd_images,
        seed=cfg.run.seed,
        load_reals=lambda count: load_images(data_url, storage, resolution, count, seed=cfg.run.seed + 3,
                                             synthetic_images=cfg.data.synthetic_images, max_resolution=top))


def append_metrics(storage: Storage, run_url: str, records: list[dict[str, Any]]) -> None:
    """Append records to the run's metric history (JSON lines)."""
    if not records:
        return
    url = join(run_url, METRICS_FILE)
    old = storage.read_bytes(url) if storage.exists(url) else b""
    new = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    storage.write_bytes(url, old + new)


def read_metrics(storage: Storage, run_url: str) -> list[dict[str, Any]]:
    url = join(run_url, METRICS_FILE)
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


def evaluate_stage(cfg: RunConfig, storage: Storage, run_url: str, stage: Stage, data_url: str) -> dict[str, Any]:
    """Grid + SWD + snapshot for a finished stage. Returns the metric-history record."""
    t0 = time.perf_counter()
    ck = load_checkpoint_at(storage, run_url, stage.end)
    G = g_ema_from_state(cfg, ck.state["trainer"])
    alpha = stage.alpha(stage.end)
    write_grid(cfg, storage, G, sample_grid_url(run_url, stage), stage.resolution, alpha)
    save_snapshot(storage, snapshot_url(run_url, stage.end), G.state_dict(), cfg.model.model_dump(mode="json"),
                  stage.resolution, stage.end, extra={"stage": stage.name, "run": cfg.run.name})
    record: dict[str, Any] = {"event": "stage_end", "stage_index": stage.index, "stage": stage.name,
                              "resolution": stage.resolution, "nimg": stage.end, "kimg": stage.end / 1000,
                              "time": time.time()}
    if cfg.metrics.swd_images and stage.resolution >= 8 and (
            cfg.metrics.swd_every_stage or stage.index == cfg_last_index(cfg)):  # 7x7 patches need >= 8x8
        record["swd"] = swd_of(cfg, storage, G, data_url, stage.resolution, alpha)
        record["swd_floor"] = swd_floor(cfg, storage, run_url, data_url, stage.resolution)
    record["eval_seconds"] = time.perf_counter() - t0
    return record


def cfg_last_index(cfg: RunConfig) -> int:
    from .schedule import stages

    return stages(cfg)[-1].index


def untrained_baseline(cfg: RunConfig, storage: Storage, data_url: str) -> dict[str, Any]:
    """SWD of the untrained G_ema at the final resolution: the yardstick the final SWD is compared with."""
    from .models import build_networks

    torch.manual_seed(cfg.run.seed)
    G, _ = build_networks(cfg.model)
    G.eval().requires_grad_(False)
    return {"event": "baseline", "what": "untrained G at max_resolution", "resolution": cfg.model.max_resolution,
            "swd": swd_of(cfg, storage, G, data_url, cfg.model.max_resolution), "time": time.time()}


def swd_table(records: list[dict[str, Any]]) -> str:
    """A plain-text table of SWD x1e3 per stage end (and the untrained baseline)."""
    rows = [r for r in records if r.get("swd")]
    if not rows:
        return "no SWD measured (metrics.swd_images = 0)"
    levels = sorted({int(k) for r in rows for k in r["swd"]["swd_x1e3"]}, reverse=True)
    head = f"{'stage':<18}{'res':>6}" + "".join(f"{lv:>9}" for lv in levels) + f"{'avg':>9}"
    lines = ["SWD x1e3 (lower is better; G_ema vs reals)", head, "-" * len(head)]
    for r in rows:
        name = r.get("stage") or "untrained"
        vals = r["swd"]["swd_x1e3"]
        cells = "".join(f"{vals[str(lv)]:9.2f}" if str(lv) in vals else f"{'':>9}" for lv in levels)
        lines.append(f"{name:<18}{r['resolution']:>6}{cells}{r['swd']['avg']:9.2f}")
    last_floor = next((r for r in reversed(rows) if r.get("swd_floor")), None)
    if last_floor:
        vals = last_floor["swd_floor"]["swd_x1e3"]
        cells = "".join(f"{vals[str(lv)]:9.2f}" if str(lv) in vals else f"{'':>9}" for lv in levels)
        lines.append(f"{'real vs real':<18}{last_floor['resolution']:>6}{cells}{last_floor['swd_floor']['avg']:9.2f}")
    base = next((r for r in rows if r.get("event") == "baseline"), None)
    last = next((r for r in reversed(rows) if r.get("event") == "stage_end"
                 and base and r["resolution"] == base["resolution"]), None)
    if base and last:
        lines.append(f"final / untrained SWD avg: {last['swd']['avg'] / max(base['swd']['avg'], 1e-12):.2f}")
    return "\n".join(lines)
