"""Resolutions: the square image sizes PG-GAN works at (powers of two, 4..1024) and the pyramids over them.

One rule, used by the config, the data, the networks, the step benchmark and the SWD pyramid. Pure: no torch.
"""

from __future__ import annotations

import operator

from .errors import UserError

MIN_RESOLUTION, MAX_RESOLUTION = 4, 1024
RESOLUTIONS: tuple[int, ...] = tuple(2**k for k in range(2, 11))  # 4 .. 1024
RULE = f"must be a power of two in {MIN_RESOLUTION}..{MAX_RESOLUTION}"


def is_valid(resolution: object) -> bool:
    """A resolution a network, a dataset or a schedule can have (any integer type; not a bool or a float)."""
    try:
        value = operator.index(resolution)  # type: ignore[arg-type]
    except TypeError:
        return False
    return not isinstance(resolution, bool) and value in RESOLUTIONS


def check(resolution: object, what: str = "resolution") -> int:
    """``resolution`` as an int, or a UserError naming ``what`` (the user's flag or key)."""
    if not is_valid(resolution):
        raise UserError(f"{what} {resolution} {RULE}")
    return operator.index(resolution)  # type: ignore[arg-type]


def halvings(top: int, bottom: int = MIN_RESOLUTION) -> list[int]:
    """top, top/2, top/4, ... while the next level is >= bottom and the size halves evenly: the levels of a box
    or Laplacian pyramid, largest first (any size; a valid resolution halves down to ``bottom`` exactly)."""
    out = [top]
    while out[-1] // 2 >= bottom and out[-1] % 2 == 0:
        out.append(out[-1] // 2)
    return out


def levels(top: int, bottom: int = MIN_RESOLUTION) -> list[int]:
    """[bottom, 2 * bottom, ..., top] for valid resolutions: what a dataset stores and a network grows through."""
    return halvings(check(top), check(bottom, "lowest resolution"))[::-1]
