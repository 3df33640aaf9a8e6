"""PG-GAN networks: equalized-lr layers (layers.py), the full-size generator/discriminator (networks.py) and the
minibatch-stddev group size (mbstd.py, no torch).

The names below are imported on first use, so ``pggan.models.mbstd`` (which the config checks with) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConvDown2d": "layers",
    "EqualizedConv2d": "layers",
    "EqualizedLinear": "layers",
    "MinibatchStdDev": "layers",
    "PixelNorm": "layers",
    "UpConv2d": "layers",
    "downsample2x": "layers",
    "upsample2x": "layers",
    "Discriminator": "networks",
    "Generator": "networks",
    "blend_reals": "networks",
    "build_networks": "networks",
    "num_channels": "networks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
