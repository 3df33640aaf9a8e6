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
import torch.nn.functional as F

__all__ = ["swd", "swd_levels", "laplacian_pyramid", "reconstruct", "pyr_down", "pyr_up", "patch_positions",
           "directions", "wasserstein1", "DescriptorSet", "describe", "swd_from_descriptors", "swd_noise_floor",
           "cached_swd_noise_floor", "ImagesTooSmall"]

_M32 = 0xFFFFFFFF


# ---- Laplacian pyramid (cv2.pyrDown / cv2.pyrUp) -----------------------------------------------------------

def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """cv2.pyrDown: 5x5 binomial blur ([1,4,6,4,1]/16 per axis, reflect-101 borders), then every other pixel.

    x: float [N, C, H, W] with even H, W -> [N, C, H/2, W/2].
    """
    n, c, h, w = x.shape
    assert h % 2 == 0 and w % 2 == 0, f"pyr_down needs even sizes, got {h}x{w}"
    p = F.pad(x, (2, 2, 2, 2), mode="reflect")  # torch 'reflect' is cv2's BORDER_REFLECT_101
    # Only the even output rows/columns are kept, so compute only those: 5 strided taps per axis.
    r = (p[:, :, 0:h:2] + p[:, :, 4:h + 4:2]) + 4 * (p[:, :, 1:h + 1:2] + p[:, :, 3:h + 3:2]) + 6 * p[:, :, 2:h + 2:2]
    o = (r[..., 0:w:2] + r[..., 4:w + 4:2]) + 4 * (r[..., 1:w + 1:2] + r[..., 3:w + 3:2]) + 6 * r[..., 2:w + 2:2]
    return o.mul_(1.0 / 256.0)  # [N, C, H/2, W/2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """cv2.pyrUp: insert zeros between pixels, blur with 4 x the binomial kernel, reflect-101 borders.

    x: float [N, C, H, W] -> [N, C, 2H, 2W]. Per axis that is: even outputs (s[k-1] + 6 s[k] + s[k+1]) / 8 and
    odd outputs (s[k] + s[k+1]) / 2, where reflect-101 in the upsampled grid means s[-1] = s[1] on the
    left and s[n] = s[n-1] on the right (as cv2 does).
    """

    def up_axis(t: torch.Tensor, dim: int) -> torch.Tensor:
        size = t.shape[dim]
        p = torch.cat([t.narrow(dim, 1, 1) if size > 1 else t.narrow(dim, 0, 1), t, t.narrow(dim, size - 1, 1)], dim)
        left, mid, right = p.narrow(dim, 0, size), p.narrow(dim, 1, size), p.narrow(dim, 2, size)
        even = (left + right + 6 * mid) * 0.125
        odd = (mid + right) * 0.5
        out = torch.stack([even, odd], dim=dim + 1)
        return out.flatten(dim, dim + 1)

    return up_axis(up_axis(x, 2), 3)  # [N, C, 2H, 2W]


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid, finest first: levels-1 band-pass images and the coarsest Gaussian image.

    x: [N, C, H, W] (uint8 images are taken as values 0..255) -> list of float32 (float64 for float64 input)
    [N, C, H / 2^i, W / 2^i]. :func:`reconstruct` inverts it.
    """
    g = x.float() if x.dtype != torch.float64 else x
    pyr = []
    for _ in range(levels - 1):
        down = pyr_down(g)
        pyr.append(g - pyr_up(down))
        g = down
    pyr.append(g)
    return pyr


def reconstruct(pyr: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`laplacian_pyramid`: coarsest Gaussian, then upsample and add each band, coarse to fine."""
    x = pyr[-1]
    for band in reversed(pyr[:-1]):
        x = pyr_up(x) + band
    return x


class ImagesTooSmall(ValueError):
    """The images are smaller than one neighbourhood (PG-GAN's 4x4 stage): there is no SWD to measure."""


def swd_levels(resolution: int, min_resolution: int = 16, patch: int = 7) -> list[int]:
    """Pyramid resolutions for SWD: resolution, resolution/2, ... down to min_resolution (the paper's 16).

    Below 16x16 (early PG-GAN stages) the single level is the image itself, as long as a patch fits.
    """
    if resolution < patch + 1:
        raise ImagesTooSmall(f"SWD needs images of at least {patch + 1}x{patch + 1} for {patch}x{patch} "
                             f"neighbourhoods, got {resolution}x{resolution}")
    levels = [resolution]
    while levels[-1] // 2 >= min_resolution and levels[-1] % 2 == 0:
        levels.append(levels[-1] // 2)
    return levels


# ---- neighbourhoods and directions ----------------------------------------------------------------------

def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply), on int64 tensors holding values in [0, 2^32).

    Multipliers are below 2^31 so no product overflows int64: identical on every device.
    """
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    """:func:`_hash32` on a Python int."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def _hash_scalar(*parts: int) -> int:
    h = 0x243F6A88
    for p in parts:
        h = _hash32_int((h ^ (p & _M32)) + 0x9E3779B9)
    return h


def patch_positions(seed: int, level: int, first_image: int, num_images: int, size: int,
                    num_neighborhoods: int = 128, patch: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners (y, x) of the neighbourhoods of images first_image.. at one pyramid level.

    Returns two int64 tensors [num_images, num_neighborhoods] with values in [0, size - patch]: a pure
    function of (seed, level, image index, neighbourhood index), so any batching gives the same result and
    reals and fakes share positions.
    """
    span = size - patch + 1
    base = _hash_scalar(seed, level)
    img = torch.arange(first_image, first_image + num_images, dtype=torch.int64)
    h = _hash32(img ^ base)[:, None]  # [n, 1]
    j = torch.arange(num_neighborhoods, dtype=torch.int64)[None, :]
    y = _hash32(h ^ (2 * j + 0x51ED270B)) % span
    x = _hash32(h ^ (2 * j + 0x2545F491 + 1)) % span
    return y, x  # [n, nh] each


def directions(seed: int, level: int, repeat: int, dim: int = 147, count: int = 128) -> torch.Tensor:
    """Random unit directions [dim, count] (float32, CPU) for one level and repeat; columns have norm 1."""
    g = torch.Generator().manual_seed(_hash_scalar(seed, level, repeat, 0xD1))
    d = torch.randn(dim, count, generator=g, dtype=torch.float64)
    return (d / d.norm(dim=0, keepdim=True)).float()


def _gather(level: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, patch: int) -> torch.Tensor:
    """Neighbourhoods of one pyramid level: level [n, C, S, S], corners [n, nh] -> [n * nh, C * patch * patch].

    Values are in (channel, row, column) order, as the official code's descriptors."""
    n, c, s, _ = level.shape
    sn, sc, sh, sw = level.stride()
    # A zero-copy view of every patch x patch window, indexed by (image, top, left): [n, S', S', C, p, p].
    windows = level.as_strided((n, s - patch + 1, s - patch + 1, c, patch, patch), (sn, sh, sw, sc, sh, sw))
    img = torch.arange(n, device=level.device)[:, None]
    return windows[img, ys.to(level.device), xs.to(level.device)].reshape(n * ys.shape[1], c * patch * patch)


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
                 min_resolution: int = 16, max_bytes: float | None = None):
        self.resolution = resolution
        self.levels = swd_levels(resolution, min_resolution, patch)
        self.num_neighborhoods, self.patch, self.seed = num_neighborhoods, patch, seed
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
            ys, xs = patch_positions(self.seed, li, self.num_images, n, lvl.shape[-1], self.num_neighborhoods,
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
             max_bytes: float | None = None) -> DescriptorSet:
    """Descriptors of an image set (array/tensor [N, 3, R, R] uint8, or an iterable of such batches)."""
    res, batches = _first_resolution(_as_batches(images, max_images))
    ds = DescriptorSet(resolution or res, num_neighborhoods=num_neighborhoods, patch=patch, seed=seed,
                       device=_device(device), dtype=dtype, batch=batch, max_bytes=max_bytes)
    for b in batches:
        ds.add(b)
    return ds


def _device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- 1-D Wasserstein-1 -----------------------------------------------------------------------------------

def wasserstein1(a: torch.Tensor, b: torch.Tensor, shift_a: torch.Tensor | None = None,
                 shift_b: torch.Tensor | None = None, method: str = "auto",
                 work: "_BucketWork | None" = None) -> torch.Tensor:
    """Per row, the W1 distance of two equal-size 1-D samples: mean |sort(a - shift_a) - sort(b - shift_b)|.

    a, b: float [d, M], one sample per row (contiguous rows); shifts: [d] or None. Returns float64 [d] (CPU).

    method "sort" is the definition. method "bucket" (the CPU default for M >= 2^15) gets the same value
    without sorting, from W1 = integral |F_a(t) - F_b(t)| dt: values go into equal-width buckets; in a bucket
    where F_a - F_b cannot change sign the integral is |(F_a - F_b at its left edge) x width + (signed sum of
    its points' distances to its right edge) / M|, from per-bucket counts and sums (two scatter-adds). The
    buckets where the sign may change (where the CDFs cross, ~10% of the points) are split the same way into
    sub-buckets, and what is still ambiguous after that is sorted. Exact up to float rounding: positions in a
    bucket are float32, so it agrees with the sort to ~1e-6..2e-5 relative (tests/test_metrics.py checks it).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"wasserstein1 needs two [d, M] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    d, m = a.shape
    sa = torch.zeros(d, dtype=torch.float64) if shift_a is None else shift_a.double().cpu()
    sb = torch.zeros(d, dtype=torch.float64) if shift_b is None else shift_b.double().cpu()
    if method == "auto":
        method = "bucket" if _use_buckets(a.device, m) else "sort"
    if method == "sort":
        return _w1_sort(a, b, sa, sb)
    if method != "bucket":
        raise ValueError(f"unknown method {method!r}")
    if work is None or work.m != m:
        work = _BucketWork(m, a.device)
    out = torch.empty(d, dtype=torch.float64)
    for r0 in range(0, d, work.rows):
        r1 = min(d, r0 + work.rows)
        out[r0:r1] = work.w1(a[r0:r1], sa[r0:r1], b[r0:r1], sb[r0:r1])
    return out


def _use_buckets(device: torch.device, m: int) -> bool:
    # Below ~2^15 points torch.sort is as fast and the bucket path's fixed cost dominates.
    return device.type == "cpu" and (1 << 15) <= m < _BucketWork.MAX_POINTS


def _w1_sort(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    # Sorted in float32 as the official code does; shift, difference and mean in float64.
    ya = a.sort(dim=1).values.double() - sa.to(a.device)[:, None]
    yb = b.sort(dim=1).values.double() - sb.to(a.device)[:, None]
    return (ya - yb).abs().mean(dim=1).cpu()


class _BucketWork:
    """Buffers for the bucketed W1 of a group of row pairs, reused (fresh large allocations page-fault slowly).

    Rows are processed a group at a time (about 2^21 values per op) so that the number of torch calls, each a
    synchronisation of the intra-op thread pool, stays small: on a busy machine that cost dominates.
    """

    # When ambiguous buckets hold more than this fraction of a row's points (e.g. a set against itself): sort.
    SORT_FRACTION = 0.75
    # Counts and fraction sums are float32 tables (index_add is fastest there): exact counts below 2^24.
    MAX_POINTS = 1 << 24

    def __init__(self, m: int, device: torch.device, rows: int | None = None):
        if m >= self.MAX_POINTS:
            raise ValueError(f"bucketed W1 supports fewer than {self.MAX_POINTS} points, got {m}")
        self.m = m
        self.rows = rows or max(1, (1 << 21) // m)
        # Few buckets need sorting when a bucket holds far fewer points than the typical gap |F_a - F_b| x M,
        # ~sqrt(M) for two samples of one distribution: M/4 buckets, capped at 2^17 (~16 points of each set
        # per bucket at the paper's 2^21 descriptors, where sqrt(M) ~ 1450; larger tables leave the L2 cache).
        self.k = int(min(1 << 17, max(64, m // 4)))
        g, kk = self.rows, self.k + 1
        self.q = [torch.empty(g, m, dtype=torch.float32, device=device) for _ in range(2)]
        self.f = torch.empty(g, m, dtype=torch.float32, device=device)
        # int32 bucket ids: half the memory traffic of int64 in the scatter and gather passes.
        self.idx = [torch.empty(g, m, dtype=torch.int32, device=device) for _ in range(2)]
        self.ones = torch.ones(g * m, dtype=torch.float32, device=device)
        self.row_base = (torch.arange(g, device=device, dtype=torch.int32) * kk)[:, None]  # [g, 1]: row r's buckets start at r*(k+1)
        self.cnt = [torch.zeros(g * kk, dtype=torch.float32, device=device) for _ in range(2)]
        self.frac = [torch.zeros(g * kk, dtype=torch.float32, device=device) for _ in range(2)]

    def w1(self, a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        """W1 per row of a - sa[:, None] and b - sb[:, None]: a, b float32 [g, m]; sa, sb float64 [g]."""
        g, m, k, kk = a.shape[0], self.m, self.k, self.k + 1
        a_min, a_max = a.amin(dim=1), a.amax(dim=1)  # (aminmax(dim=) is 25x slower on CPU in torch 2.13)
        b_min, b_max = b.amin(dim=1), b.amax(dim=1)
        lo = torch.minimum(a_min.double() - sa, b_min.double() - sb)  # [g]
        hi = torch.maximum(a_max.double() - sa, b_max.double() - sb)
        flat = ~(hi > lo)  # all values of both samples equal: W1 = 0
        inv = k / torch.where(flat, torch.ones_like(hi), hi - lo)  # buckets per unit
        for s, (x, shift) in enumerate(((a, sa), (b, sb))):
            q, idx, f = self.q[s][:g], self.idx[s][:g], self.f[:g]
            # Position in bucket units: bucket t covers [t, t + 1); bucket k holds the maximum.
            torch.sub(x, (shift + lo).float()[:, None], out=q)
            q.mul_(inv.float()[:, None])
            torch.floor(q, out=f)
            f.clamp_(0, k)  # float32 rounding of (shift + lo) can put the minimum a hair below 0
            q.sub_(f)  # q now holds each point's offset from its bucket's left edge
            idx.copy_(f)
            if g > 1:
                idx.add_(self.row_base[:g])
            self.cnt[s].zero_().index_add_(0, idx.view(-1), self.ones[:g * m])
            self.frac[s].zero_().index_add_(0, idx.view(-1), q.view(-1))
        ca, cb = self.cnt[0][:g * kk].double(), self.cnt[1][:g * kk].double()
        net = ca - cb
        dl = (torch.cumsum(net.view(g, kk), 1) - net.view(g, kk)).view(-1)  # M x (F_a - F_b) at each left edge
        # M x integral of (F_a - F_b) over a bucket, in bucket units: dl x 1 + the sum of (1 - offset) over its
        # a-points - the same over its b-points.
        integral = dl + net - (self.frac[0][:g * kk].double() - self.frac[1][:g * kk].double())
        clear = (dl - cb >= 0) | (dl + ca <= 0)  # F_a - F_b cannot change sign inside the bucket
        total = integral.abs().masked_fill_(~clear, 0).view(g, kk).sum(1)  # [g]
        out = total / inv / m
        if not bool(clear.all()):
            amb = ~clear
            sel = [_flatnonzero(amb.index_select(0, self.idx[s][:g].view(-1))) for s in range(2)]  # point indices
            n_sel = torch.bincount(sel[0] // m, minlength=g) + torch.bincount(sel[1] // m, minlength=g)
            to_sort = n_sel > self.SORT_FRACTION * 2 * m
            if bool(to_sort.any()):  # crossings everywhere (e.g. identical samples): sorting is cheaper
                rows = to_sort.nonzero().view(-1)
                out[rows] = _w1_sort(a[rows], b[rows], sa[rows], sb[rows])
                sel = [i[~to_sort[i // m]] for i in sel]
                amb &= ~to_sort.repeat_interleave(kk)
            if sel[0].numel() + sel[1].numel():
                # Number the ambiguous buckets 0.. in order (rows stay apart: row r's buckets come before r+1's).
                rank = torch.cumsum(amb, 0) - 1
                ids = [self.idx[s][:g].view(-1).index_select(0, sel[s]) for s in range(2)]
                bid = torch.cat([rank.index_select(0, ids[0]), rank.index_select(0, ids[1])])
                off = torch.cat([self.q[s][:g].view(-1).index_select(0, sel[s]) for s in range(2)]).double()
                w = torch.ones(bid.numel(), dtype=torch.float64)
                w[sel[0].numel():] = -1.0
                amb_ids = _flatnonzero(amb)
                out += _ambiguous_area(bid, off, w, dl.index_select(0, amb_ids), amb_ids // kk, g) / inv / m
        return torch.where(flat, torch.zeros_like(out), out)


# Ambiguous buckets with more points than this are split into sub-buckets rather than sorted.
_SORT_POINTS = 1 << 15
_SUB_BUCKETS = 16


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true values of a 1-D CPU bool tensor (numpy's is 2x faster than torch.nonzero here)."""
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _ambiguous_area(bid: torch.Tensor, off: torch.Tensor, w: torch.Tensor, dl: torch.Tensor, row_of: torch.Tensor,
                    g: int, depth: int = 0) -> torch.Tensor:
    """Per row, M x the integral of |F_a - F_b| over a set of buckets, in bucket units: float64 [g].

    Points: bucket number bid (0.., buckets in increasing position), offset in the bucket off (in [0, 1)),
    weight w (+1 for a sample-a point, -1 for b). Per bucket: dl, M x (F_a - F_b) at its left edge, and
    row_of, the row it belongs to. Many points: the same count-and-sum step one level finer
    (_SUB_BUCKETS per bucket), recursing into the sub-buckets that stay ambiguous; few: sort them.
    """
    if bid.numel() <= _SORT_POINTS or depth >= 3:
        return _sorted_area(bid, off, w, dl, row_of, g)
    nb, sb = dl.numel(), _SUB_BUCKETS
    sub = (off * sb).floor_().clamp_(0, sb - 1)
    sid = bid * sb + sub.long()
    soff = off * sb - sub  # offset inside the sub-bucket
    n = nb * sb
    net = torch.zeros(n, dtype=torch.float64).index_add_(0, sid, w)
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, sid, torch.ones_like(w))
    fnet = torch.zeros(n, dtype=torch.float64).index_add_(0, sid, w * soff)
    ca, cb = (tot + net) / 2, (tot - net) / 2
    net2 = net.view(nb, sb)
    dl_sub = (dl[:, None] + torch.cumsum(net2, 1) - net2).view(-1)  # at each sub-bucket's left edge
    integral = dl_sub + net - fnet
    clear = (dl_sub - cb >= 0) | (dl_sub + ca <= 0)
    row_sub = row_of.repeat_interleave(sb)
    area = torch.zeros(g, dtype=torch.float64).index_add_(0, row_sub, integral.abs().masked_fill_(~clear, 0))
    amb = ~clear
    keep = _flatnonzero(amb.index_select(0, sid))
    if keep.numel():
        rank = torch.cumsum(amb, 0) - 1
        amb_ids = _flatnonzero(amb)
        area += _ambiguous_area(rank.index_select(0, sid.index_select(0, keep)), soff.index_select(0, keep),
                                w.index_select(0, keep), dl_sub.index_select(0, amb_ids),
                                row_sub.index_select(0, amb_ids), g, depth + 1)
    return area / sb  # sub-bucket units -> bucket units


def _sorted_area(bid: torch.Tensor, off: torch.Tensor, w: torch.Tensor, dl: torch.Tensor, row_of: torch.Tensor,
                 g: int) -> torch.Tensor:
    """:func:`_ambiguous_area` by sorting the points: between consecutive points F_a - F_b is constant."""
    pos = bid.double() + off
    order = torch.argsort(pos)  # the bucket number is monotone in the position: buckets stay grouped
    pos, bid, w, off = (t.index_select(0, order) for t in (pos, bid, w, off))
    first = torch.ones_like(bid, dtype=torch.bool)
    first[1:] = bid[1:] != bid[:-1]
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    csum = torch.cumsum(w, 0)
    start = (csum - w)[first]  # running weight before each bucket's first point
    seg = torch.cumsum(first.long(), 0) - 1
    d_left = dl.index_select(0, bid)
    d_after = d_left + csum - start.index_select(0, seg)  # M x (F_a - F_b) just right of each point
    nxt = torch.empty_like(pos)
    nxt[:-1] = pos[1:]
    nxt = torch.where(last, bid.double() + 1, nxt)  # after its last point a bucket runs to its right edge
    area = d_after.abs() * (nxt - pos)
    area += torch.where(first, d_left.abs() * off, torch.zeros_like(area))  # from the left edge to the first point
    return torch.zeros(g, dtype=torch.float64).index_add_(0, row_of.index_select(0, bid), area)


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
        w1_method: str = "auto") -> dict[str, Any]:
    """Multi-scale sliced Wasserstein distance between two image sets, x1e3 per level and averaged.

    reals, fakes: uint8 [N, 3, R, R] numpy arrays or torch tensors, or iterables of such batches (streamed;
    only descriptors are kept). Both sets must hold the same number of images (the paper: 16384).
    device: where to compute (default: CUDA when available). batch: images per pyramid step.
    max_images: use at most this many images of each set.
    storage: "float32", "float16", or "auto": float32 while the descriptors of both sets fit memory_mb
    (default 4 GiB on CPU, 40% of a GPU's memory), else float16 -- decided up front for arrays, and by
    switching (both sets alike) when a stream outgrows it. 16384 images at 128x128 need 9.2 GiB in float32.
    w1_method: "auto", "sort" or "bucket" (see :func:`wasserstein1`; all give the same value).

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
    try:
        da = describe(reals, **kw)
    except ImagesTooSmall as e:  # e.g. the 4x4 stage: report "nothing measured" rather than fail a run
        return {"levels": [], "swd_x1e3": {}, "avg": float("nan"), "images": 0, "descriptors_per_level": 0,
                "storage": None, "seed": seed, "device": dev.type, "skipped": str(e)}
    db = describe(fakes, **kw)
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


# ---- the real-vs-real noise floor ------------------------------------------------------------------------------

def _take(batches: Iterator[Any], n: int) -> Iterator[Any]:
    """The next n images of a batch iterator (splitting a batch when needed; the rest stays queued)."""
    left = n
    while left > 0:
        b = next(batches, None)
        if b is None:
            return
        if len(b) > left:
            yield b[:left]
            _push_back(batches, b[left:])
            return
        left -= len(b)
        yield b


class _Pushback:
    """An iterator with a one-batch push-back slot (to split a stream into consecutive samples)."""

    def __init__(self, it: Iterator[Any]):
        self.it, self.pending = it, []

    def __iter__(self) -> "_Pushback":
        return self

    def __next__(self) -> Any:
        return self.pending.pop() if self.pending else next(self.it)


def _push_back(batches: Iterator[Any], rest: Any) -> None:
    assert isinstance(batches, _Pushback)
    batches.pending.append(rest)


def swd_noise_floor(reals: Any, *, num_images: int, **swd_kwargs: Any) -> dict[str, Any]:
    """SWD between two disjoint samples of real images: the smallest SWD a perfect generator could show.

    reals: at least 2 x num_images images (array/tensor, or an iterable of batches); the first num_images
    are compared with the next num_images, exactly as :func:`swd` compares reals with fakes.
    """
    if isinstance(reals, (np.ndarray, torch.Tensor)):
        if len(reals) < 2 * num_images:
            raise ValueError(f"the noise floor needs 2 x {num_images} real images, got {len(reals)}")
        result = swd(reals[:num_images], reals[num_images:2 * num_images], **swd_kwargs)
    else:
        stream = _Pushback(_as_batches(reals, 2 * num_images))
        # swd() describes its first set completely before it reads the second, so both can be lazy slices of
        # one stream: only descriptors are kept.
        result = swd(_take(stream, num_images), _take(stream, num_images), **swd_kwargs)
        if result["images"] != num_images:
            raise ValueError(f"the noise floor needs 2 x {num_images} real images; the stream ran out")
    return {**result, "what": "real vs real (two disjoint samples)"}


def cached_swd_noise_floor(cache_url: str, storage: Any, *, dataset: str, resolution: int, num_images: int,
                           seed: int, load_reals: Any, **swd_kwargs: Any) -> dict[str, Any]:
    """The noise floor of a dataset at a resolution, computed once and kept as JSON under cache_url.

    The file name and its recorded key hold (dataset, resolution, image count, seed and the SWD settings that
    change the value); a file whose key differs is recomputed and replaced. load_reals(count) returns at
    least count real images at the resolution (array or iterable of batches); it is called only on a miss.
    storage: a :class:`pggan.storage.Storage` (any fsspec URL, e.g. the run directory).
    """
    import hashlib
    import json

    from ..storage import join

    settings = {k: swd_kwargs[k] for k in sorted(swd_kwargs)
                if k in ("num_neighborhoods", "patch", "dir_repeats", "dirs_per_repeat", "storage")}
    key = {"dataset": dataset, "resolution": int(resolution), "images": int(num_images), "seed": int(seed),
           "swd": settings}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    url = join(cache_url, f"swd-noise-floor-{int(resolution)}px-{int(num_images)}img-seed{int(seed)}-{digest}.json")
    if storage.exists(url):
        cached = storage.read_json(url)
        if cached.get("key") == key:
            return cached["result"]
    result = swd_noise_floor(load_reals(2 * num_images), num_images=num_images, seed=seed, **swd_kwargs)
    storage.write_json(url, {"key": key, "result": result})
    return result
