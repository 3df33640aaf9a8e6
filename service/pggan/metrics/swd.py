"""Multi-scale sliced Wasserstein distance (Karras et al. 2018, section 5), as the official code computes it.

For each set (reals, fakes) of uint8 images [N, 3, R, R]:

1. A Laplacian pyramid (5x5 binomial filter, cv2.pyrDown/pyrUp borders) from R down to 16x16; the
   coarsest level is the Gaussian image itself, the others are band-pass images.
2. Per level, 128 random 7x7x3 neighbourhoods per image: descriptors of 147 values.
3. Per level, the set's descriptors are normalised by that set's own per-channel mean and std.
4. 4 repeats x 128 random unit directions: project, sort, average |difference| -- the 1-D Wasserstein-1
   distance of the projections -- averaged over all 512 directions; reported x1e3 per level and averaged.

Differences from the official code, all deliberate and none changing the metric:

- Neighbourhood positions are a hash of (seed, level, image index, neighbourhood index), not a stateful RNG:
  the same for both sets, for any batching and on any device. A set against itself is therefore exactly 0.
- The normalisation is folded into the projection (W / std, minus a constant), so descriptors are stored
  once, raw; per-channel statistics are accumulated in float64 while streaming.
- On CPU the 1-D W1 of two 2^21-point projections is computed without sorting them (see
  :func:`wasserstein1`), ~10x faster than torch.sort there; it agrees with sorting to ~2e-5 (relative,
  float32 rounding). On GPUs it sorts.
- Descriptors are stored as float32 when they fit ``memory_mb``, else as float16 (2^21 x 147 per level per
  set at the paper's 16384 images: 1.15 GiB per level and set in float32). float16 rounds each stored value
  by at most 2^-11 of itself (SWD moves by ~1e-4 relative); ``result["storage"]`` says which was used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .patches import _gather, _hash_scalar, directions, patch_positions  # noqa: F401 - _hash_scalar: for swd_dist
from .pyramid import ImagesTooSmall, laplacian_pyramid, swd_levels
from .w1 import _BucketWork, _use_buckets, wasserstein1

__all__ = ["swd", "swd_from_descriptors", "DescriptorSet", "describe"]


# ---- descriptor sets ---------------------------------------------------------------------------------------

class _Rows:
    """A growable [rows, width] matrix kept as a few large slabs (each up to 2^18 rows, sizes doubling).

    Large slabs keep the matrix products efficient, and are allocated by mmap, so memory freed after a dtype
    switch goes back to the system instead of fragmenting the heap.
    """

    MAX_SLAB = 1 << 18

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        self.width, self.dtype, self.device = width, dtype, device
        self.slabs: list[torch.Tensor] = []
        self.filled = 0  # rows used in the last slab
        self.rows = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slabs)

    def append(self, x: torch.Tensor) -> None:
        """Append rows x [n, width] (converted to this matrix's dtype)."""
        i = 0
        while i < x.shape[0]:
            if not self.slabs or self.filled == self.slabs[-1].shape[0]:
                size = min(self.MAX_SLAB, max(x.shape[0] - i, 2 * self.slabs[-1].shape[0] if self.slabs else 0))
                self.slabs.append(torch.empty(size, self.width, dtype=self.dtype, device=self.device))
                self.filled = 0
            take = min(x.shape[0] - i, self.slabs[-1].shape[0] - self.filled)
            self.slabs[-1][self.filled:self.filled + take].copy_(x[i:i + take])
            self.filled += take
            self.rows += take
            i += take

    def blocks(self, max_rows: int | None = None) -> Iterator[torch.Tensor]:
        """The filled rows in order, as views of at most max_rows rows."""
        for j, slab in enumerate(self.slabs):
            used = self.filled if j == len(self.slabs) - 1 else slab.shape[0]
            step = max_rows or used
            for r in range(0, used, step):
                yield slab[r:min(used, r + step)]

    def to_dtype(self, dtype: torch.dtype) -> None:
        for j, slab in enumerate(self.slabs):
            self.slabs[j] = slab.to(dtype)  # one slab at a time: the peak grows by one slab only
        self.dtype = dtype



class DescriptorSet:
    """The neighbourhood descriptors of one image set at every pyramid level, built batch by batch.

    Descriptors are kept raw (minus a per-channel offset taken from the first batch, which keeps float16
    storage and the folded normalisation precise at the Gaussian level, whose values are 0..255). The
    per-channel mean and std the paper normalises with are accumulated alongside (float64 across batches).

    dtype: float32, or float16 to halve the memory. max_bytes: when float32 storage grows past this, the set
    switches to float16 (converting what it holds), so that streams of unknown length stay bounded.
    """

    def __init__(self, resolution: int, *, num_neighborhoods: int = 128, patch: int = 7, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 64,
                 min_resolution: int = 16, max_bytes: float | None = None, position_seed: int | None = None):
        self.resolution = resolution
        self.levels = swd_levels(resolution, min_resolution, patch)
        self.num_neighborhoods, self.patch, self.seed = num_neighborhoods, patch, seed
        # Neighbourhood positions: the directions' seed by default (reals and fakes share positions), or a seed
        # of the set's own (positions drawn for each set independently, as the official code draws them).
        self.position_seed = seed if position_seed is None else position_seed
        self.device, self.dtype, self.batch = torch.device(device), dtype, batch
        self.max_bytes = max_bytes
        self.num_images = 0
        nl = len(self.levels)
        self.rows = [_Rows(3 * patch * patch, dtype, self.device) for _ in range(nl)]  # per level: [M, 3 * p * p]
        self.offset: list[torch.Tensor | None] = [None] * nl  # per level: float32 [3]
        self._sum = [torch.zeros(3, dtype=torch.float64, device=self.device) for _ in range(nl)]
        self._sumsq = [torch.zeros(3, dtype=torch.float64, device=self.device) for _ in range(nl)]

    @property
    def num_descriptors(self) -> int:
        return self.num_images * self.num_neighborhoods

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    def to_dtype(self, dtype: torch.dtype) -> None:
        """Convert the stored descriptors (and recompute their statistics, which describe what is stored)."""
        if dtype == self.dtype:
            return
        pp = self.patch * self.patch
        for li, rows in enumerate(self.rows):
            rows.to_dtype(dtype)
            self._sum[li].zero_()
            self._sumsq[li].zero_()
            for block in rows.blocks(1 << 16):
                self._accumulate(li, block.view(-1, 3, pp))
        self.dtype = dtype

    def _accumulate(self, level: int, stored: torch.Tensor) -> None:
        # Statistics of exactly what is stored [rows, 3, p*p]: per batch in float32 (torch sums pairwise, and the
        # values are centred by the offset), accumulated over batches in float64.
        s = stored.float()
        self._sum[level] += s.sum(dim=(0, 2)).double()
        self._sumsq[level] += (s * s).sum(dim=(0, 2)).double()

    def add(self, images: Any) -> None:
        """Add uint8 images [n, 3, R, R] (numpy or torch, any device)."""
        x = torch.as_tensor(images)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"expected images [N, 3, {self.resolution}, {self.resolution}], got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {x.dtype}")
        for i in range(0, x.shape[0], self.batch):
            self._add_batch(x[i:i + self.batch])

    def _add_batch(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        pyr = laplacian_pyramid(x.to(self.device, non_blocking=True), len(self.levels))
        pp = self.patch * self.patch
        for li, lvl in enumerate(pyr):
            ys, xs = patch_positions(self.position_seed, li, self.num_images, n, lvl.shape[-1], self.num_neighborhoods,
                                     self.patch)
            d = _gather(lvl, ys, xs, self.patch)  # [n * nh, 3 * p * p] float32
            if self.offset[li] is None:
                self.offset[li] = d.view(-1, 3, pp).mean(dim=(0, 2))
            d = d.view(-1, 3, pp).sub_(self.offset[li][None, :, None]).view(-1, 3 * pp)
            stored = d.to(self.dtype)
            self._accumulate(li, stored.view(-1, 3, pp))
            self.rows[li].append(stored)
        self.num_images += n
        if self.max_bytes is not None and self.dtype == torch.float32 and self.nbytes > self.max_bytes:
            self.to_dtype(torch.float16)

    def stats(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) per channel, float64 [3], of the stored descriptors of one level (population std)."""
        count = self.num_descriptors * self.patch * self.patch
        mean = self._sum[level] / count
        var = (self._sumsq[level] / count - mean * mean).clamp_min(0)
        return mean, var.sqrt()

    def project(self, level: int, dirs: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projections of the normalised descriptors of a level onto dirs [147, d], as (out - shift).

        out: float32 [d, M], one direction per (contiguous) row. Returns (out, shift [d] float64) with
        (normalised descriptors [M, 147] @ dirs).T = out - shift[:, None]. Normalising
        is folded in, ((x - mean) / std) @ w = x @ (w / std) - (mean / std) @ w, so the stored descriptors are
        read once per direction block and never copied; the shift is applied after sorting (it commutes).
        """
        mean, std = self.stats(level)
        pp = self.patch * self.patch
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel projects to a constant
        scale = (1.0 / std).repeat_interleave(pp)  # [147] float64
        w = (dirs.double().to(self.device) * scale[:, None])  # [147, d]
        shift = ((mean * (1.0 / std)).repeat_interleave(pp)[None, :] @ dirs.double().to(self.device))[0]  # [d]
        w32 = w.float()
        r = 0
        # float16 rows are converted a block at a time (CPUs have no fast float16 matrix product); the block stays
        # small enough to be reused from the heap rather than mapped afresh each time.
        half = self.dtype != torch.float32
        for block in self.rows[level].blocks(1 << 14 if half else None):
            n = block.shape[0]
            torch.mm(block.float() if half else block, w32, out=out[:, r:r + n].t())
            r += n
        return out, shift


def _as_batches(images: Any, max_images: int | None) -> Iterator[Any]:
    """Batches of uint8 images from an array/tensor [N, 3, H, W] or an iterable of such batches."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    left = math.inf if max_images is None else max_images
    for b in images:
        if left <= 0:
            break
        if len(b) > left:
            b = b[:int(left)]
        left -= len(b)
        yield b


def _first_resolution(batches: Iterator[Any]) -> tuple[int, Iterator[Any]]:
    first = next(batches, None)
    if first is None:
        raise ValueError("no images")
    shape = tuple(first.shape)

    def chain() -> Iterator[Any]:
        yield first
        yield from batches

    return shape[-1], chain()


def describe(images: Any, *, num_neighborhoods: int = 128, patch: int = 7, seed: int = 0,
             device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, batch: int = 64,
             max_images: int | None = None, resolution: int | None = None,
             max_bytes: float | None = None, position_seed: int | None = None) -> DescriptorSet:
    """Descriptors of an image set (array/tensor [N, 3, R, R] uint8, or an iterable of such batches)."""
    res, batches = _first_resolution(_as_batches(images, max_images))
    ds = DescriptorSet(resolution or res, num_neighborhoods=num_neighborhoods, patch=patch, seed=seed,
                       device=_device(device), dtype=dtype, batch=batch, max_bytes=max_bytes,
                       position_seed=position_seed)
    for b in batches:
        ds.add(b)
    return ds


def _device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- SWD -----------------------------------------------------------------------------------------------------

def _budget_mb(device: torch.device) -> float:
    """Default memory for the descriptors of both sets: 4 GiB on CPU, 40% of the GPU's memory on CUDA."""
    if device.type == "cuda":
        return 0.4 * torch.cuda.get_device_properties(device).total_memory / 2**20
    return 4096.0


def _known_size(images: Any, max_images: int | None) -> tuple[int, int] | None:
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        n = int(images.shape[0]) if max_images is None else min(int(images.shape[0]), max_images)
        return n, int(images.shape[-1])
    return None


def swd(reals: Any, fakes: Any, *, num_neighborhoods: int = 128, patch: int = 7, dir_repeats: int = 4,
        dirs_per_repeat: int = 128, seed: int = 0, device: torch.device | str | None = None, batch: int = 64,
        max_images: int | None = None, memory_mb: float | None = None, storage: str = "auto",
        w1_method: str = "auto", independent_positions: bool = False) -> dict[str, Any]:
    """Multi-scale sliced Wasserstein distance between two image sets, x1e3 per level and averaged.

    reals, fakes: uint8 [N, 3, R, R] numpy arrays or torch tensors, or iterables of such batches (streamed;
    only descriptors are kept). Both sets must hold the same number of images (the paper: 16384).
    device: where to compute (default: CUDA when available). batch: images per pyramid step.
    max_images: use at most this many images of each set.
    storage: "float32", "float16", or "auto": float32 while the descriptors of both sets fit memory_mb
    (default 4 GiB on CPU, 40% of a GPU's memory), else float16 -- decided up front for arrays, and by
    switching (both sets alike) when a stream outgrows it. 16384 images at 128x128 need 9.2 GiB in float32.
    w1_method: "auto", "sort" or "bucket" (see :func:`wasserstein1`; all give the same value).
    independent_positions: draw each set's neighbourhood positions independently, as the official code does
    (`evaluate` and the stage-end evaluation do); False shares them (a set against itself is then exactly 0).

    Returns {"levels": [R, R/2, ..., 16], "swd_x1e3": {"R": float, ...}, "avg": float, "images": N,
    "descriptors_per_level": M, "storage": "float32"|"float16", "seed": seed, "device": "cpu"|"cuda"}.
    Images smaller than a neighbourhood (4x4) give levels [], avg NaN and a "skipped" reason.
    """
    dev = _device(device)
    budget = (memory_mb if memory_mb is not None else _budget_mb(dev)) * 2**20
    dtype = {"auto": torch.float32, "float32": torch.float32, "float16": torch.float16}[storage]
    max_bytes = None
    if storage == "auto":
        known = _known_size(reals, max_images)
        if known is not None:
            n, res = known
            levels = len(swd_levels(res, patch=patch)) if res > patch else 1  # (too small: reported below)
            need = 2 * n * num_neighborhoods * 3 * patch * patch * levels * 4
            dtype = torch.float32 if need <= budget else torch.float16
        else:
            max_bytes = budget / 2  # per set
    kw = dict(num_neighborhoods=num_neighborhoods, patch=patch, seed=seed, device=dev, dtype=dtype, batch=batch,
              max_images=max_images, max_bytes=max_bytes)
    from .patches import set_position_seed

    pos = (set_position_seed(seed, 1), set_position_seed(seed, 2)) if independent_positions else (None, None)
    try:
        da = describe(reals, **kw, position_seed=pos[0])
    except ImagesTooSmall as e:  # e.g. the 4x4 stage: report "nothing measured" rather than fail a run
        return {"levels": [], "swd_x1e3": {}, "avg": float("nan"), "images": 0, "descriptors_per_level": 0,
                "storage": None, "seed": seed, "device": dev.type, "skipped": str(e)}
    db = describe(fakes, **kw, position_seed=pos[1])
    if da.dtype != db.dtype:  # one stream outgrew the budget: store both alike, or they would be rounded unlike
        da.to_dtype(torch.float16)
        db.to_dtype(torch.float16)
    return swd_from_descriptors(da, db, dir_repeats=dir_repeats, dirs_per_repeat=dirs_per_repeat,
                                w1_method=w1_method)


def swd_from_descriptors(da: DescriptorSet, db: DescriptorSet, *, dir_repeats: int = 4, dirs_per_repeat: int = 128,
                         w1_method: str = "auto", block: int = 32) -> dict[str, Any]:
    """SWD from two :class:`DescriptorSet` s (same resolution, seed, neighbourhoods and image count).

    Reals' descriptors can be built once and compared with several fake sets (and a second real sample).
    """
    if da.levels != db.levels or da.patch != db.patch or da.num_neighborhoods != db.num_neighborhoods:
        raise ValueError(f"descriptor sets differ: levels {da.levels} vs {db.levels}")
    if da.num_images != db.num_images:
        raise ValueError(f"SWD compares equal-size sets; got {da.num_images} and {db.num_images} images")
    if da.seed != db.seed:
        raise ValueError("descriptor sets were built with different seeds (neighbourhood positions differ)")
    m = da.num_descriptors
    dim = 3 * da.patch * da.patch
    dev = da.device
    block = min(block, dirs_per_repeat)
    pa = torch.empty(block, m, dtype=torch.float32, device=dev)  # [directions, descriptors]
    pb = torch.empty(block, m, dtype=torch.float32, device=dev)
    buckets = w1_method == "bucket" or (w1_method == "auto" and _use_buckets(dev, m))
    work = _BucketWork(m, dev) if buckets else None
    per_level: dict[str, float] = {}
    for li, res in enumerate(da.levels):
        dists = []
        for rep in range(dir_repeats):
            dirs = directions(da.seed, li, rep, dim, dirs_per_repeat)  # [147, dirs_per_repeat]
            for c0 in range(0, dirs_per_repeat, block):
                w = dirs[:, c0:c0 + block]
                if w.shape[1] != pa.shape[0]:  # a last, narrower block
                    pa, pb = pa.new_empty(w.shape[1], m), pb.new_empty(w.shape[1], m)
                a, sa = da.project(li, w, pa)
                b, sb = db.project(li, w, pb)
                dists.append(wasserstein1(a, b, sa, sb, method=w1_method, work=work))
        per_level[str(res)] = float(torch.cat(dists).mean()) * 1e3
    avg = float(np.mean(list(per_level.values())))
    return {"levels": list(da.levels), "swd_x1e3": per_level, "avg": avg, "images": da.num_images,
            "descriptors_per_level": m, "storage": str(da.dtype).replace("torch.", ""), "seed": da.seed,
            "device": dev.type}
