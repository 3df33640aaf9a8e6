"""Metrics of the paper (section 5): multi-scale sliced Wasserstein distance and MS-SSIM.

Public API::

    swd(reals, fakes, *, num_neighborhoods=128, patch=7, dir_repeats=4, dirs_per_repeat=128, seed=0,
        device=None, batch=64, ...) -> {"levels": [R, ..., 16], "swd_x1e3": {"R": x, ...}, "avg": x, ...}
    swd_noise_floor(reals, *, num_images, **swd_kwargs) -> the same dict, for two disjoint real samples
    cached_swd_noise_floor(cache_url, storage, *, dataset, resolution, num_images, seed, load_reals, ...)
    laplacian_pyramid(x, levels) -> [bands..., gaussian];  reconstruct(pyramid) -> x
    ms_ssim(a, b) -> float64 [N] per pair;  ms_ssim_pairs(images, num_pairs=10000, seed=0) -> mean

Images are uint8 [N, 3, R, R] (numpy or torch); SWD also takes iterables of such batches (streamed).
SWD by idea: pyramid.py (Laplacian pyramid, levels), patches.py (neighbourhoods, directions), w1.py (1-D W1,
bucketed), swd.py (descriptor sets, swd()), swd_floor.py (real-vs-real floor and its cache), swd_dist.py
(the stage-end SWD spread over the training ranks).
`launch.py evaluate` (evaluate.py) and `launch.py bench swd` (bench.py) are the command-line faces.
"""

from .msssim import ms_ssim, ms_ssim_pairs
from .pyramid import laplacian_pyramid, reconstruct, swd_levels
from .swd import describe, swd, swd_from_descriptors
from .swd_floor import cached_swd_noise_floor, swd_noise_floor
from .w1 import wasserstein1

__all__ = ["swd", "swd_noise_floor", "cached_swd_noise_floor", "swd_from_descriptors", "describe", "swd_levels",
           "laplacian_pyramid", "reconstruct", "wasserstein1", "ms_ssim", "ms_ssim_pairs"]
