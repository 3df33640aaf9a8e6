"""The Laplacian pyramid SWD describes images on (5x5 binomial filter, cv2.pyrDown / cv2.pyrUp borders), from the
image down to 16x16: the coarsest level is the Gaussian image itself, the others are band-pass images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..resolution import halvings


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """cv2.pyrDown: 5x5 binomial blur ([1,4,6,4,1]/16 per axis, reflect-101 borders), then every other pixel.

    x: float [N, C, H, W] with even H, W -> [N, C, H/2, W/2].
    """
    n, c, h, w = x.shape
    assert h % 2 == 0 and w % 2 == 0, f"pyr_down needs even sizes, got {h}x{w}"
    p = F.pad(x, (2, 2, 2, 2), mode="reflect")  # torch 'reflect' is cv2's BORDER_REFLECT_101
    # Only the even output rows/columns are kept, so compute only those: 5 strided taps per axis.
    r = (p[:, :, 0:h:2] + p[:, :, 4:h + 4:2]) + 4 * (p[:, :, 1:h + 1:2] + p[:, :, 3:h + 3:2]) + 6 * p[:, :, 2:h + 2:2]
    o = (r[..., 0:w:2] + r[..., 4:w + 4:2]) + 4 * (r[..., 1:w + 1:2] + r[..., 3:w + 3:2]) + 6 * r[..., 2:w + 2:2]
    return o.mul_(1.0 / 256.0)  # [N, C, H/2, W/2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """cv2.pyrUp: insert zeros between pixels, blur with 4 x the binomial kernel, reflect-101 borders.

    x: float [N, C, H, W] -> [N, C, 2H, 2W]. Per axis that is: even outputs (s[k-1] + 6 s[k] + s[k+1]) / 8 and
    odd outputs (s[k] + s[k+1]) / 2, where reflect-101 in the upsampled grid means s[-1] = s[1] on the
    left and s[n] = s[n-1] on the right (as cv2 does).
    """

    def up_axis(t: torch.Tensor, dim: int) -> torch.Tensor:
        size = t.shape[dim]
        p = torch.cat([t.narrow(dim, 1, 1) if size > 1 else t.narrow(dim, 0, 1), t, t.narrow(dim, size - 1, 1)], dim)
        left, mid, right = p.narrow(dim, 0, size), p.narrow(dim, 1, size), p.narrow(dim, 2, size)
        even = (left + right + 6 * mid) * 0.125
        odd = (mid + right) * 0.5
        out = torch.stack([even, odd], dim=dim + 1)
        return out.flatten(dim, dim + 1)

    return up_axis(up_axis(x, 2), 3)  # [N, C, 2H, 2W]


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid, finest first: levels-1 band-pass images and the coarsest Gaussian image.

    x: [N, C, H, W] (uint8 images are taken as values 0..255) -> list of float32 (float64 for float64 input)
    [N, C, H / 2^i, W / 2^i]. :func:`reconstruct` inverts it.
    """
    g = x.float() if x.dtype != torch.float64 else x
    pyr = []
    for _ in range(levels - 1):
        down = pyr_down(g)
        pyr.append(g - pyr_up(down))
        g = down
    pyr.append(g)
    return pyr


def reconstruct(pyr: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`laplacian_pyramid`: coarsest Gaussian, then upsample and add each band, coarse to fine."""
    x = pyr[-1]
    for band in reversed(pyr[:-1]):
        x = pyr_up(x) + band
    return x


class ImagesTooSmall(ValueError):
    """The images are smaller than one neighbourhood (PG-GAN's 4x4 stage): there is no SWD to measure."""


def swd_levels(resolution: int, min_resolution: int = 16, patch: int = 7) -> list[int]:
    """Pyramid resolutions for SWD: resolution, resolution/2, ... down to min_resolution (the paper's 16).

    Below 16x16 (early PG-GAN stages) the single level is the image itself, as long as a patch fits.
    """
    if resolution < patch + 1:
        raise ImagesTooSmall(f"SWD needs images of at least {patch + 1}x{patch + 1} for {patch}x{patch} "
                             f"neighbourhoods, got {resolution}x{resolution}")
    return halvings(resolution, min_resolution)
