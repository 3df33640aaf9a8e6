"""`synthetic:shapes`: the built-in dataset of the embedded demo and the tests. No download, no files.

Each image is a smooth two-colour background gradient, sometimes with soft stripes, under two or three
filled shapes (circle, square, triangle; rotated, in distinct saturated colours, some with a striped fill).
That gives structure at every scale: the layout at 4x4-8x8, shape outlines at 16x16-32x32, edges and stripes
above, which a small GAN visibly learns in minutes at 32x32 and which SWD tells apart from blur or noise.

Image ``i`` depends only on ``(seed, i)``: its parameters come from a counter-based hash (splitmix64) of the
pair, not from a sequential RNG, so any rank renders any subset of the dataset without rendering the rest.
Shapes are drawn from signed distances with a one-pixel anti-aliased edge, vectorised over a block of images.

Resolutions below the dataset's top one are the 2x2 box pyramid of the top one (:func:`images.box_downsample`),
exactly as prepared data are, so a 16x16 stage of a 32x32 run sees what a prepared 32x32 dataset would give.
"""

from __future__ import annotations

import numpy as np

# Distinct, saturated fill colours (RGB in [0, 1]); every image picks its shape colours without replacement.
PALETTE = np.array([
    [0.90, 0.10, 0.10],  # red
    [0.10, 0.75, 0.20],  # green
    [0.15, 0.30, 0.95],  # blue
    [0.95, 0.85, 0.10],  # yellow
    [0.85, 0.15, 0.85],  # magenta
    [0.10, 0.85, 0.90],  # cyan
    [1.00, 0.55, 0.05],  # orange
    [0.97, 0.97, 0.97],  # white
], dtype=np.float32)

MAX_SHAPES = 3
_PER_SHAPE = 10                                   # uniforms per shape slot
_N_UNIFORMS = 16 + len(PALETTE) + MAX_SHAPES * _PER_SHAPE


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective 64-bit mix (wrap-around arithmetic on uint64 arrays)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, indices: np.ndarray, k: int) -> np.ndarray:
    """k uniforms in [0, 1) per image that depend only on (seed, image index): float64 [n, k]."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))        # [1]
        per_image = _splitmix64(key ^ _splitmix64(idx))                                   # [n]
        step = np.arange(1, k + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)   # [1, k]
        z = _splitmix64(per_image[:, None] + step)                                        # [n, k]
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def render_shapes(seed: int, indices: np.ndarray, resolution: int) -> np.ndarray:
    """Render images ``indices`` of the dataset ``seed`` directly at ``resolution``: uint8 [n, 3, R, R].

    Callers that need the dataset at a lower resolution than its top one use
    :meth:`SyntheticDataset.images`, which box-downsamples this rendering from the top resolution.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    R = int(resolution)
    out = np.empty((len(indices), 3, R, R), dtype=np.uint8)
    block = max(1, (1 << 18) // (R * R))          # ~1M floats per [b, 3, R, R] block: cache friendly
    for s in range(0, len(indices), block):
        out[s:s + block] = _render_block(seed, indices[s:s + block], R)
    return out


def _signed_distance(kind: np.ndarray, dx: np.ndarray, dy: np.ndarray, rad: np.ndarray, rot: np.ndarray,
                     R: int) -> np.ndarray:
    """Signed distance (image units) of every pixel to each image's shape: circle, square or triangle by kind."""
    d = np.empty((len(kind), R, R), dtype=np.float32)
    for k in range(3):
        sel = kind == k
        if not sel.any():
            continue
        sx, sy, r, th = dx[sel], dy[sel], rad[sel][:, None, None], rot[sel][:, None, None]
        if k == 0:
            d[sel] = np.sqrt(sx * sx + sy * sy) - r
        elif k == 1:
            qx = sx * np.cos(th) + sy * np.sin(th)
            qy = -sx * np.sin(th) + sy * np.cos(th)
            d[sel] = np.maximum(np.abs(qx), np.abs(qy)) - r
        else:   # equilateral triangle: the furthest of its three edge half-planes
            e = [sx * np.cos(th + a) + sy * np.sin(th + a) for a in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
            d[sel] = np.maximum(np.maximum(e[0], e[1]), e[2]) - 0.6 * r
    return d


def _render_block(seed: int, idx: np.ndarray, R: int) -> np.ndarray:
    b = len(idx)
    u = uniforms(seed, idx, _N_UNIFORMS).astype(np.float32)                             # [b, K]
    c = (np.arange(R, dtype=np.float32) + 0.5) / R                                       # pixel centres in (0, 1)
    yy, xx = c[None, :, None], c[None, None, :]                                          # [1, R, 1], [1, 1, R]
    v = lambda j: u[:, j][:, None, None]                                                 # noqa: E731 - [b, 1, 1]

    # Background: a linear gradient between two muted colours along a random direction.
    c0 = 0.12 + 0.45 * u[:, 0:3]                                                         # [b, 3]
    c1 = 0.12 + 0.45 * u[:, 3:6]
    ang = 2 * np.pi * v(6)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang), 0.0, 1.0)     # [b, R, R]
    img = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * t[:, None]                # [b, 3, R, R]

    # Soft stripes on about half of the backgrounds: 3-8 cycles per image width (visible from 16x16 up).
    sel = u[:, 7] < 0.5
    if sel.any():
        freq, sang, phase = 3.0 + 5.0 * v(8)[sel], np.pi * v(9)[sel], v(10)[sel]
        stripes = np.sin(2 * np.pi * (freq * (xx * np.cos(sang) + yy * np.sin(sang)) + phase))   # [s, R, R]
        img[sel] *= (1.0 + 0.15 * stripes)[:, None]

    # Shapes: 2 or 3 per image, colours distinct within the image, drawn back to front.
    colours = PALETTE[np.argsort(u[:, 16:16 + len(PALETTE)], axis=1)[:, :MAX_SHAPES]]   # [b, S, 3]
    n_shapes = 2 + (u[:, 11] < 0.5)                                                      # [b]
    for j in range(MAX_SHAPES):
        p = u[:, 16 + len(PALETTE) + j * _PER_SHAPE:][:, :_PER_SHAPE]                    # [b, 10]
        kind = np.minimum((p[:, 0] * 3).astype(np.int64), 2)                             # circle, square, triangle
        cx, cy = 0.18 + 0.64 * p[:, 1], 0.18 + 0.64 * p[:, 2]                            # centre
        rad = 0.10 + 0.13 * p[:, 3]                                                      # size (inradius-like)
        rot = 2 * np.pi * p[:, 4]
        dx = xx - cx[:, None, None]                                                      # [b, 1, R]
        dy = yy - cy[:, None, None]                                                      # [b, R, 1]
        d = _signed_distance(kind, dx, dy, rad, rot, R)                                 # [b, R, R]
        cover = np.clip(0.5 - d * R, 0.0, 1.0)[:, None]                                 # [b, 1, R, R], 1-px AA edge
        cover[j >= n_shapes] = 0.0
        fill = np.broadcast_to(colours[:, j, :, None, None], (b, 3, R, R)).copy()       # [b, 3, R, R]
        # A third of the shapes get a striped fill (fine structure inside the outline): 6-12 cycles per width.
        sel = p[:, 5] < 1 / 3
        if sel.any():
            fang, ffreq = np.pi * p[sel, 6][:, None, None], 6.0 + 6.0 * p[sel, 7][:, None, None]
            wave = np.sin(2 * np.pi * ffreq * (dx[sel] * np.cos(fang) + dy[sel] * np.sin(fang)))  # [s, R, R]
            fill[sel] *= (1.0 - 0.3 * (0.5 + 0.5 * wave))[:, None]
        fill -= img                                                                      # img += (fill - img) * cover,
        fill *= cover                                                                    # in place: no temporaries
        img += fill
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    return np.rint(img, out=img).astype(np.uint8)
