"""The driver: a state machine that walks the stages, one Ray Train run per stage, resumable from storage.

pending -> training k -> evaluating k -> training k+1 -> ... -> completed (or failed / stopped).
The run directory (``<storage.url>/<run.name>/``) holds everything a new driver needs to continue:
config.json, run_state.json, checkpoints, snapshots, sample grids, metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

import ray  # 1. Ray core: init / shutdown
import ray.train  # 2. Ray Train: ScalingConfig, RunConfig, FailureConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .checkpoint import latest_nimg, save_snapshot
from .checkpoint.store import FINAL_SNAPSHOT, load_checkpoint_at, load_latest
from .config import RunConfig, from_json
from .errors import UserError
from .hub import ReportRelay, get_hub
from .run_state import RunState
from .schedule import Stage, stages, total_nimg
from .stage_eval import (append_metrics, evaluate_stage, g_ema_from_state, read_metrics, swd_table,
                         untrained_baseline)
from .storage import Storage, StorageUnavailable, join, normalize
from .worker import stage_job, train_stage


class Stopped(KeyboardInterrupt):
    """The driver was asked to stop (SIGTERM from `ray job stop`, or Ctrl-C). Not an Exception, so that no
    `except Exception` inside Ray's fit() swallows it; a KeyboardInterrupt because a blocking ray.get (the driver
    waits in one for the whole stage) runs signal handlers but turns only KeyboardInterrupt into an error in the
    waiting thread (it raises a plain KeyboardInterrupt then) and drops any other exception a handler raises."""


def run_url_of(cfg: RunConfig) -> str:
    return join(normalize(cfg.storage.url), cfg.run.name)


def say(msg: str) -> None:
    print(f"[pggan] {msg}", flush=True)


# ---- run directory checks -----------------------------------------------------------------------

def check_run_dir(cfg: RunConfig, storage: Storage, run_url: str, fresh: bool) -> None:
    """Refuse a run directory made by a different model config (unless fresh); record the config."""
    url = join(run_url, "config.json")
    if storage.exists(url):
        try:
            old = from_json(storage.read_json(url))
        except Exception as e:  # noqa: BLE001 - an unreadable record is the user's to resolve
            raise UserError(f"{url} is unreadable ({e}); fix or remove it, or use another run.name") from None
        if old.model_fingerprint() != cfg.model_fingerprint() and not fresh:
            diffs = [f"{k}: {old.model_fingerprint()['model'].get(k)} -> {v}"
                     for k, v in cfg.model_fingerprint()["model"].items()
                     if old.model_fingerprint()["model"].get(k) != v]
            if old.schedule.start_resolution != cfg.schedule.start_resolution:
                diffs.append(f"schedule.start_resolution: {old.schedule.start_resolution} -> "
                             f"{cfg.schedule.start_resolution}")
            raise UserError(f"run directory {run_url} holds a run with a different model config "
                            f"({'; '.join(diffs)}); use another run.name, or pass --fresh to start over there")
    if fresh and storage.exists(url):
        from .checkpoint import list_checkpoints, prune

        if list_checkpoints(storage, run_url):
            say("--fresh: removing the old checkpoints and run state of this run directory")
            prune(storage, run_url, keep=1)
            storage.rm(join(run_url, "checkpoints"), recursive=True)
        storage.rm(join(run_url, "run_state.json"))
    storage.write_json(url, cfg.to_json())


def prepare_data(cfg: RunConfig, storage: Storage, run_url: str) -> str:
    """Make sure the training data is ready (folders/zips are prepared once, here); returns the URL workers use."""
    from .data import open_dataset

    src = cfg.data.source
    if src.startswith("synthetic:"):
        return src
    cache = cfg.data.cache_url or join(run_url, "data")
    ds = open_dataset(normalize(src) if "://" not in src else src, storage,
                      cfg.data.resolution or cfg.model.max_resolution, cache_url=cache,
                      max_bad_fraction=cfg.data.max_bad_fraction, upscale_small=cfg.data.upscale_small,
                      seed=cfg.run.seed)
    if ds.max_resolution < cfg.model.max_resolution:
        raise UserError(f"data.source {src}: prepared at {ds.max_resolution}x{ds.max_resolution}, below "
                        f"model.max_resolution {cfg.model.max_resolution}; prepare it at a higher --resolution")
    return getattr(ds, "url", src)


# ---- Ray -------------------------------------------------------------------------------------------

def init_ray(cfg: RunConfig, address: str | None) -> None:
    if ray.is_initialized():
        return
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(cfg.cluster.start_timeout_s),
           # report() waits for the controller's poll (default every 2 s); ticks of a few seconds need less.
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
           # Ray Train tees print() into its logger, which doubles every progress line on the console.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    os.environ.update(env)  # a local cluster started here inherits it
    runtime_env: dict[str, Any] = {"env_vars": env}
    if not _installed():
        # Running from a checkout (`ray job submit --working-dir .`): ship the package to every worker.
        import pggan

        runtime_env["py_modules"] = [os.path.dirname(pggan.__file__)]
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "://" not in address and ":" in address:
        # Ray Train's placement-group cleaner (a detached actor) finds the state API from RAY_ADDRESS, else by
        # guessing from local processes, which fails where several clusters share a machine: its monitor thread
        # dies and the actor stays alive after a stopped or killed run.
        runtime_env["env_vars"] = {**env, "RAY_ADDRESS": address}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": a new cluster in-process, also where `ray start` left one on this machine (Ray would
        # connect to that one otherwise). The dashboard serves the state API Ray Train's placement-group cleaner
        # polls; a free port, since another cluster may hold 8265.
        # Ctrl-C goes to the terminal's whole process group: the local Ray processes started here would die
        # with it, and the driver's Ray client exits the process at once when its raylet is gone, before the
        # run can be marked stopped. They start with SIGINT ignored (inherited); the driver keeps its handler.
        with _sigint_ignored():
            ray.init(address="local", runtime_env=runtime_env, dashboard_port=_free_port(), log_to_driver=True,
                     logging_level="WARNING", configure_logging=True)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("pggan-ray")
        return True
    except metadata.PackageNotFoundError:
        return False


def fit_stage(cfg: RunConfig, stage: Stage, run_url: str, data_url: str, hub: Any, trial: str | None) -> None:
    """One TorchTrainer.fit for one stage; raises ray.train.TrainingFailedError on failure."""
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **c.resources_per_worker}
    if c.use_gpu:
        resources["GPU"] = 1
    ray_storage = join(run_url, "ray") if "://" not in run_url else os.path.join(
        os.path.expanduser("~"), "ray_results", "pggan", cfg.run.name)
    trainer = TorchTrainer(
        train_stage,
        train_loop_config=stage_job(cfg, stage.index, run_url, data_url),
        scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{cfg.run.name}-{stage.name}",
            storage_path=ray_storage,
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures, controller_failure_limit=0),
            callbacks=[ReportRelay(hub, cfg.run.name, trial)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # no per-report INFO lines
        ),
    )
    _fit(trainer)


def _fit(trainer: TorchTrainer) -> None:
    """trainer.fit(), blocking until the stage ends (worker restarts happen inside).

    From the main thread, fit runs in a helper thread: in the main thread Ray Train installs its own SIGINT
    handler, which aborts the run and exits the process (sys.exit(0)) before the driver can mark it stopped.
    The main thread waits in short joins, so the driver's SIGINT/SIGTERM handlers run at once (they raise
    Stopped here); the abandoned fit ends with the process, whose Ray actors die with their owner."""
    if threading.current_thread() is not threading.main_thread():
        trainer.fit()  # 3. Ray Train (in a Tune trial's thread: no handler of its own)
        return
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            trainer.fit()  # 3. Ray Train
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    t = threading.Thread(target=target, name="pggan-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.5)
    if "error" in outcome:
        raise outcome["error"]


# ---- the state machine -------------------------------------------------------------------------------

def run_training(cfg: RunConfig, address: str | None = None, fresh: bool = False, trial: str | None = None,
                 report: Any = None) -> int:
    """Train (or resume) the run described by cfg. Returns a process exit code."""
    storage = Storage.from_config(cfg.storage)
    run_url = run_url_of(cfg)
    storage.check_writable(run_url)  # missing bucket / credentials: one clear error before any work
    check_run_dir(cfg, storage, run_url, fresh)
    all_stages = stages(cfg)
    total = total_nimg(cfg)

    state = RunState.load(storage, run_url)
    state.new_life()
    state.total_nimg = total
    nimg = _verified_nimg(storage, run_url)
    evaluated = {r["stage_index"]: r["nimg"] for r in read_metrics(storage, run_url) if r.get("event") == "stage_end"}
    if nimg >= total and evaluated.get(all_stages[-1].index) == all_stages[-1].end \
            and storage.exists(join(run_url, FINAL_SNAPSHOT)):
        state.nimg = nimg
        state.transition("completed", note="already complete: nothing to train")
        state.save(storage, run_url)
        say(f"run {cfg.run.name} is already complete at {nimg / 1000:.1f} kimg; nothing to train "
            f"(raise schedule.total_kimg to train longer)")
        return 0
    state.save(storage, run_url)

    data_url = prepare_data(cfg, storage, run_url)
    init_ray(cfg, address)
    hub = get_hub(cfg.metrics.host, cfg.metrics.port)
    port = ray.get(hub.get_port.remote())
    if port:
        say(f"Prometheus metrics on port {port} (/metrics)")
    stop = _install_stop_handlers()
    say(f"run {cfg.run.name}: {len(all_stages)} stages to {cfg.model.max_resolution}x{cfg.model.max_resolution}, "
        f"{total / 1000:.1f} kimg; run directory {run_url}; resuming at {nimg / 1000:.1f} kimg" if nimg else
        f"run {cfg.run.name}: {len(all_stages)} stages to {cfg.model.max_resolution}x{cfg.model.max_resolution}, "
        f"{total / 1000:.1f} kimg; run directory {run_url}")

    def set_state(to: str, stage: Stage | None = None, note: str = "") -> None:
        state.transition(to, stage_index=stage.index if stage else None, stage=stage.name if stage else None,
                         nimg=nimg, note=note)
        state.worker_restarts = ray.get(hub.get_restarts.remote(cfg.run.name, trial)) + _prev_restarts
        last_tick = ray.get(hub.get_latest.remote(cfg.run.name, trial)) or {}
        state.nonfinite_steps = max(state.nonfinite_steps, int(last_tick.get("nonfinite_total", 0)))
        state.save(storage, run_url)
        hub.set_state.remote(cfg.run.name, trial, to)

    _prev_restarts = state.worker_restarts

    def save_ticks() -> None:
        """The stage's tick records (buffered in the hub) into the metric history, also when it failed."""
        append_metrics(storage, run_url, ray.get(hub.drain_ticks.remote(cfg.run.name, trial)))
    hub.set_images_seen.remote(cfg.run.name, trial, nimg)
    bar = _ProgressBar(hub, cfg.run.name, trial, total, nimg) if sys.stderr.isatty() and trial is None else None
    t_run = time.perf_counter()
    try:
        if nimg == 0 and "baseline" not in {r.get("event") for r in read_metrics(storage, run_url)} \
                and cfg.metrics.swd_images:
            append_metrics(storage, run_url, [untrained_baseline(cfg, storage, data_url)])
        for stage in all_stages:
            if stop.is_set():
                raise Stopped()
            if nimg < stage.end:
                set_state("training", stage)
                say(f"stage {stage.index + 1}/{len(all_stages)} {stage.name}: {stage.resolution}x{stage.resolution} "
                    f"{stage.kind}, {stage.start / 1000:.1f}..{stage.end / 1000:.1f} kimg, minibatch "
                    f"{stage.minibatch}, lr {stage.lr:g}")
                t0 = time.perf_counter()
                try:
                    fit_stage(cfg, stage, run_url, data_url, hub, trial)
                except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; report them plainly
                    if stop.is_set():
                        raise Stopped() from None
                    raise _StageFailed(stage, e) from None
                save_ticks()
                nimg = latest_nimg(storage, run_url)
                if nimg < stage.end:
                    last = ray.get(hub.get_latest.remote(cfg.run.name, trial)) or {}
                    raise _StageFailed(stage, RuntimeError(
                        last.get("fatal") or f"stage ended at {nimg} images, expected {stage.end}"))
                say(f"stage {stage.name} trained in {time.perf_counter() - t0:.1f} s")
            if evaluated.get(stage.index) != stage.end:
                set_state("evaluating", stage)
                record = evaluate_stage(cfg, storage, run_url, stage, data_url)
                append_metrics(storage, run_url, [record])
                evaluated[stage.index] = stage.end
                if "swd" in record:
                    hub.on_swd.remote(cfg.run.name, trial, record["swd"]["swd_x1e3"], record["swd"]["avg"])
                    say(f"stage {stage.name}: SWD x1e3 avg {record['swd']['avg']:.2f} "
                        f"({', '.join(f'{k}: {v:.2f}' for k, v in record['swd']['swd_x1e3'].items())})")
                if report is not None:
                    report(record)
        _export_final(cfg, storage, run_url, all_stages[-1])
        set_state("completed", all_stages[-1], note=f"completed in {time.perf_counter() - t_run:.0f} s")
        say(f"run {cfg.run.name} completed at {nimg / 1000:.1f} kimg; final generator: "
            f"{join(run_url, FINAL_SNAPSHOT)}")
        if bar is not None:
            bar.close()
            bar = None
        print(swd_table(read_metrics(storage, run_url)), flush=True)
        return 0
    except KeyboardInterrupt:  # Stopped, or the KeyboardInterrupt ray.get raises for it
        _best_effort(lambda: set_state("stopped", None, note="stopped on request; start the same command again "
                                                             "to resume"))
        # The ticks after the state: `ray job stop` allows a few seconds before its SIGKILL.
        _best_effort(save_ticks, "the metric history")
        say("stopped; start the same command again to resume from the last checkpoint")
        return 130
    except _StageFailed as e:
        # The failing stage's ticks (non-finite counts, checkpoint retries) are history too.
        _best_effort(save_ticks, "the metric history")
        _best_effort(lambda: set_state("failed", e.stage, note=e.message))
        print(f"error: {e.message}", file=sys.stderr, flush=True)
        return 1
    except StorageUnavailable as e:
        msg = (f"storage unavailable: {e}. The run stopped; nothing half-written counts as a checkpoint. Run the "
               "same command again when storage is back to resume from the last complete checkpoint")
        _best_effort(lambda: set_state("failed", None, note=msg))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 1
    finally:
        if bar is not None:
            bar.close()


class _StageFailed(Exception):
    def __init__(self, stage: Stage, cause: BaseException):
        self.stage = stage
        root = cause
        while getattr(root, "__cause__", None) is not None:
            root = root.__cause__
        text = str(root).strip()
        detail = text.splitlines()[-1] if text else type(root).__name__
        if "StorageUnavailable" in type(root).__name__ or "gave up after" in text:
            detail += ("; storage stayed unavailable past storage.retry_max_wait_s. Nothing half-written counts as "
                       "a checkpoint: run the same command again when storage is back")
        elif "WorkerGroupStartupTimeout" in type(root).__name__ or "start" in text.lower() and "timeout" in text.lower():
            # Ray's message goes on to suggest its own environment variable: keep its first sentence only.
            detail = detail.split(". ")[0].rstrip(".") + (
                "; the cluster could not place the workers within cluster.start_timeout_s: ask for fewer "
                "workers (cluster.num_workers), fewer CPUs/GPUs per worker, or a bigger cluster")
        elif not text.startswith("stage "):
            detail = f"{type(root).__name__}: {detail}"
        self.message = detail if detail.startswith("stage ") else f"stage {stage.name} failed: {detail}"
        super().__init__(self.message)


class _ProgressBar:
    """A local progress bar over the whole run (kimg), fed from the hub's latest report; terminals only."""

    def __init__(self, hub: Any, run: str, trial: str | None, total: int, nimg: int):
        from tqdm import tqdm

        self.bar = tqdm(total=round(total / 1000, 1), initial=round(nimg / 1000, 1), unit="kimg", leave=False,
                        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(hub, run, trial), daemon=True)
        self.thread.start()

    def _poll(self, hub: Any, run: str, trial: str | None) -> None:
        while not self.done.wait(1.0):
            try:
                latest = ray.get(hub.get_latest.remote(run, trial), timeout=5) or {}
            except Exception:  # noqa: BLE001 - the bar is cosmetic
                continue
            if "nimg" in latest:
                self.bar.n = round(latest["nimg"] / 1000, 1)
                self.bar.set_description(f"{latest.get('stage', '')} a={latest.get('alpha', 1):.2f}")
                self.bar.refresh()

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.bar.close()


def _verified_nimg(storage: Storage, run_url: str) -> int:
    """Image count of the newest checkpoint that verifies and loads safely, falling back past truncated, deleted
    or unsafe ones and saying so: the stage loop and the stage-end evaluation never trust a broken one."""
    ck = load_latest(storage, run_url, log=say)
    return ck.nimg if ck is not None else 0


def _best_effort(fn: Any, what: str = "the run state") -> None:
    """Record a final state if storage lets us; the exit code and message carry it otherwise."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not record {what} ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr,
              flush=True)


def _export_final(cfg: RunConfig, storage: Storage, run_url: str, last: Stage) -> None:
    ck = load_checkpoint_at(storage, run_url, last.end)
    G = g_ema_from_state(cfg, ck.state["trainer"])
    save_snapshot(storage, join(run_url, FINAL_SNAPSHOT), G.state_dict(), cfg.model.model_dump(mode="json"),
                  last.resolution, last.end, extra={"run": cfg.run.name, "config": cfg.to_json()})


def _install_stop_handlers() -> threading.Event:
    """SIGTERM (ray job stop, Kubernetes) and SIGINT mark the run stopped instead of failed."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return stop

    def handler(signum: int, frame: Any) -> None:
        stop.set()
        raise Stopped()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
