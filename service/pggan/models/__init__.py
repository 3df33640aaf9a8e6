"""PG-GAN networks: equalized-lr layers (layers.py) and the full-size generator/discriminator (networks.py)."""

from .layers import (
    ConvDown2d,
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    PixelNorm,
    UpConv2d,
    downsample2x,
    upsample2x,
)
from .networks import Discriminator, Generator, blend_reals, build_networks, num_channels

__all__ = [
    "ConvDown2d",
    "Discriminator",
    "EqualizedConv2d",
    "EqualizedLinear",
    "Generator",
    "MinibatchStdDev",
    "PixelNorm",
    "UpConv2d",
    "blend_reals",
    "build_networks",
    "downsample2x",
    "num_channels",
    "upsample2x",
]
