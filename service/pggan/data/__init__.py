"""Training data: the built-in synthetic set, `prepare` (images at any fsspec URL -> multi-resolution uint8
shards), and per-rank loading of one resolution's shards for training and metrics.

Public API (what the worker, the driver and the metrics import)::

    open_dataset(source, storage, resolution, *, synthetic_images, seed, cache_url, max_bad_fraction,
                 upscale_small) -> Dataset
    Dataset.num_images, .resolutions, .max_resolution, .images(res, indices), .loader(res, rank=..., ...)
    load_images(source, storage, resolution, n, seed=0, **open_kwargs) -> uint8 [n, 3, R, R]
    resolve_source(...)       prepare a folder/zip once (driver side) before workers open it
    prepare_dataset(src, dst, storage, resolution, ...)

Importing this package does not import torch (the loader imports it when it starts).
"""

from .dataset import (Dataset, PreparedDataset, SyntheticDataset, load_images, open_dataset, resolve_source,
                      sample_indices)
from .loader import Loader
from .order import rank_plan, rank_span
from .images import box_downsample, box_pyramid
from .prepare import PrepareResult, prepare_dataset, read_manifest
from .synthetic import render_shapes

__all__ = ["Dataset", "Loader", "PreparedDataset", "SyntheticDataset", "load_images", "open_dataset",
           "rank_plan", "rank_span", "resolve_source", "sample_indices", "box_downsample", "box_pyramid",
           "PrepareResult", "prepare_dataset", "read_manifest", "render_shapes"]
