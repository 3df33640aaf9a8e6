"""Image sources and the per-image transform of `prepare`: list, read, decode, square, resize, box pyramid.

A source is a folder (searched recursively) or a .zip of JPEG/PNG/WebP/BMP files at any fsspec URL.
Every file is decoded once: EXIF orientation applied, converted to RGB (grayscale replicated, alpha composited
over white), center-cropped to a square, resized to the target with PIL's Lanczos filter, then every lower
resolution is built by 2x2 box averaging (:func:`box_pyramid`), as the official dataset_tool does.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError
from ..resolution import MIN_RESOLUTION
from ..storage import Storage, explain_storage_error, normalize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BadImage(Exception):
    """A source file that cannot be used; the message is the reason recorded in the manifest."""


# ---- the box pyramid ------------------------------------------------------------------------------

def box_pyramid(images: np.ndarray, min_resolution: int = MIN_RESOLUTION) -> dict[int, np.ndarray]:
    """Every resolution from the top one down to ``min_resolution`` by 2x2 box averaging.

    images: uint8 [..., 3, R, R]. Returns {res: uint8 [..., 3, res, res]}, the top level included as given.

    Rounding follows the official dataset_tool (TFRecordExporter.add_image): the running image stays
    float32 between levels, each level is ``(a + b + c + d) * 0.25`` of the previous *float* level, and
    only the stored copy is quantized with ``np.rint`` (round half to even). So level ``R / 2^k`` equals
    ``rint(mean of each 2^k x 2^k block of the top uint8 image)``; float32 holds these means exactly
    for R <= 1024 (sums of up to 4^8 bytes need 24 bits).
    """
    R = images.shape[-1]
    assert images.dtype == np.uint8 and images.shape[-2] == R and images.shape[-3] == 3, images.shape
    out = {R: images}
    x = images.astype(np.float32)
    res = R
    while res > min_resolution:
        x = (x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) * 0.25
        res //= 2
        out[res] = np.rint(x).clip(0, 255).astype(np.uint8)
    return out


def box_downsample(images: np.ndarray, resolution: int) -> np.ndarray:
    """The ``resolution`` level of :func:`box_pyramid` (uint8 [..., 3, R, R] -> [..., 3, res, res])."""
    R = images.shape[-1]
    if resolution == R:
        return images
    f = R // resolution
    assert f * resolution == R and f & (f - 1) == 0, (R, resolution)
    # One reshape-mean equals the float32 cascade exactly (see box_pyramid), and is faster.
    x = images.reshape(*images.shape[:-2], resolution, f, resolution, f).astype(np.float32)
    return np.rint(x.mean(axis=(-3, -1), dtype=np.float32)).clip(0, 255).astype(np.uint8)


# ---- decoding ---------------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL image: grayscale replicated, 16-bit scaled to 8, alpha composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale PNGs: keep the top 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.uint32) >> 8
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB") if img.mode != "RGB" else img


def center_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The crop box (left, top, right, bottom) of the centred square of the shorter side: the one crop rule
    for `prepare` and for the image folders `evaluate` reads."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def decode_square(data: bytes, resolution: int,
                  upscale_small: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one file to uint8 [3, R, R]: RGB, center-cropped to a square, Lanczos-resized to R.

    Returns (image, (width, height) of the decoded file). Raises BadImage, with the reason the manifest
    records, for anything unreadable and for images whose shorter side is below R unless ``upscale_small``.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()                                  # decode now: truncated/corrupt data fail here
        img = ImageOps.exif_transpose(img)          # camera orientation, as viewers show it
        img = to_rgb(img)
    except UnidentifiedImageError:
        raise BadImage("cannot decode: not an image format PIL recognises") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the file unusable, nothing more
        raise BadImage(f"cannot decode: {type(e).__name__}: {str(e)[:160]}") from None
    w, h = img.size
    box = center_square(w, h)
    side = box[2] - box[0]
    if side < resolution and not upscale_small:
        raise BadImage(f"too small: {w}x{h} is below {resolution}x{resolution} "
                       "(use --upscale-small / data.upscale_small to upscale)")
    if side == resolution:
        img = img.crop(box)
    else:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    arr = np.asarray(img, dtype=np.uint8)           # [R, R, 3]
    assert arr.shape == (resolution, resolution, 3), arr.shape
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), (w, h)   # [3, R, R]


# ---- sources ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSource:
    """A folder or .zip of images at a URL, with the image file names in it (relative, sorted)."""

    url: str
    kind: str                  # "folder" | "zip"
    names: tuple[str, ...]
    ignored: int               # non-image files skipped by extension

    def reader(self, storage: Storage) -> "SourceReader":
        return SourceReader(self, storage)


def is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return (not base.startswith(".") and "__MACOSX/" not in name
            and posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS)


def list_source(url: str, storage: Storage) -> ImageSource:
    """Find the images of a folder (recursively) or .zip; UserError if there is no such source or no image."""
    url = normalize(url)
    try:
        fs, root = storage.fs(url)
        if url.lower().endswith(".zip"):
            if not storage.retry(f"check {url}", lambda: fs.isfile(root)):
                raise UserError(f"source {url}: no such .zip file")
            with storage.open(url, "rb") as f, zipfile.ZipFile(f) as z:
                entries = [i.filename for i in z.infolist() if not i.is_dir()]
            kind = "zip"
        else:
            if not storage.retry(f"check {url}", lambda: fs.isdir(root)):
                _raise_if_no_bucket(url, fs, root)
                raise UserError(f"source {url}: no such folder (expected a folder or .zip of images, "
                                "or a prepared dataset with manifest.json)")
            found = storage.retry(f"list {url}", lambda: fs.find(root))
            prefix = root.rstrip("/") + "/"
            entries = [p[len(prefix):] for p in found if p.startswith(prefix)]
            kind = "folder"
    except UserError:
        raise
    except zipfile.BadZipFile as e:
        raise UserError(f"source {url}: not a valid zip file ({e})") from None
    except Exception as e:  # noqa: BLE001 - bucket/credential/endpoint problems become one clear line
        raise UserError(explain_storage_error(url, e)) from None
    names = sorted(n for n in entries if is_image_name(n))
    if not names:
        raise UserError(f"source {url}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return ImageSource(url=url, kind=kind, names=tuple(names), ignored=len(entries) - len(names))


def _raise_if_no_bucket(url: str, fs: object, root: str) -> None:
    """On object stores a missing folder may be a missing bucket: say which."""
    try:
        fs.ls(root.split("/", 1)[0])  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001
        msg = explain_storage_error(url, e)
        if "bucket does not exist" in msg:
            raise UserError(msg) from None


class SourceReader:
    """Reads files of one source; folders in concurrent batches (s3fs fetches a batch in parallel)."""

    def __init__(self, source: ImageSource, storage: Storage):
        self.source, self.storage = source, storage
        self._fs, self._root = storage.fs(source.url)
        self._zip: zipfile.ZipFile | None = None
        if source.kind == "zip":
            # Read-ahead of 256 KiB: a member's local header and (small) data come in one range request,
            # instead of a default 5 MiB block per member on object stores.
            self._zip = zipfile.ZipFile(self._fs.open(self._root, "rb", block_size=1 << 18, cache_type="readahead"))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def read(self, names: list[str], batch: int = 16) -> Iterator[tuple[str, bytes | BadImage]]:
        """(name, bytes) per file in order; a missing or unreadable file gives (name, BadImage(reason))."""
        if self._zip is not None:
            for n in names:
                try:
                    yield n, self._zip.read(n)
                except Exception as e:  # noqa: BLE001 - a damaged member is one bad file
                    yield n, BadImage(f"cannot read from zip: {type(e).__name__}: {str(e)[:160]}")
            return
        for s in range(0, len(names), batch):
            group = names[s:s + batch]
            paths = [f"{self._root.rstrip('/')}/{n}" for n in group]
            got = self._fs.cat(paths, on_error="return")          # {path: bytes | exception}
            for n, p in zip(group, paths):
                data = got.get(p) if isinstance(got, dict) else got
                if isinstance(data, BaseException):
                    data = self._retry_one(n, p, data)
                yield n, data

    def _retry_one(self, name: str, path: str, first: BaseException) -> bytes | BadImage:
        if isinstance(first, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return BadImage(f"cannot read: {type(first).__name__}: {str(first)[:160]}")
        try:   # transient (network) errors: the storage retry budget; past it the whole prepare stops
            return self.storage.retry(f"read {self.source.url}/{name}", lambda: self._fs.cat_file(path))
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            return BadImage(f"cannot read: {type(e).__name__}: {str(e)[:160]}")
