"""The minibatch-stddev group size (model math without torch: the config checks it, the layer uses it)."""

from __future__ import annotations


def mbstd_group(group_size: int, per_worker_batch: int) -> int:
    """Effective minibatch-stddev group: the largest divisor of the per-worker batch that is <= group_size.

    The official TF code uses min(group_size, N) and needs N divisible by it; the paper's own minibatches
    (14 at 256, 6 at 512) are not divisible by 4, so a group of 2 (resp. 3) is used there instead.
    """
    g = min(group_size, per_worker_batch)
    while g > 1 and per_worker_batch % g:
        g -= 1
    return max(g, 1)
