"""`launch.py evaluate`: SWD and MS-SSIM of a snapshot, or of two image sets, as a table and JSON.

    launch.py evaluate RUN_OR_SNAPSHOT [--reals DATASET] --metrics swd,msssim --images N [--out F.json]
    launch.py evaluate --reals A --fakes B --metrics swd,msssim --images N [--resolution R] [--out F.json]

A and B are folders of images (png/jpg/...; any fsspec URL) or, for the reals, a dataset source the data
module opens (e.g. 'synthetic:shapes' or a prepared dataset). Folder images are centre-cropped to a square
and box-filtered down to the resolution (default: that of the fakes or snapshot). MS-SSIM is measured on
N pairs of fakes (and of reals, for reference). Seeds follow the driver's stage evaluation: reals seed+1,
fakes seed+2, SWD neighbourhoods and directions seed.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError, from_json
from ..data import load_images, resolve_source
from ..data.images import center_square, is_image_name, to_rgb
from ..errors import UserError
from ..storage import Storage, join
from .msssim import ms_ssim_pairs
from .swd import swd

METRICS = ("swd", "msssim")


# ---- image sources ------------------------------------------------------------------------------------------

def image_files(storage: Storage, url: str) -> list[str]:
    """Names of the image files directly in a folder (sorted); [] when it is not a folder of images."""
    if url.startswith("synthetic:"):
        return []
    try:
        names = storage.listdir(url)
    except (NotADirectoryError, FileNotFoundError):
        return []
    return [n for n in names if is_image_name(n)]


def _to_square(img: Image.Image, resolution: int | None) -> np.ndarray:
    """RGB, centre-cropped as `prepare` crops, then box-filtered down to the resolution (as the data's lower
    resolutions are built from the top one)."""
    img = to_rgb(img)
    if img.size[0] != img.size[1]:  # generated and dataset images are square
        img = img.crop(center_square(*img.size))
    if resolution is not None and img.size[0] != resolution:
        if img.size[0] < resolution:
            raise UserError(f"image of {img.size[0]}x{img.size[0]} is smaller than --resolution {resolution}")
        img = img.resize((resolution, resolution), Image.BOX)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # [3, R, R]


def load_folder(storage: Storage, url: str, n: int, seed: int, resolution: int | None = None) -> np.ndarray:
    """Up to n images of a folder (a seeded subset when it holds more) as uint8 [n, 3, R, R].

    resolution None: the size of the first image (all must then match)."""
    names = image_files(storage, url)
    if not names:
        raise UserError(f"{url}: no images (png/jpg/...) found")
    if len(names) > n:
        pick = np.random.default_rng([seed, 0xF01D]).choice(len(names), n, replace=False)
        names = [names[i] for i in sorted(pick)]
    out = []
    for name in names:
        try:
            with Image.open(io.BytesIO(storage.read_bytes(join(url, name)))) as img:
                arr = _to_square(img, resolution)
        except (OSError, ValueError) as e:
            raise UserError(f"{join(url, name)}: not a readable image ({e})") from None
        resolution = resolution or arr.shape[-1]
        out.append(arr)
    return np.stack(out)


def load_reals(source: str, storage: Storage, resolution: int, n: int, seed: int,
               **dataset_kwargs: Any) -> np.ndarray:
    """n real images at resolution: a folder of images, or any source pggan.data.load_images opens."""
    if image_files(storage, source):
        return load_folder(storage, source, n, seed, resolution)
    return np.asarray(load_images(source, storage, resolution, n, seed=seed, **dataset_kwargs))


def _run_dir(snapshot_url: str) -> str:
    """The run directory a snapshot belongs to (<run>/snapshots/x.pt or <run>/final/generator.pt)."""
    if snapshot_url.endswith(".pt"):
        return snapshot_url.rstrip("/").rsplit("/", 2)[0]
    return snapshot_url.rstrip("/")


def reals_of_run(storage: Storage, run_url: str) -> tuple[str, dict[str, Any]]:
    """(reals source, load_images keyword arguments) from a run directory's config.json: the data the run
    trained on, found where the driver prepared it (:func:`pggan.driver.prepare_data`)."""
    url = join(run_url, "config.json")
    if not storage.exists(url):
        raise UserError(f"no --reals given and {url} does not exist; pass --reals DATASET_OR_FOLDER")
    try:
        cfg = from_json(storage.read_json(url))
    except (ConfigError, ValueError) as e:
        raise UserError(f"{url} does not validate ({e}); pass --reals DATASET_OR_FOLDER") from None
    data, top = cfg.data, cfg.model.max_resolution
    if data.source.startswith("synthetic:"):
        # The same synthetic set training saw: its size and top resolution (box pyramid) matter.
        return data.source, {"synthetic_images": data.synthetic_images, "max_resolution": top}
    top = data.resolution or top
    prepared = resolve_source(data.source, storage, top, cache_url=data.cache_url or join(run_url, "data"),
                              max_bad_fraction=data.max_bad_fraction, upscale_small=data.upscale_small)
    return prepared, {"max_resolution": top}


def generate_fakes(G: torch.nn.Module, n: int, resolution: int, seed: int, batch: int = 256) -> np.ndarray:
    """n uint8 images [n, 3, R, R] from G(z, R, alpha=1), z ~ N(0, 1) seeded on the CPU."""
    from ..generate import generate_images

    return generate_images(G, n, resolution, 1.0, seed=seed, batch=batch)


def _load_generator(source: str, storage: Storage, device: str) -> tuple[torch.nn.Module, int, str]:
    """(G in eval mode, its resolution, the snapshot URL)."""
    from ..checkpoint import load_generator, resolve_snapshot

    G, res, _ = load_generator(source, storage, device=device)
    return G.eval(), int(res), resolve_snapshot(storage, source)


# ---- evaluation -----------------------------------------------------------------------------------------------

def evaluate_sets(reals: np.ndarray | None, fakes: np.ndarray, metrics: tuple[str, ...], *, num_images: int,
                  seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Metric results of fakes (against reals for SWD) as a JSON-ready dict."""
    out: dict[str, Any] = {"resolution": int(fakes.shape[-1]), "seed": seed}
    if "swd" in metrics:
        if reals is None:
            raise UserError("SWD needs real images (--reals)")
        n = min(len(reals), len(fakes), num_images)
        t = time.perf_counter()
        out["swd"] = swd(reals[:n], fakes[:n], seed=seed, device=device, independent_positions=True)
        out["swd"]["seconds"] = round(time.perf_counter() - t, 2)
    if "msssim" in metrics:
        pairs = num_images
        ms: dict[str, Any] = {"pairs": pairs, "fakes": ms_ssim_pairs(fakes, pairs, seed, device=device)}
        if reals is not None:
            ms["reals"] = ms_ssim_pairs(reals, pairs, seed, device=device)  # the data's own variety, for reference
        out["msssim"] = ms
    return out


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a plain-text table: SWD x1e3 per level and average, then MS-SSIM."""
    lines = []
    if "swd" in result and result["swd"].get("skipped"):
        lines.append(f"SWD not measured: {result['swd']['skipped']}")
    elif "swd" in result:
        s = result["swd"]
        lines.append(f"SWD x1e3 ({s['images']} vs {s['images']} images, {s['descriptors_per_level']} "
                     f"descriptors per level; lower is better)")
        lines.append(f"{'level':>8}  {'SWD x1e3':>10}")
        for lv in s["levels"]:
            lines.append(f"{lv:>8}  {s['swd_x1e3'][str(lv)]:>10.3f}")
        lines.append(f"{'avg':>8}  {s['avg']:>10.3f}")
    if "msssim" in result:
        m = result["msssim"]
        ref = f", reals {m['reals']:.4f}" if "reals" in m else ""
        lines.append(f"MS-SSIM ({m['pairs']} pairs; lower = more varied): fakes {m['fakes']:.4f}{ref}")
    return "\n".join(lines)


def _metrics(arg: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in arg.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise UserError(f"--metrics {arg!r}: choose from {', '.join(METRICS)}")
    return names


def cli_evaluate(args: argparse.Namespace) -> int:
    """Entry point of `launch.py evaluate` (arguments in pggan.cli)."""
    metrics = _metrics(args.metrics)
    if args.images < 2:
        raise UserError("--images must be at least 2")
    storage = Storage(endpoint_url=args.endpoint_url)
    device = None if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device available")
    out_url = args.out
    need_reals = "swd" in metrics or args.reals is not None
    reals = None
    if args.source:
        if args.fakes:
            raise UserError("give either a snapshot/run or --fakes, not both")
        G, res, snap_url = _load_generator(args.source, storage, device or "cpu")
        resolution = args.resolution or res
        fakes = generate_fakes(G, args.images, resolution, args.seed + 2)
        src = None
        if need_reals:
            if args.reals:
                src, kwargs = args.reals, {}
            else:  # the data the run trained on
                src, kwargs = reals_of_run(storage, _run_dir(snap_url))
            reals = load_reals(src, storage, resolution, args.images, args.seed + 1, **kwargs)
        out_url = out_url or (snap_url[:-3] if snap_url.endswith(".pt") else snap_url) + "-metrics.json"
        what = {"source": args.source, "snapshot": snap_url, "reals": src}
    else:
        if not args.fakes:
            raise UserError("give a run or snapshot to evaluate, or --fakes FOLDER (with --reals for SWD)")
        if "swd" in metrics and not args.reals:
            raise UserError("SWD needs --reals (a folder of images or a dataset such as synthetic:shapes)")
        fakes = load_folder(storage, args.fakes, args.images, args.seed + 2, args.resolution)
        resolution = int(fakes.shape[-1])
        if args.reals:
            reals = load_reals(args.reals, storage, resolution, args.images, args.seed + 1)
        what = {"fakes": args.fakes, "reals": args.reals}
    if reals is not None and len(reals) != len(fakes):
        n = min(len(reals), len(fakes))
        print(f"note: {len(reals)} reals and {len(fakes)} fakes; SWD uses {n} of each")
    result = {**what, **evaluate_sets(reals, fakes, metrics, num_images=args.images, seed=args.seed,
                                      device=device)}
    print(format_table(result))
    if out_url:
        storage.write_json(out_url, result)
        print(f"wrote {out_url}")
    else:
        print(json.dumps(result, sort_keys=True))
    return 0
