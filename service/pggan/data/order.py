"""Data order, the contract resume relies on: a pure function of (num_images, sizes, seed, epoch, rank, world).

For one resolution, images are cut into *chunks* of contiguous indices (about 2 MiB each: a chunk is one range
read). Epoch ``e`` is a permutation of all images: the chunks
in an order drawn from ``(seed, e)``. Rank ``r`` of ``W`` takes the contiguous slice ``[start_r, start_r + L_r)``
of it (``L_r`` = N // W, plus one for the first N % W ranks), so ranks are disjoint and together cover every
image exactly once per epoch; inside its slice a rank shuffles within *windows* of about 64 MiB (seeded by
``(seed, e, r)``) and draws mirror flips from the same key. A rank's stream is its slices of epochs 0, 1, 2, ...
back to back, and batch ``b`` is stream positions ``[b * B, (b + 1) * B)`` — so ``start_batch`` jumps straight
to the right epoch and window, and reads only what it yields. Prepared data are stored in a shuffled order
(see prepare.py), so a chunk is already a random sample of the dataset.
"""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 2 << 20           # contiguous images per range read (and per unit of the epoch permutation)
WINDOW_BYTES = 64 << 20         # images a rank shuffles among (bounds the loader's memory)


# ---- order: a pure function of (num_images, sizes, seed, epoch, rank, world_size) ---------------------

def rank_span(num_images: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, length) of rank's slice of an epoch: lengths differ by at most one, slices tile [0, N)."""
    base, extra = divmod(num_images, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def epoch_order(num_images: int, chunk: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s permutation of all image indices: contiguous chunks in a seeded order. int64 [N]."""
    n_chunks = -(-num_images // chunk)
    perm = np.random.default_rng([seed, epoch, 0x0DA7A]).permutation(n_chunks)
    starts = perm * chunk                                                    # [C]
    lengths = np.minimum(starts + chunk, num_images) - starts                # last chunk may be short
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)               # [N] start of each in the output
    return np.repeat(starts, lengths) + (np.arange(num_images) - offsets)


def rank_plan(num_images: int, chunk: int, window: int, seed: int, epoch: int, rank: int,
              world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image indices int64 [L_r], mirror flips bool [L_r]) of rank's slice of an epoch, in yield order."""
    start, length = rank_span(num_images, rank, world_size)
    part = epoch_order(num_images, chunk, seed, epoch)[start:start + length]
    rng = np.random.default_rng([seed, epoch, rank, 0x5EED])
    keys = rng.random(length)
    order = np.lexsort((keys, np.arange(length) // window))                  # shuffle inside each window
    flips = rng.random(length) < 0.5
    return part[order], flips
