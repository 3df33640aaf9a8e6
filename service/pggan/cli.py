"""Command line: parse -> validate -> build -> run. User errors are one clear message and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .config import ConfigError, load_config
from .errors import UserError

SUBCOMMANDS = ("train", "sweep", "prepare", "generate", "evaluate", "status", "report", "bench")
EXIT_USAGE = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (may name a preset it starts from)")
    p.add_argument("--preset", metavar="NAME", help="built-in preset: demo (default), paper, paper-8gpu")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set schedule.lr_base=0.002 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved, validated config as JSON and exit")


def _run_args(p: argparse.ArgumentParser) -> None:
    """A run named by its URL, or by the config that made it (storage.url / run.name)."""
    p.add_argument("source", nargs="?", metavar="RUN_URL", help="run directory: <storage.url>/<run.name>")
    p.add_argument("--config", metavar="FILE.yaml", help="name the run by its config instead of RUN_URL")
    p.add_argument("--preset", metavar="NAME", help="built-in preset the config starts from")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set run.name=demo (repeatable)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="launch.py",
        description="Progressive Growing of GANs on Ray. With no subcommand: train (the embedded demo by default).")
    sub = top.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    p = sub.add_parser("train", help="train a run (default)")
    _config_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="start over in an existing run directory whose model config differs (moves nothing, "
                        "ignores old checkpoints)")
    p.add_argument("--address", help="Ray address (default: the RAY_ADDRESS env, else a local in-process Ray)")

    p = sub.add_parser("sweep", help="Ray Tune sweep over the config's sweep.search_space")
    _config_args(p)
    p.add_argument("--address", help="Ray address")

    p = sub.add_parser("prepare", help="build the multi-resolution dataset from images")
    p.add_argument("src", help="folder or .zip of images at any fsspec URL")
    p.add_argument("dst", help="destination URL of the prepared dataset")
    p.add_argument("--resolution", type=int, required=True, help="highest resolution (power of two)")
    p.add_argument("--upscale-small", action="store_true", help="upscale images below the resolution")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail if more of the files are unreadable")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (0 = one per CPU)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs")

    p = sub.add_parser("generate", help="sample images from a run or snapshot")
    p.add_argument("source", help="run directory URL or snapshot file")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--out", default="grid.png", help="output PNG (a grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                   help="instead of a grid of samples, rows of STEPS latent interpolations")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs")

    p = sub.add_parser("evaluate", help="SWD / MS-SSIM of a snapshot, or of two image sets")
    p.add_argument("source", nargs="?", help="run directory URL or snapshot file")
    p.add_argument("--reals", help="real images: dataset URL, folder or 'synthetic:shapes'")
    p.add_argument("--fakes", help="generated images: folder (instead of a snapshot)")
    p.add_argument("--metrics", default="swd,msssim", help="comma list of swd, msssim")
    p.add_argument("--images", type=int, default=16384, help="images per set for SWD (pairs for MS-SSIM)")
    p.add_argument("--resolution", type=int, help="resolution to evaluate at (default: the snapshot's)")
    p.add_argument("--out", help="write the metrics JSON here (default: beside the snapshot, or stdout only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs")

    p = sub.add_parser("status", help="where a run is: phase, progress, ETA, checkpoints, SWD so far")
    _run_args(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    p.add_argument("--watch", action="store_true", help="refresh until the run ends (or Ctrl-C)")
    p.add_argument("--every", type=float, default=10.0, metavar="SECONDS", help="--watch refresh interval")

    p = sub.add_parser("report", help="one self-contained HTML report (curves, every stage's grid) and a PNG")
    _run_args(p)
    p.add_argument("--out", default="report.html",
                   help="HTML file or URL to write; the PNG goes beside it (.png) (default: report.html)")

    p = sub.add_parser("bench", help="benchmarks; results as JSON lines")
    p.add_argument("what", choices=["step", "data", "swd", "checkpoint"], help="what to benchmark")
    p.add_argument("--resolution", type=int, action="append", help="resolution (repeatable)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fmap-base", type=int, default=8192)
    p.add_argument("--fmap-max", type=int, default=512)
    p.add_argument("--latent-size", type=int, default=512)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=["bf16", "none"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-fused", action="store_true", help="unfused up/down convolutions (for comparison)")
    p.add_argument("--loss", default="wgan-gp", choices=["wgan-gp", "lsgan"])
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--images", type=int, default=1024, help="images (data, swd)")
    p.add_argument("--source", default="synthetic:shapes", help="dataset for bench data")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    # Step-benchmark levers, each off what the trainer does by default (to measure its effect).
    p.add_argument("--grad-fakes", action="store_true", help="step: build G's graph for the D step's fakes")
    p.add_argument("--no-freeze-d", action="store_true", help="step: compute D's weight grads in the G step")
    p.add_argument("--two-d-passes", action="store_true", help="step: score reals and fakes in two D passes, not one")
    p.add_argument("--no-fused-adam", action="store_true", help="step: foreach Adam instead of fused")
    p.add_argument("--host-sync", action="store_true",
                   help="step: skip non-finite steps by a host-side check instead of the device flag")
    p.add_argument("--scale-mode", default="operand", choices=["operand", "output"],
                   help="step: equalized-lr scale on the weight/input (operand) or on the output activations")
    p.add_argument("--no-flops", action="store_true", help="step: skip the FLOP count")
    return top


def _normalize_argv(argv: list[str]) -> list[str]:
    """Train is the default subcommand: `launch.py --dry-run` means `launch.py train --dry-run`."""
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["train", *argv]


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.preset, args.sets)
    if args.dry_run:
        print(json.dumps(cfg.to_json(), indent=2))
        return 0
    from .driver import run_training  # imports ray

    return run_training(cfg, address=args.address, fresh=args.fresh)


def _cmd_sweep(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.preset, args.sets)
    if args.dry_run:
        print(json.dumps(cfg.to_json(), indent=2))
        return 0
    from .sweep import run_sweep  # imports ray

    return run_sweep(cfg, address=args.address)


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """The handler in pggan.<module>, imported when the subcommand runs (train and sweep import Ray)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"pggan.{module}"), func)(args)

    return run


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _cmd_train,
    "sweep": _cmd_sweep,
    "prepare": _lazy("data.prepare", "cli_prepare"),
    "generate": _lazy("generate", "cli_generate"),
    "evaluate": _lazy("metrics.evaluate", "cli_evaluate"),
    "status": _lazy("status", "cli_status"),
    "report": _lazy("report", "cli_report"),
    "bench": _lazy("bench", "cli_bench"),
}


def main(argv: list[str] | None = None) -> int:
    argv = _normalize_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except ConfigError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
