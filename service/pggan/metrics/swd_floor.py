"""The real-vs-real SWD noise floor (two disjoint samples of reals: the smallest SWD a perfect generator could
show), in one process, and cached as JSON in storage by its key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .swd import _as_batches, swd


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
