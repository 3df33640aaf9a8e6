"""Stage-end evaluation, run by every training worker together (no Ray here; torch.distributed when initialised).

At a stage end each rank generates its share of the fakes from G_ema and describes them on its own device; the
reals' descriptors are described once per run and resolution (split across ranks the same way) and cached in
the run directory; the distance is computed with every rank taking its share of the directions
(:mod:`pggan.metrics.swd_dist`). Rank 0 writes the sample grid, the snapshot (and after the last stage the
final generator), then the evaluation record ``evaluations/<stage>.json``: its presence marks the stage as
evaluated, so a restarted worker group or driver never evaluates a stage twice. The untrained baseline and the
real-vs-real floor go the same way. Nothing holds a whole image set.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .checkpoint import save_snapshot, snapshot_url
from .checkpoint.store import FINAL_SNAPSHOT
from .config import RunConfig
from .generate import grid_png, latents, to_uint8
from .metrics import swd_dist
from .metrics.swd import ImagesTooSmall, swd_levels
from .schedule import Stage
from .storage import Storage, join

EVAL_DIR = "evaluations"
BASELINE = "baseline"


def sample_grid_url(run_url: str, stage: Stage) -> str:
    return join(run_url, "samples", f"{stage.name}.png")


def eval_marker_url(run_url: str, name: str) -> str:
    return join(run_url, EVAL_DIR, f"{name}.json")


def evaluated(storage: Storage, run_url: str, name: str, nimg: int | None = None) -> dict[str, Any] | None:
    """The record of a finished evaluation (a stage name, or 'baseline'), or None; with nimg, only an evaluation
    at that image count (a stage lengthened by a larger total_kimg is evaluated again at its new end)."""
    url = eval_marker_url(run_url, name)
    if not storage.exists(url):
        return None
    record = storage.read_json(url)
    return record if nimg is None or record.get("nimg") == nimg else None


def g_ema_from_state(cfg: RunConfig, trainer_state: dict[str, Any]) -> torch.nn.Module:
    from .models import build_networks

    G, _ = build_networks(cfg.model)
    G.load_state_dict(trainer_state["G_ema"])
    return G.eval().requires_grad_(False)


class StageEvaluator:
    """One rank's part of the stage-end evaluation. Every rank calls the same methods in the same order."""

    def __init__(self, cfg: RunConfig, storage: Storage, run_url: str, dataset: Any, data_url: str,
                 device: torch.device):
        self.cfg, self.storage, self.run_url, self.dataset = cfg, storage, run_url, dataset
        self.data_url, self.device = data_url, device
        self.rank, self.world = swd_dist.world()
        self.n = cfg.metrics.swd_images
        self.seed = cfg.run.seed
        self.spill: str | None = None  # local directory for descriptors too large to hold (see swd_dist.Share)

    # ---- the two kinds of evaluation ------------------------------------------------------------------
    def baseline(self, G: torch.nn.Module) -> dict[str, Any]:
        """SWD of the untrained G_ema at the final resolution: what the final SWD is compared with."""
        t0 = time.perf_counter()
        res = self.cfg.model.max_resolution
        record: dict[str, Any] = {"event": "baseline", "what": "untrained G_ema at max_resolution", "resolution": res,
                                  "swd": self._swd(G, res, 1.0, floor=False)[0], "time": time.time()}
        record["eval_seconds"] = time.perf_counter() - t0
        self._commit(BASELINE, record)
        return record

    def stage_end(self, G: torch.nn.Module, stage: Stage, last: bool) -> dict[str, Any]:
        """Grid, snapshot, SWD (and its floor) of G_ema at the end of a stage; the final generator after the last."""
        t0 = time.perf_counter()
        alpha = stage.alpha(stage.end)
        if self.rank == 0:
            self._write_grid(G, stage.resolution, alpha, sample_grid_url(self.run_url, stage))
            save_snapshot(self.storage, snapshot_url(self.run_url, stage.end), _cpu(G.state_dict()),
                          self.cfg.model.model_dump(mode="json"), stage.resolution, stage.end,
                          extra={"stage": stage.name, "run": self.cfg.run.name})
            if last:
                save_snapshot(self.storage, join(self.run_url, FINAL_SNAPSHOT), _cpu(G.state_dict()),
                              self.cfg.model.model_dump(mode="json"), stage.resolution, stage.end,
                              extra={"run": self.cfg.run.name, "config": self.cfg.to_json()})
        record: dict[str, Any] = {"event": "stage_end", "stage_index": stage.index, "stage": stage.name,
                                  "resolution": stage.resolution, "nimg": stage.end, "kimg": stage.end / 1000,
                                  "time": time.time()}
        if self.n and stage.resolution >= 8 and (self.cfg.metrics.swd_every_stage or last):  # 7x7 patches: >= 8x8
            record["swd"], record["swd_floor"] = self._swd(G, stage.resolution, alpha, floor=True)
        record["eval_seconds"] = time.perf_counter() - t0
        self._commit(stage.name, record)
        return record

    # ---- pieces ---------------------------------------------------------------------------------------
    def _commit(self, name: str, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.storage.write_json(eval_marker_url(self.run_url, name), record)

    def _write_grid(self, G: torch.nn.Module, resolution: int, alpha: float, url: str) -> None:
        g = self.cfg.metrics.grid_size
        z = latents(g * g, self.cfg.model.latent_size, self.seed + 12345)  # fixed latents: grids comparable
        with torch.no_grad():
            images = to_uint8(G(z.to(self.device), resolution, alpha))
        self.storage.write_bytes(url, grid_png(images, cols=g))

    def _swd(self, G: torch.nn.Module, resolution: int, alpha: float,
             floor: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        try:
            swd_levels(resolution)
        except ImagesTooSmall as e:
            return {"levels": [], "swd_x1e3": {}, "avg": float("nan"), "skipped": str(e)}, None
        import shutil
        import tempfile

        n, seed = self.n, self.seed
        ranges = swd_dist.shard_ranges(n, self.rank, self.world)
        dtype = swd_dist.storage_dtype(n, resolution, self.world)
        self.spill = tempfile.mkdtemp(prefix="pggan-swd-") if swd_dist.needs_spill(n, resolution, self.world) else None
        try:
            return self._swd_and_floor(G, resolution, alpha, floor, ranges, dtype)
        finally:
            if self.spill:
                shutil.rmtree(self.spill, ignore_errors=True)

    def _swd_and_floor(self, G: torch.nn.Module, resolution: int, alpha: float, floor: bool,
                       ranges: list[tuple[int, int]],
                       dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Any] | None]:
        n, seed = self.n, self.seed
        reals = self._reals(resolution, ranges, dtype, stream=swd_dist.REALS, offset=0)
        fakes = swd_dist.describe_share(self._fakes(G, resolution, alpha, ranges), resolution, device=self.device,
                                        seed=swd_dist.set_seed(seed, swd_dist.FAKES), dtype=dtype,
                                        spill_dir=self.spill)
        result = swd_dist.swd_of_shares(reals, fakes, seed=seed)
        fakes.close()
        if not floor:
            reals.close()
            return result, None
        floor_url = join(self.run_url, "swd_floor", f"floor-{resolution}px-{self._key(resolution)}.json")
        have = torch.tensor([1.0 if self.rank == 0 and self.storage.exists(floor_url) else 0.0],
                            dtype=torch.float64, device=self.device)
        if swd_dist._all_reduce(have).item() > 0:  # rank 0 decides for all (collectives follow)
            reals.close()
            return result, self.storage.read_json(floor_url)
        second = self._reals(resolution, ranges, dtype, stream=swd_dist.REALS_2, offset=n)
        floor_result = {**swd_dist.swd_of_shares(reals, second, seed=seed), "what": "real vs real (two disjoint samples)"}
        reals.close()
        second.close()
        if self.rank == 0:
            self.storage.write_json(floor_url, floor_result)
        return result, floor_result

    def _key(self, resolution: int, stream: int = 0) -> str:
        c = self.cfg
        return swd_dist.cache_key(data=self.data_url, synthetic_images=c.data.synthetic_images, resolution=resolution,
                                  images=self.n, seed=self.seed, mirror=c.data.mirror, stream=stream)

    def _reals(self, resolution: int, ranges: list[tuple[int, int]], dtype: torch.dtype, stream: int,
               offset: int) -> swd_dist.Share:
        """This rank's share of a real sample (offset 0: the one fakes are compared with; n: the second one)."""
        n = self.n
        idx = _sample_indices(self.dataset.num_images, 2 * n, self.seed + 1)
        flips = swd_dist.mirror_flags(2 * n, self.seed) if self.cfg.data.mirror else np.zeros(2 * n, bool)

        def images_of(a: int, b: int) -> np.ndarray:
            x = self.dataset.images(resolution, idx[offset + a:offset + b])  # uint8 [b - a, 3, R, R]
            f = flips[offset + a:offset + b]
            if f.any():  # mirrored as training sees them (the official evaluation does the same)
                x = x.copy()
                x[f] = x[f][..., ::-1]
            return x

        cache = join(self.run_url, "swd_reals", f"{resolution}px-{self._key(resolution, stream)}")
        return swd_dist.cached_share(self.storage, cache, ranges, resolution, device=self.device, dtype=dtype,
                                     seed=swd_dist.set_seed(self.seed, stream), images_of=images_of,
                                     batch=_eval_batch(resolution), spill_dir=self.spill)

    def _fakes(self, G: torch.nn.Module, resolution: int, alpha: float, ranges: list[tuple[int, int]]):
        batch = _eval_batch(resolution)
        z_all = latents(self.n, self.cfg.model.latent_size, self.seed + 2)  # the same latents at every stage
        for a, b in ranges:
            for i in range(a, b, batch):
                with torch.no_grad():
                    x = G(z_all[i:min(b, i + batch)].to(self.device), resolution, alpha)
                yield i, torch.from_numpy(to_uint8(x))


def _eval_batch(resolution: int) -> int:
    """Images per evaluation batch: 64 up to 256x256, 4 at 1024x1024 (a float pyramid of 64 images at 1024x1024
    with its temporaries would be about 2 GiB)."""
    return max(4, min(64, 2**22 // (resolution * resolution)))


def _sample_indices(num_images: int, n: int, seed: int) -> np.ndarray:
    from .data import sample_indices

    return sample_indices(num_images, n, seed)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def swd_table(records: list[dict[str, Any]]) -> str:
    """A plain-text table of SWD x1e3 per stage end (and the untrained baseline)."""
    rows = [r for r in records if r.get("swd") and r["swd"].get("swd_x1e3")]
    if not rows:
        return "no SWD measured (metrics.swd_images = 0)"
    levels = sorted({int(k) for r in rows for k in r["swd"]["swd_x1e3"]}, reverse=True)
    head = f"{'stage':<18}{'res':>6}" + "".join(f"{lv:>9}" for lv in levels) + f"{'avg':>9}"
    lines = ["SWD x1e3 (lower is better; G_ema vs reals)", head, "-" * len(head)]

    def row(name: str, res: int, vals: dict[str, float], avg: float) -> str:
        cells = "".join(f"{vals[str(lv)]:9.2f}" if str(lv) in vals else f"{'':>9}" for lv in levels)
        return f"{name:<18}{res:>6}{cells}{avg:9.2f}"

    for r in rows:
        lines.append(row(r.get("stage") or "untrained", r["resolution"], r["swd"]["swd_x1e3"], r["swd"]["avg"]))
    last_floor = next((r for r in reversed(rows) if r.get("swd_floor")), None)
    if last_floor:
        lines.append(row("real vs real", last_floor["resolution"], last_floor["swd_floor"]["swd_x1e3"],
                         last_floor["swd_floor"]["avg"]))
    base = next((r for r in rows if r.get("event") == "baseline"), None)
    last = next((r for r in reversed(rows) if r.get("event") == "stage_end"
                 and base and r["resolution"] == base["resolution"]), None)
    if base and last:
        lines.append(f"final / untrained SWD avg: {last['swd']['avg'] / max(base['swd']['avg'], 1e-12):.2f}")
        if last_floor and last_floor["resolution"] == last["resolution"]:
            lines.append(f"final / real-vs-real SWD avg: "
                         f"{last['swd']['avg'] / max(last_floor['swd_floor']['avg'], 1e-12):.2f}")
    return "\n".join(lines)
