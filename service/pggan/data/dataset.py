"""Datasets the training workers and the metrics read: synthetic, prepared, or images prepared on the fly.

The order a rank reads them in is :mod:`pggan.data.order`; the background loader that reads and converts its
batches is :mod:`pggan.data.loader`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from ..errors import UserError
from ..storage import Storage, explain_storage_error, join, normalize
from ..resolution import check as check_resolution, levels
from .images import box_downsample
from .loader import Loader
from .order import CHUNK_BYTES, WINDOW_BYTES
from .prepare import MANIFEST, prepare_dataset, read_manifest
from .synthetic import render_shapes

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_KINDS = ("shapes",)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "pggan", "data")


# ---- datasets ------------------------------------------------------------------------------------------

class Dataset:
    """Images at every resolution from 4 up to ``max_resolution``; subclasses say how they are read."""

    source: str
    num_images: int
    resolutions: list[int]

    @property
    def max_resolution(self) -> int:
        return self.resolutions[-1]

    @property
    def url(self) -> str:
        """What workers pass to open_dataset to get this dataset again: 'synthetic:shapes' or the prepared URL."""
        return self.source

    def images(self, resolution: int, indices: Any) -> np.ndarray:
        """Images ``indices`` (any order, repeats allowed) at ``resolution``: uint8 [n, 3, R, R]."""
        self._check(resolution)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index out of range 0..{self.num_images - 1}")
        if len(idx) == 0:
            return np.empty((0, 3, resolution, resolution), np.uint8)
        store, where = self._read(resolution, idx)
        return store if where is None else store[where]

    def loader(self, resolution: int, *, rank: int, world_size: int, batch_size: int, seed: int, mirror: bool,
               start_batch: int = 0, prefetch: int = 4) -> "Loader":
        """An endless iterator of this rank's batches at ``resolution`` (see the module docstring for the order).

        Yields float32 CPU tensors [batch_size, 3, R, R] in [-1, 1], contiguous, prepared by a background
        thread ``prefetch`` batches ahead. ``start_batch`` resumes at that batch exactly.
        """
        return Loader(self, resolution, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                      mirror=mirror, start_batch=start_batch, prefetch=prefetch)

    # Sizes of the order's units at a resolution (subclasses may shrink them, e.g. in tests).
    chunk_bytes: int = CHUNK_BYTES
    window_bytes: int = WINDOW_BYTES

    def chunk_size(self, resolution: int) -> int:
        return max(1, self.chunk_bytes // (3 * resolution * resolution))

    def window_size(self, resolution: int) -> int:
        return max(1, self.window_bytes // (3 * resolution * resolution))

    def _check(self, resolution: int) -> None:
        if resolution not in self.resolutions:
            raise UserError(f"dataset {self.source} has resolutions {self.resolutions[0]}..{self.max_resolution}; "
                            f"{resolution} is not among them")

    def _read(self, resolution: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(store uint8 [U, 3, R, R], where int64 [n] or None): image idx[i] is store[where[i]] (store[i] if
        None). Lets a reader fetch each image once in storage order and the loader gather batches later."""
        raise NotImplementedError


class SyntheticDataset(Dataset):
    """`synthetic:shapes`: ``num_images`` images rendered on demand at ``resolution`` (the top), lower
    resolutions box-downsampled from it. Image i depends only on (seed, i)."""

    def __init__(self, num_images: int, resolution: int, seed: int = 0):
        self.source = f"{SYNTHETIC_PREFIX}shapes"
        self.num_images = int(num_images)
        self.resolutions = levels(resolution)
        self.seed = int(seed)

    # Rendering is random access and images are i.i.d.: a full permutation (chunks of one image) costs
    # nothing, and small windows let the first batch come after 512 renders, not a 64 MiB window's worth.
    def chunk_size(self, resolution: int) -> int:
        return 1

    def window_size(self, resolution: int) -> int:
        return 512

    def _read(self, resolution: int, idx: np.ndarray) -> tuple[np.ndarray, None]:
        return box_downsample(render_shapes(self.seed, idx, self.max_resolution), resolution), None


class PreparedDataset(Dataset):
    """A dataset written by `prepare` (manifest.json + .npy shards per resolution) at any fsspec URL.

    Reads are byte-range reads of the shards of one resolution only, coalesced into runs and fetched
    concurrently (s3fs) where the filesystem supports it.
    """

    def __init__(self, url: str, storage: Storage, manifest: dict[str, Any]):
        self.source = url
        self.storage = storage
        self.manifest = manifest
        self.num_images = int(manifest["num_images"])
        self.resolutions = [int(r) for r in manifest["resolutions"]]
        self._shards: dict[int, tuple[list[str], np.ndarray, np.ndarray]] = {}
        for r in self.resolutions:
            shards = manifest["shards"][str(r)]
            counts = np.array([s["count"] for s in shards], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            if counts.sum() != self.num_images:
                raise UserError(f"{url}/{MANIFEST}: shards of {r}x{r} hold {counts.sum()} images, "
                                f"not num_images={self.num_images}; the manifest is damaged, re-run prepare")
            self._shards[r] = ([s["path"] for s in shards], starts,
                               np.array([s["offset"] for s in shards], dtype=np.int64))
        self._fs: Any = None

    @classmethod
    def open(cls, url: str, storage: Storage) -> "PreparedDataset":
        url = normalize(url)
        try:
            manifest = read_manifest(url, storage)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - bucket/credential problems become one line
            raise UserError(explain_storage_error(url, e)) from None
        if manifest is None:
            raise UserError(f"{url}: no {MANIFEST}; not a prepared dataset (or an unfinished one: re-run "
                            "`launch.py prepare SRC DST --resolution R` to finish it)")
        return cls(url, storage, manifest)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None                  # filesystems are rebuilt per process
        return state

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None:
            self._fs = self.storage.fs(self.source)
        return self._fs

    def _read(self, resolution: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        paths, starts, offsets = self._shards[resolution]
        img_bytes = 3 * resolution * resolution
        uniq, inverse = np.unique(idx, return_inverse=True)                  # sorted: shard-major order
        shard = np.searchsorted(starts, uniq, side="right") - 1
        row = uniq - starts[shard]
        # Runs: consecutive needed rows of one shard, bridging gaps under ~1 MiB (cheaper than another request).
        max_gap = max(1, (1 << 20) // img_bytes)
        new_run = np.ones(len(uniq), dtype=bool)
        new_run[1:] = (shard[1:] != shard[:-1]) | (row[1:] - row[:-1] > max_gap)
        run_first = np.flatnonzero(new_run)
        run_last = np.append(run_first[1:], len(uniq)) - 1
        fs, root = self._filesystem()
        r_paths = [f"{root}/{paths[s]}" for s in shard[run_first]]
        r_starts = (offsets[shard[run_first]] + row[run_first] * img_bytes).tolist()
        r_ends = (offsets[shard[run_first]] + (row[run_last] + 1) * img_bytes).tolist()
        blobs = self.storage.retry(f"read {self.source} ({resolution}x{resolution})",
                                   lambda: fs.cat_ranges(r_paths, r_starts, r_ends, on_error="raise"))
        out = np.empty((len(uniq), 3, resolution, resolution), dtype=np.uint8)   # [U, 3, R, R]
        for a, b, blob in zip(run_first, run_last, blobs):
            rows = np.frombuffer(blob, dtype=np.uint8).reshape(-1, 3, resolution, resolution)
            rel = row[a:b + 1] - row[a]
            if rel[-1] == b - a:                                         # every row of the run is needed
                out[a:b + 1] = rows
            else:
                np.take(rows, rel, axis=0, out=out[a:b + 1])
        return out, inverse.reshape(-1)


# ---- opening sources -----------------------------------------------------------------------------------

def resolve_source(source: str, storage: Storage, resolution: int, *, cache_url: str | None = None,
                   max_bad_fraction: float = 0.01, upscale_small: bool = False, workers: int = 0) -> str:
    """The URL of a prepared dataset for ``source`` (or ``source`` itself if synthetic or already prepared).

    A folder/.zip of images is prepared into ``cache_url/<name>-<hash>-r<R>`` unless a complete preparation
    is there already. Drivers call this once before starting workers, so ranks do not prepare concurrently.
    """
    if source.startswith(SYNTHETIC_PREFIX):
        return source
    url = normalize(source)
    try:
        if read_manifest(url, storage) is not None:
            return url
        unfinished = storage.exists(join(url, "parts"))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(explain_storage_error(url, e)) from None
    if unfinished:
        raise UserError(f"{url} is an unfinished prepared dataset (no {MANIFEST}); re-run "
                        f"`launch.py prepare SRC {url} --resolution R` to finish it")
    key = hashlib.sha256(f"{url}|{upscale_small}".encode()).hexdigest()[:10]
    stem = url.rstrip("/").rsplit("/", 1)[-1].replace(".zip", "") or "data"
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:40]
    cached = join(normalize(cache_url or DEFAULT_CACHE), f"{stem}-{key}-r{resolution:04d}")
    m = read_manifest(cached, storage)
    if m is None:
        prepare_dataset(url, cached, storage, resolution, upscale_small=upscale_small,
                        max_bad_fraction=max_bad_fraction, workers=workers, progress=True)
    return cached


def open_dataset(source: str, storage: Storage, resolution: int, *, synthetic_images: int = 16384, seed: int = 0,
                 cache_url: str | None = None, max_bad_fraction: float = 0.01,
                 upscale_small: bool = False) -> Dataset:
    """Open ``source`` with every resolution up to ``resolution`` (the highest one needed).

    source: 'synthetic:shapes' (``synthetic_images`` images of generator seed ``seed``, top resolution
    ``resolution``), a prepared dataset URL (has manifest.json), or a folder/.zip of images, prepared on the
    fly into ``cache_url`` (default ~/.cache/pggan/data), reusing a complete earlier preparation.
    """
    resolution = check_resolution(resolution, "data resolution")
    if source.startswith(SYNTHETIC_PREFIX):
        kind = source[len(SYNTHETIC_PREFIX):]
        if kind not in SYNTHETIC_KINDS:
            raise UserError(f"data.source {source!r}: unknown synthetic dataset; choose one of "
                            f"{', '.join(SYNTHETIC_PREFIX + k for k in SYNTHETIC_KINDS)}")
        return SyntheticDataset(synthetic_images, resolution, seed)
    url = resolve_source(source, storage, resolution, cache_url=cache_url, max_bad_fraction=max_bad_fraction,
                         upscale_small=upscale_small)
    ds = PreparedDataset.open(url, storage)
    if ds.max_resolution < resolution:
        raise UserError(f"dataset {url} was prepared up to {ds.max_resolution}x{ds.max_resolution}, but "
                        f"{resolution}x{resolution} is needed; re-run prepare with --resolution {resolution}")
    return ds


def sample_indices(num_images: int, n: int, seed: int) -> np.ndarray:
    """n indices: a seeded random subset without repeats, or whole permutations back to back if n > N."""
    rng = np.random.default_rng([seed, 0x5A3B1E])
    reps = -(-n // num_images)
    return np.concatenate([rng.permutation(num_images) for _ in range(reps)])[:n]


def load_images(source: str, storage: Storage, resolution: int, n: int, seed: int = 0,
                **open_kwargs: Any) -> np.ndarray:
    """n real images at ``resolution`` for metrics (SWD): uint8 [n, 3, R, R], a seeded random subset.

    ``open_kwargs`` go to :func:`open_dataset`; ``max_resolution`` (default ``resolution``) is the top
    resolution the dataset is opened at — pass training's top so synthetic reals are the same box pyramid.
    """
    top = open_kwargs.pop("max_resolution", None) or resolution
    ds = open_dataset(source, storage, max(top, resolution), **open_kwargs)
    return ds.images(resolution, sample_indices(ds.num_images, n, seed))
