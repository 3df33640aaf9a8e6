"""`launch.py bench WHAT`: each benchmark lives beside the code it measures and prints JSON lines."""

from __future__ import annotations

import argparse
import importlib

_BENCHES = {
    "step": ("pggan.training.bench", "bench_step"),
    "data": ("pggan.data.bench", "bench_data"),
    "swd": ("pggan.metrics.bench", "bench_swd"),
    "checkpoint": ("pggan.checkpoint.bench", "bench_checkpoint"),
}


def cli_bench(args: argparse.Namespace) -> int:
    module, func = _BENCHES[args.what]
    return getattr(importlib.import_module(module), func)(args)
