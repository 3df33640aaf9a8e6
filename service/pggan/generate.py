"""Sampling from a generator: uint8 images, sample grids (PNG), latent interpolations, and `launch.py generate`."""

from __future__ import annotations

import argparse
import io
import math

import numpy as np
import torch
from PIL import Image

from .storage import Storage


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images [N, 3, H, W] -> uint8 [N, 3, H, W] (the paper's convention)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def latents(n: int, latent_size: int, seed: int) -> torch.Tensor:
    """The same n latents for a seed on every machine (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, latent_size, generator=g)


@torch.no_grad()
def generate_images(G: torch.nn.Module, n: int, resolution: int, alpha: float = 1.0, seed: int = 0,
                    batch: int = 256, z: torch.Tensor | None = None) -> np.ndarray:
    """n uint8 images [n, 3, R, R] from G at (resolution, alpha), in batches."""
    device = next(G.parameters()).device
    z = latents(n, G.latent_size, seed) if z is None else z
    out = []
    for i in range(0, n, batch):
        out.append(to_uint8(G(z[i:i + batch].to(device), resolution, alpha)))
    return np.concatenate(out) if out else np.zeros((0, 3, resolution, resolution), np.uint8)


def grid_png(images: np.ndarray, cols: int | None = None, min_cell: int = 64) -> bytes:
    """PNG bytes of a grid of uint8 images [N, 3, H, W]; small images are enlarged (nearest) to min_cell."""
    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_cell / max(h, 1)))
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def interpolation_latents(rows: int, steps: int, latent_size: int, seed: int) -> torch.Tensor:
    """rows x steps latents, each row a spherical interpolation between two random latents."""
    ends = latents(2 * rows, latent_size, seed).view(rows, 2, latent_size)
    t = torch.linspace(0, 1, steps)
    a, b = ends[:, 0], ends[:, 1]  # [rows, L]
    omega = torch.acos((a / a.norm(dim=1, keepdim=True) * b / b.norm(dim=1, keepdim=True)).sum(1).clamp(-1, 1))
    so = torch.sin(omega).clamp_min(1e-6)[:, None, None]  # [rows, 1, 1]
    w0 = torch.sin((1 - t)[None, :, None] * omega[:, None, None]) / so
    w1 = torch.sin(t[None, :, None] * omega[:, None, None]) / so
    return (w0 * a[:, None] + w1 * b[:, None]).reshape(rows * steps, latent_size)


def cli_generate(args: argparse.Namespace) -> int:
    """`launch.py generate RUN_OR_SNAPSHOT --n 64 --out grid.png [--interpolate STEPS]`."""
    from .checkpoint import load_generator

    storage = Storage(endpoint_url=args.endpoint_url)
    G, res, meta = load_generator(args.source, storage)
    if args.interpolate:
        rows = max(1, args.n // args.interpolate)
        z = interpolation_latents(rows, args.interpolate, G.latent_size, args.seed)
        images = generate_images(G, len(z), res, 1.0, z=z)
        png = grid_png(images, cols=args.interpolate)
    else:
        images = generate_images(G, args.n, res, 1.0, seed=args.seed)
        png = grid_png(images)
    storage.write_bytes(args.out, png)
    print(f"wrote {len(images)} images at {res}x{res} from {meta.get('nimg', 0) / 1000:.1f} kimg to {args.out}")
    return 0
