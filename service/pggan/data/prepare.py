"""`launch.py prepare SRC DST --resolution R`: build the multi-resolution dataset once, so that training at
4x4 never decodes a 1024x1024 JPEG.

Layout at DST (any fsspec URL)::

    manifest.json                 written LAST, atomically: its presence means "complete"
    parts/p00000.json             one record per part, written after its shards (also lists each image's file)
    r0004/p00000-000.npy          uint8 [n, 3, 4, 4] shards, one set per resolution
    ...
    r0256/p00000-000.npy, p00000-001.npy, ...   (high resolutions split to bound shard bytes)

The source files (sorted, then shuffled with a fixed seed so that any contiguous run of images is a random
sample, as the official tool shuffles) are cut into parts of up to 1024 files. A part is the unit of work and of
resume: a process decodes each of its files once (:func:`images.decode_square`), builds the box pyramid, writes
its shards and then its record (shard names, image counts, byte offsets, sha256). Re-running keeps every part
whose record matches the plan and whose shards still hash to the recorded sha256, and redoes the rest.
Unusable files (corrupt, unreadable, too small) are counted, listed and skipped; the run fails with a
UserError only when they exceed ``max_bad_fraction``, with the finished parts kept for the next run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError
from ..resolution import check as check_resolution, levels
from ..storage import Storage, StorageUnavailable, explain_storage_error, join, normalize
from .images import BadImage, ImageSource, box_pyramid, decode_square, list_source

FORMAT = "pggan-prepared"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_BYTES = 64 << 20          # bound on one shard's bytes (high resolutions split a part into several)
MAX_PART_FILES = 1024           # source files per part (the unit of parallel work and of resume)
ORDER_SEED = 123                # fixed shuffle of the file order (the official dataset_tool uses 123 too)


def part_size(num_files: int) -> int:
    """Files per part: about 16 parts for small sources (parallelism), at most 1024 files per part.

    Depends only on the file count (never on the worker count), so a re-run cuts the same parts.
    """
    return int(min(MAX_PART_FILES, max(64, -(-num_files // 16))))


def images_per_shard(resolution: int, part_files: int) -> int:
    return int(max(1, min(part_files, SHARD_BYTES // (3 * resolution * resolution))))


def shard_name(resolution: int, part: int, j: int) -> str:
    return f"r{resolution:04d}/p{part:05d}-{j:03d}.npy"


def npy_bytes(arr: np.ndarray) -> tuple[bytes, int]:
    """(.npy file bytes, byte offset of the data): readers range-read rows without parsing the header."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    data = buf.getvalue()
    return data, len(data) - arr.nbytes


# ---- one part (runs in a worker process) -----------------------------------------------------------

@dataclass(frozen=True)
class PartSpec:
    """Everything a worker process needs for one part; plain data (pickled to the process)."""

    index: int
    names: tuple[str, ...]
    source: ImageSource            # names of the whole source are not needed: ``names`` is this part's
    dst: str
    resolution: int
    upscale_small: bool
    storage: Storage

    @property
    def record_name(self) -> str:
        return f"parts/p{self.index:05d}.json"

    def write(self, rel: str, data: bytes) -> None:
        """One object under the destination (atomic: a PUT on object stores, temp file + rename locally)."""
        self.storage.write_bytes(join(self.dst, rel), data)

    def read(self, rel: str) -> bytes:
        return self.storage.read_bytes(join(self.dst, rel))

    def digest(self) -> str:
        """Identity of the part's work: a record with another digest (other files, resolution) is stale."""
        key = json.dumps([VERSION, self.source.url, self.resolution, self.upscale_small, list(self.names)])
        return hashlib.sha256(key.encode()).hexdigest()


_progress_queue: Any = None     # where run_part reports image counts for the bar (set per process)


def _init_worker(q: Any) -> None:
    global _progress_queue
    _progress_queue = q


def _tick(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


class _ShardWriter:
    """Buffers one resolution's images of a part and writes a shard whenever the buffer is full."""

    def __init__(self, spec: PartSpec, resolution: int):
        self.spec, self.res = spec, resolution
        self.per_shard = images_per_shard(resolution, len(spec.names))
        self.buf: list[np.ndarray] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, img: np.ndarray) -> None:       # [3, res, res]
        self.buf.append(img)
        if len(self.buf) == self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        arr = np.stack(self.buf)                   # [n, 3, res, res]
        data, offset = npy_bytes(arr)
        name = shard_name(self.res, self.spec.index, len(self.shards))
        self.spec.write(name, data)
        self.shards.append({"path": name, "count": len(self.buf), "offset": offset, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        self.buf = []


def _verified(spec: PartSpec, record: dict[str, Any]) -> bool:
    """A finished part is kept only if its record matches this plan and every shard hashes as recorded."""
    if record.get("digest") != spec.digest():
        return False
    if sorted(record.get("shards", {})) != sorted(str(r) for r in levels(spec.resolution)):
        return False
    for shards in record["shards"].values():
        for s in shards:
            try:
                data = spec.read(s["path"])
            except FileNotFoundError:
                return False
            if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
                return False
    return True


def run_part(spec: PartSpec) -> tuple[dict[str, Any], bool]:
    """Build (or verify and keep) one part. Returns (part record, reused)."""
    try:
        record = json.loads(spec.read(spec.record_name))
    except (FileNotFoundError, ValueError):
        record = None
    if record is not None and _verified(spec, record):
        _tick(len(spec.names))
        return record, True

    writers = {r: _ShardWriter(spec, r) for r in levels(spec.resolution)}
    bad: list[dict[str, str]] = []
    kept: list[str] = []                            # file of each stored image, in shard order
    upscaled: list[str] = []
    reader = spec.source.reader(spec.storage)
    done = 0
    try:
        for name, data in reader.read(list(spec.names)):
            try:
                if isinstance(data, BadImage):
                    raise data
                top, size = decode_square(data, spec.resolution, spec.upscale_small)     # [3, R, R]
            except BadImage as e:
                bad.append({"file": name, "reason": str(e)})
            else:
                kept.append(name)
                if min(size) < spec.resolution:
                    upscaled.append(name)
                for r, img in box_pyramid(top).items():
                    writers[r].add(img)
            done += 1
            if done % 8 == 0:
                _tick(8)
        _tick(done % 8)
        for w in writers.values():
            w.flush()
    finally:
        reader.close()
    record = {
        "part": spec.index, "digest": spec.digest(), "resolution": spec.resolution,
        "files": len(spec.names), "count": len(spec.names) - len(bad),
        "shards": {str(r): w.shards for r, w in writers.items()},
        "images": kept, "bad": bad, "upscaled": upscaled,
    }
    spec.write(spec.record_name, json.dumps(record).encode())   # after the shards: a record means "part complete"
    return record, False


# ---- the whole dataset --------------------------------------------------------------------------------

@dataclass
class PrepareResult:
    """What `prepare` did: the manifest written (or found) and counts for the summary."""

    url: str
    manifest: dict[str, Any]
    parts_built: int = 0
    parts_reused: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    files_processed: int = 0        # source files of the parts built now (reused parts excluded)

    @property
    def images_per_second(self) -> float:
        return self.files_processed / self.seconds if self.seconds > 0 else 0.0


def read_manifest(url: str, storage: Storage) -> dict[str, Any] | None:
    """The manifest of a prepared dataset at ``url``, or None if there is none (not prepared, or unfinished)."""
    murl = join(normalize(url), MANIFEST)
    try:
        m = json.loads(storage.read_bytes(murl))
    except (FileNotFoundError, ValueError):
        return None
    if m.get("format") != FORMAT:
        raise UserError(f"{murl}: not a pggan prepared-dataset manifest")
    if m.get("version") != VERSION:
        raise UserError(f"{murl}: dataset format version {m.get('version')} is not supported "
                        f"(this code reads version {VERSION}); re-run prepare into a new destination")
    return m


def prepare_dataset(src: str, dst: str, storage: Storage, resolution: int, *, upscale_small: bool = False,
                    max_bad_fraction: float = 0.01, workers: int = 0, progress: bool = True) -> PrepareResult:
    """Prepare ``src`` (folder or .zip of images) into a multi-resolution dataset at ``dst``.

    Checks the destination is writable (bucket, credentials) and lists the source before any work.
    ``workers``: processes (0 = one per CPU; 1 = in this process). Idempotent: a complete destination
    for the same source and resolution is returned as is; an interrupted one is continued.
    """
    t0 = time.monotonic()
    resolution = check_resolution(resolution, "--resolution")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction {max_bad_fraction} must be in [0, 1]")
    src, dst = normalize(src), normalize(dst)
    storage.check_writable(dst)                            # missing bucket / credentials: before any work

    existing = read_manifest(dst, storage)
    if existing is not None:
        if (existing["source"], existing["resolution"], existing["upscale_small"]) == (src, resolution, upscale_small):
            return PrepareResult(dst, existing, already_complete=True, seconds=time.monotonic() - t0)
        raise UserError(f"{dst} already holds a dataset prepared from {existing['source']} at "
                        f"{existing['resolution']}x{existing['resolution']} (upscale_small="
                        f"{existing['upscale_small']}); choose another destination or delete it")

    source = list_source(src, storage)
    order = np.random.default_rng(ORDER_SEED).permutation(len(source.names))
    names = [source.names[i] for i in order]
    psize = part_size(len(names))
    light = ImageSource(source.url, source.kind, (), source.ignored)   # parts carry only their own names
    specs = [PartSpec(k, tuple(names[s:s + psize]), light, dst, resolution, upscale_small, storage)
             for k, s in enumerate(range(0, len(names), psize))]

    records, reused = _run_parts(specs, workers, progress, len(names), max_bad_fraction)

    bad = [b for r in records for b in r["bad"]]
    _check_bad(bad, len(names), max_bad_fraction)
    num_images = sum(r["count"] for r in records)
    if num_images == 0:
        raise UserError(f"source {src}: none of the {len(names)} images could be used")
    manifest = {
        "format": FORMAT, "version": VERSION,
        "source": src, "resolution": resolution, "resolutions": levels(resolution),
        "num_images": num_images, "num_files": len(names), "ignored_files": source.ignored,
        "layout": "uint8 [n, 3, res, res] RGB in .npy shards; 'offset' is the byte offset of the data",
        "transform": "EXIF orientation, RGB (alpha over white), center square crop, PIL Lanczos to the top "
                     "resolution; lower resolutions by 2x2 box averaging of the float32 image, np.rint per level",
        "upscale_small": upscale_small, "order_seed": ORDER_SEED, "part_size": psize,
        "shards": {str(r): [s for rec in records for s in rec["shards"][str(r)]]
                   for r in levels(resolution)},
        "bad_files": bad, "upscaled_files": [n for r in records for n in r["upscaled"]],
        "created_unix": round(time.time(), 3),
    }
    storage.write_json(join(dst, MANIFEST), manifest)     # last: from now on the dataset is complete
    built_files = sum(len(s.names) for s, was_reused in zip(specs, reused) if not was_reused)
    return PrepareResult(dst, manifest, parts_built=len(specs) - sum(reused), parts_reused=sum(reused),
                         seconds=time.monotonic() - t0, files_processed=built_files)


def _check_bad(bad: list[dict[str, str]], total: int, max_bad_fraction: float, final: bool = True) -> None:
    if len(bad) <= max_bad_fraction * total:
        return
    small = [b for b in bad if b["reason"].startswith("too small")]
    other = [b for b in bad if not b["reason"].startswith("too small")]
    kinds = []
    if other:
        kinds.append(f"{len(other)} unreadable (e.g. {other[0]['file']}: {other[0]['reason']})")
    if small:
        kinds.append(f"{len(small)} too small (e.g. {small[0]['file']}: {small[0]['reason']})")
    so_far = "" if final else " so far"
    raise UserError(f"{len(bad)} of {total} source files{so_far} are unusable, more than max_bad_fraction="
                    f"{max_bad_fraction:g}: {'; '.join(kinds)}. Fix or remove them, or raise --max-bad-fraction "
                    "(data.max_bad_fraction); finished parts are kept and a re-run continues")


def _run_parts(specs: list[PartSpec], workers: int, progress: bool, total: int,
               max_bad_fraction: float) -> tuple[list[dict[str, Any]], list[bool]]:
    """Run every part (in processes when workers != 1); (records, reused flags), both in part order."""
    from tqdm import tqdm

    workers = (os.cpu_count() or 1) if workers <= 0 else workers
    workers = max(1, min(workers, len(specs)))
    records: list[dict[str, Any] | None] = [None] * len(specs)
    reused = [False] * len(specs)
    bad_count = 0
    # On a terminal the bar redraws every second; in logs (Ray jobs, CI) a line every 30 s is plenty.
    bar = tqdm(total=total, unit="img", desc="prepare", file=sys.stderr, disable=not progress, smoothing=0.1,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def finish(k: int, result: tuple[dict[str, Any], bool]) -> None:
        nonlocal bad_count
        records[k], reused[k] = result
        bad_count += len(result[0]["bad"])
        if bad_count > max_bad_fraction * total:   # cannot end well: stop now, finished parts stay for a re-run
            _check_bad([b for r in records if r for b in r["bad"]], total, max_bad_fraction, final=False)

    try:
        if workers == 1:
            global _progress_queue
            _progress_queue = _BarSink(bar)
            try:
                for spec in specs:
                    try:
                        finish(spec.index, run_part(spec))
                    except (OSError, StorageUnavailable) as e:
                        raise _stopped(spec, e, sum(r is not None for r in records)) from None
            finally:
                _progress_queue = None
        else:
            ctx = multiprocessing.get_context("spawn")    # no fork: s3fs/moto threads live in this process
            q = ctx.Queue()
            stop = threading.Event()
            pump = threading.Thread(target=_pump, args=(q, bar, stop), daemon=True)
            pump.start()
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q,))
            try:
                futures: dict[Future, PartSpec] = {pool.submit(run_part, s): s for s in specs}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        spec = futures[f]
                        try:
                            finish(spec.index, f.result())
                        except (OSError, StorageUnavailable) as e:
                            raise _stopped(spec, e, sum(r is not None for r in records)) from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                stop.set()
                pump.join()
    finally:
        bar.close()
    return [r for r in records if r is not None], reused


def _stopped(spec: PartSpec, e: BaseException, finished: int) -> UserError:
    why = str(e) if isinstance(e, StorageUnavailable) else explain_storage_error(spec.dst, e)
    return UserError(f"prepare stopped in part {spec.index}: {why}. {finished} finished part(s) are kept; "
                     "re-run the same command to continue")


class _BarSink:
    """In-process stand-in for the progress queue: updates the bar directly."""

    def __init__(self, bar: Any):
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _pump(q: Any, bar: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            bar.update(q.get(timeout=0.2))
        except queue.Empty:
            continue
        except (EOFError, OSError):
            return


# ---- command line -------------------------------------------------------------------------------------

def cli_prepare(args: argparse.Namespace) -> int:
    """`launch.py prepare SRC DST --resolution R [--upscale-small] [--max-bad-fraction F] [--workers N]`."""
    storage = Storage(endpoint_url=args.endpoint_url)
    res = prepare_dataset(args.src, args.dst, storage, args.resolution, upscale_small=args.upscale_small,
                          max_bad_fraction=args.max_bad_fraction, workers=args.workers)
    m = res.manifest
    if res.already_complete:
        print(f"{res.url}: already prepared ({m['num_images']} images, {m['resolutions'][0]}..{m['resolution']})")
        return 0
    bad = m["bad_files"]
    print(f"prepared {m['num_images']} images from {m['num_files']} files of {m['source']} into {res.url}")
    print(f"  resolutions {', '.join(map(str, m['resolutions']))}; "
          f"{sum(len(v) for v in m['shards'].values())} shards; "
          f"parts built {res.parts_built}, reused {res.parts_reused}; "
          f"{res.seconds:.1f} s ({res.images_per_second:.1f} images/s)")
    if m["ignored_files"]:
        print(f"  ignored {m['ignored_files']} non-image files")
    if m["upscaled_files"]:
        print(f"  upscaled {len(m['upscaled_files'])} small images")
    if bad:
        print(f"  skipped {len(bad)} unusable files (listed in manifest.json), e.g.:")
        for b in bad[:5]:
            print(f"    {b['file']}: {b['reason']}")
    return 0
