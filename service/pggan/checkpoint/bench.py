"""`launch.py bench checkpoint`: checkpoint save time vs a plain s3fs upload of the same bytes.

Without --source pointing at an S3 URL this starts moto's S3 server on 127.0.0.1 (a real HTTP endpoint) and
measures there; pass an s3:// URL (and --endpoint-url via AWS_ENDPOINT_URL) to measure a real store.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from ..config import load_config
from ..storage import Storage, join
from .store import save_checkpoint, serialize


def _state(args: argparse.Namespace) -> dict[str, Any]:
    from ..training import GanTrainer

    res = (args.resolution or [32])[0]
    cfg = load_config(preset="demo", sets=[f"model.max_resolution={res}", f"model.fmap_base={args.fmap_base}",
                                           f"model.fmap_max={args.fmap_max}", f"model.latent_size={args.latent_size}"])
    return {"trainer": GanTrainer.from_config(cfg).state_dict()}


def bench_checkpoint(args: argparse.Namespace) -> int:
    server = None
    url = args.source if args.source.startswith("s3://") else None
    if url is None:
        import logging
        import os

        import s3fs
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
        s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).mkdir("bench")
        url = "s3://bench/run"
    try:
        storage = Storage()
        state = _state(args)
        data = serialize(state)
        fs, path = storage.fs(join(url, "plain.bin"))
        ours, plain, ser = [], [], []
        for i in range(max(args.steps, 1)):
            t0 = time.perf_counter()
            serialize(state)
            ser.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            save_checkpoint(storage, url, 1000 * (i + 1), state, {"bench": True})
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fs.pipe_file(f"{path}-{i}", data)
            plain.append(time.perf_counter() - t0)
        print(json.dumps({"bench": "checkpoint", "bytes": len(data), "url": url.split("/")[0] + "//...",
                          "save_checkpoint_s": statistics.median(ours), "serialize_s": statistics.median(ser),
                          "plain_s3fs_pipe_s": statistics.median(plain),
                          "overhead_vs_plain": statistics.median(ours) / max(statistics.median(plain), 1e-9),
                          "runs": len(ours)}), flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0
