"""Where SWD looks: the 7x7 neighbourhoods of each pyramid level and the random projection directions.

Positions are a hash of (seed, level, image index, neighbourhood index), not a stateful RNG: the same for both sets,
for any batching, on any device and for any split of the images over ranks.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


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


def set_position_seed(seed: int, stream: int) -> int:
    """The neighbourhood-position seed of one image set (stream 1: reals, 2: fakes, 3: a second real sample),
    so that positions are drawn for each set independently, as the official code draws them."""
    return _hash_scalar(seed, stream, 0x5E7) & 0x7FFFFFFF
