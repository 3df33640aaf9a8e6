"""SWD computed where the images are: every data-parallel rank describes its share of each image set.

The metric is the one in :mod:`pggan.metrics.swd` (Laplacian pyramid, 7x7x3 neighbourhoods, per-channel
normalisation over the whole set, 4 x 128 random directions, 1-D W1 per direction). What changes is where it
runs and how much it holds:

- Each rank builds the descriptors of its share of a set only (:func:`describe_share`); the images themselves
  are never kept, only their descriptors.
- The normalisation statistics are summed across ranks (one all-reduce per level).
- Directions are taken a block at a time: each rank projects its descriptors onto the block, the projections are
  all-gathered (every rank then holds [block, M] for both sets: 2 x 32 x 2^21 float32 = 512 MiB at the paper's
  16,384 images), and each rank computes W1 for its own rows of the block. Only one pyramid level's
  descriptors and one block of projections are live at a time besides the shares themselves.
- Neighbourhood positions are drawn for each set independently (a per-set stream of the hash), as the official
  code draws them from a stateful RNG for each set: a set compared with a blurred copy of itself reads what
  it reads there, not less.

Without an initialised torch.distributed process group everything runs in one process (world size 1).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .patches import set_position_seed
from .swd import _gather, directions, laplacian_pyramid, patch_positions, swd_levels, wasserstein1

# Independent position streams per set; reals keep theirs across stages, so their descriptors can be cached.
REALS, FAKES, REALS_2 = 1, 2, 3
SHARD_IMAGES = 512  # images per cached shard of real descriptors (any rank count reads the same shards)


def set_seed(seed: int, stream: int) -> int:
    """The seed of one image set's neighbourhood positions."""
    return set_position_seed(seed, stream)


@dataclass
class Share:
    """One rank's descriptors of one image set, per pyramid level (rows [m, 147]) with per-channel sums.

    With ``spill_dir`` the rows go to one file per level on the node's local disk as they are made, and a level
    is mapped back only while it is compared: the process then holds one level at a time, not the whole set
    (16,384 images at 1024x1024 are 4.3 GiB of float16 descriptors per set over 7 levels)."""

    levels: list[int]
    rows: list[list[torch.Tensor]] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)    # float64 [3] per level
    sumsq: list[torch.Tensor] = field(default_factory=list)   # float64 [3] per level
    num_images: int = 0
    spill_dir: str | None = None
    counts: list[int] = field(default_factory=list)          # rows per level
    dtype: torch.dtype = torch.float32

    @classmethod
    def empty(cls, levels: list[int], device: torch.device, spill_dir: str | None = None,
              dtype: torch.dtype = torch.float32) -> "Share":
        n = len(levels)
        if spill_dir is not None:
            import os
            import uuid

            spill_dir = os.path.join(spill_dir, uuid.uuid4().hex[:12])
            os.makedirs(spill_dir)
        return cls(levels, [[] for _ in range(n)], [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(n)],
                   [torch.zeros(3, dtype=torch.float64, device=device) for _ in range(n)], spill_dir=spill_dir,
                   counts=[0] * n, dtype=dtype)

    def _file(self, li: int) -> str:
        return f"{self.spill_dir}/level-{li}.bin"

    def append(self, li: int, d: torch.Tensor) -> None:
        """Rows [m, 147] of one level (already in this share's dtype)."""
        self.counts[li] += d.shape[0]
        if self.spill_dir is None:
            self.rows[li].append(d)
            return
        with open(self._file(li), "ab") as f:
            f.write(d.detach().cpu().contiguous().numpy().tobytes())

    def merge(self, other: "Share") -> None:
        for li in range(len(self.levels)):
            if other.counts[li]:
                self.append(li, other.level(li).to(self.dtype))
            self.sums[li] += other.sums[li].to(self.sums[li].device)
            self.sumsq[li] += other.sumsq[li].to(self.sumsq[li].device)
        self.num_images += other.num_images

    def level(self, li: int) -> torch.Tensor:
        dev = self.sums[li].device
        if self.spill_dir is not None:
            if not self.counts[li]:
                return torch.zeros(0, 147, dtype=self.dtype, device=dev)
            np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
            mapped = np.memmap(self._file(li), dtype=np_dtype, mode="c", shape=(self.counts[li], 147))
            return torch.from_numpy(mapped).to(dev)
        rows = self.rows[li]
        if not rows:
            return torch.zeros(0, 147, dtype=self.dtype, device=dev)
        if len(rows) > 1:
            self.rows[li] = [torch.cat(rows)]  # once: later calls reuse it
        return self.rows[li][0]

    def close(self) -> None:
        """Free the rows (and the spill files)."""
        if self.spill_dir is not None:
            import shutil

            shutil.rmtree(self.spill_dir, ignore_errors=True)
        self.rows = [[] for _ in self.levels]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"levels": self.levels, "rows": [self.level(i).cpu() for i in range(len(self.levels))],
                    "sums": [s.cpu() for s in self.sums], "sumsq": [s.cpu() for s in self.sumsq],
                    "num_images": self.num_images}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device) -> "Share":
        d = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        rows = [r.to(device) for r in d["rows"]]
        return cls(list(d["levels"]), [[r] for r in rows], [s.to(device) for s in d["sums"]],
                   [s.to(device) for s in d["sumsq"]], int(d["num_images"]), counts=[r.shape[0] for r in rows],
                   dtype=rows[0].dtype if rows else torch.float32)


def describe_share(batches: Iterable[tuple[int, Any]], resolution: int, *, seed: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, num_neighborhoods: int = 128, patch: int = 7,
                   spill_dir: str | None = None) -> Share:
    """Descriptors of (first global image index, uint8 images [n, 3, R, R]) batches: positions depend on the
    global index, so any split of a set across ranks and batches gives the same descriptors."""
    levels = swd_levels(resolution, patch=patch)
    share = Share.empty(levels, device, spill_dir, dtype)
    pp = patch * patch
    for first, images in batches:
        x = torch.as_tensor(images).to(device)
        n = x.shape[0]
        pyr = laplacian_pyramid(x, len(levels))
        for li, lvl in enumerate(pyr):
            ys, xs = patch_positions(seed, li, first, n, lvl.shape[-1], num_neighborhoods, patch)
            d = _gather(lvl, ys, xs, patch).to(dtype)  # [n * nh, 3 * p * p]
            s = d.view(-1, 3, pp).float()
            share.sums[li] += s.sum(dim=(0, 2)).double()
            share.sumsq[li] += (s * s).sum(dim=(0, 2)).double()
            share.append(li, d)
        share.num_images += n
    return share


# ---- collectives (no-ops in one process) --------------------------------------------------------------------

def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """x [d, m_local] from every rank -> [d, sum of m_local] (ranks may hold different m)."""
    dist = _dist()
    if not dist or dist.get_world_size() == 1:
        return x
    w = dist.get_world_size()
    sizes = torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(w)]
    dist.all_gather(all_sizes, sizes)
    m = int(max(s.item() for s in all_sizes))
    padded = torch.zeros(x.shape[0], m, dtype=x.dtype, device=x.device)
    padded[:, :x.shape[1]] = x
    out = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(out, padded)
    return torch.cat([o[:, :int(s.item())] for o, s in zip(out, all_sizes)], dim=1)


# ---- the distance -------------------------------------------------------------------------------------------

def _norm(sums: torch.Tensor, sumsq: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = sums / count
    std = (sumsq / count - mean * mean).clamp_min(0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _project(rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dirs: torch.Tensor,
             pp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) / std @ dirs as (rows @ (dirs / std)).T - shift: [d, m] and shift [d] (float64)."""
    scale = (1.0 / std).repeat_interleave(pp)  # [147]
    d64 = dirs.double().to(rows.device)
    w = (d64 * scale[:, None]).float()
    shift = ((mean / std).repeat_interleave(pp)[None, :] @ d64)[0]
    out = torch.empty(w.shape[1], rows.shape[0], dtype=torch.float32, device=rows.device)  # [d, m]
    for r in range(0, rows.shape[0], 1 << 16):  # float16 rows are widened a block at a time
        block = rows[r:r + (1 << 16)]
        torch.mm(block.float() if block.dtype != torch.float32 else block, w, out=out[:, r:r + block.shape[0]].t())
    return out, shift


def swd_of_shares(a: Share, b: Share, *, seed: int, dir_repeats: int = 4, dirs_per_repeat: int = 128,
                  block: int = 32) -> dict[str, Any]:
    """SWD x1e3 per level and averaged between two sets spread over the ranks (call on every rank)."""
    if a.levels != b.levels:
        raise ValueError(f"descriptor sets differ: levels {a.levels} vs {b.levels}")
    rank, size = world()
    dev = a.sums[0].device
    counts = _all_reduce(torch.tensor([a.num_images, b.num_images], dtype=torch.float64, device=dev))
    if counts[0] != counts[1]:
        raise ValueError(f"SWD compares equal-size sets; got {int(counts[0])} and {int(counts[1])} images")
    n_images = int(counts[0])
    pp = 49
    per_level: dict[str, float] = {}
    for li, res in enumerate(a.levels):
        stats = _all_reduce(torch.stack([a.sums[li], a.sumsq[li], b.sums[li], b.sumsq[li]]))
        m = int(_all_reduce(torch.tensor([a.counts[li]], dtype=torch.float64, device=dev)).item())
        ma, sa = _norm(stats[0], stats[1], m * pp)
        mb, sb = _norm(stats[2], stats[3], m * pp)
        ra, rb = a.level(li), b.level(li)
        total = torch.zeros(2, dtype=torch.float64, device=dev)  # (sum of W1, number of directions)
        for rep in range(dir_repeats):
            dirs = directions(seed, li, rep, 3 * pp, dirs_per_repeat)  # [147, d]
            for c0 in range(0, dirs_per_repeat, block):
                w = dirs[:, c0:c0 + block]
                pa, ha = _project(ra, ma, sa, w, pp)
                pb, hb = _project(rb, mb, sb, w, pp)
                pa, pb = _all_gather_rows(pa), _all_gather_rows(pb)  # [d, M] each, on every rank
                mine = list(range(rank, w.shape[1], size))
                if mine:
                    dist = wasserstein1(pa[mine], pb[mine], ha[mine], hb[mine])
                    total += torch.tensor([float(dist.sum()), len(mine)], dtype=torch.float64, device=dev)
                del pa, pb
        del ra, rb  # one level at a time (mapped back from disk for a spilled share)
        total = _all_reduce(total)
        per_level[str(res)] = float(total[0] / total[1]) * 1e3
    return {"levels": list(a.levels), "swd_x1e3": per_level, "avg": float(np.mean(list(per_level.values()))),
            "images": n_images, "seed": seed, "ranks": size}


# ---- which images a rank describes; real descriptors cached in the run directory ----------------------------

def shard_ranges(n: int, rank: int, world_size: int, shard: int = SHARD_IMAGES) -> list[tuple[int, int]]:
    """Image ranges [a, b) of this rank: fixed shards of the set dealt round-robin (the cache is rank-agnostic)."""
    return [(s, min(n, s + shard)) for i, s in enumerate(range(0, n, shard)) if i % world_size == rank]


def cache_key(**key: Any) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cached_share(storage: Any, cache_url: str, ranges: list[tuple[int, int]], resolution: int, *, seed: int,
                 device: torch.device, dtype: torch.dtype,
                 images_of: Callable[[int, int], np.ndarray], batch: int = 64, spill_dir: str | None = None) -> Share:
    """This rank's share of a real set: each shard read from cache_url, or described and written there."""
    from ..storage import join

    share = Share.empty(swd_levels(resolution), device, spill_dir, dtype)
    for a, b in ranges:
        url = join(cache_url, f"shard-{a:08d}-{b:08d}.pt")
        part = None
        if storage.exists(url):
            try:
                part = Share.from_bytes(storage.read_bytes(url), device)
            except Exception:  # noqa: BLE001 - a truncated cache file is recomputed
                part = None
        if part is None or part.num_images != b - a:
            part = describe_share(((i, images_of(i, min(b, i + batch))) for i in range(a, b, batch)), resolution,
                                  seed=seed, device=device, dtype=dtype)
            storage.write_bytes(url, part.to_bytes())
        share.merge(part)
        part.close()
    return share


def share_bytes(n_images: int, resolution: int, world_size: int, itemsize: int = 4) -> float:
    """Bytes of one rank's descriptors of one set, all levels."""
    return math.ceil(n_images / world_size) * 128 * 147 * itemsize * len(swd_levels(resolution))


def storage_dtype(n_images: int, resolution: int, world_size: int, budget_bytes: float = 1.0 * 2**30) -> torch.dtype:
    """float32 while one rank's share of one set fits the budget, else float16 (2^-11 relative rounding)."""
    return torch.float32 if share_bytes(n_images, resolution, world_size) <= budget_bytes else torch.float16


def needs_spill(n_images: int, resolution: int, world_size: int, budget_bytes: float = 0.5 * 2**30) -> bool:
    """Keep descriptors on local disk (one level mapped at a time) when a set's share in float16 exceeds this."""
    return share_bytes(n_images, resolution, world_size, itemsize=2) > budget_bytes


def mirror_flags(n: int, seed: int) -> np.ndarray:
    """Which of a set's images are mirrored when training mirrors (as the official evaluation does): a fixed
    coin per image index, so every rank and every stage agree."""
    rng = np.random.default_rng([seed, 0x313])
    return rng.random(n) < 0.5
