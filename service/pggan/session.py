"""The driver's Ray session: connecting to (or starting) Ray, the stop signals, and one TorchTrainer.fit run
off the main thread while the caller keeps handling reports and signals."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator

import ray  # 1. Ray core: init
import ray.train  # 2. Ray Train: ScalingConfig, RunConfig, FailureConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .config import RunConfig
from .hub import ReportRelay, RestartWatch
from .storage import join
from .worker import run_job, train_run


class Stopped(KeyboardInterrupt):
    """The driver was asked to stop (SIGTERM from `ray job stop`, or Ctrl-C). Not an Exception, so that no
    `except Exception` inside Ray swallows it; a KeyboardInterrupt because a blocking ray.get runs signal
    handlers but turns only KeyboardInterrupt into an error in the waiting thread."""


def init_ray(cfg: RunConfig, address: str | None) -> None:
    if ray.is_initialized():
        return
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(cfg.cluster.start_timeout_s),
           # report() waits for the controller's poll (default every 2 s); ticks of a few seconds need less.
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
           # Ray Train tees print() into its logger, which doubles every progress line on the console.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           # How soon the controller sees a node's preemption notice (Ray's default 5 s of a 30-120 s notice).
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")}
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


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def install_stop_handlers() -> threading.Event:
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


def make_trainer(cfg: RunConfig, run_url: str, data_url: str, hub: Any, trial: str | None,
                 name: str) -> TorchTrainer:
    """One TorchTrainer for every remaining stage (the worker group persists across stage switches)."""
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **c.resources_per_worker}
    if c.use_gpu:
        resources["GPU"] = 1
    ray_storage = join(run_url, "ray") if "://" not in run_url else os.path.join(
        os.path.expanduser("~"), "ray_results", "pggan", cfg.run.name)
    return TorchTrainer(
        train_run,
        train_loop_config=run_job(cfg, run_url, data_url),
        scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ray_storage,
            # A lost worker or node restarts the group from the newest checkpoint, wherever it happens: up to
            # max_failures times while training or evaluating, as often again while the group starts (a worker
            # lost while placed). A preempted node (a drain notice: spot reclaim) is retried without limit and
            # does not use up max_failures. A group that cannot be placed at all fails after start_timeout_s:
            # RestartWatch makes that timeout final. RestartWatch counts each restart by its cause.
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures,
                                                   controller_failure_limit=c.max_failures,
                                                   max_preemption_failures=-1),
            callbacks=[ReportRelay(hub, cfg.run.name, trial), RestartWatch(hub, cfg.run.name, trial)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # no per-report INFO lines
        ),
    )


def run_fit(trainer: TorchTrainer, poll: Callable[[], None], every_s: float = 0.5) -> None:
    """trainer.fit() in a helper thread; the calling thread calls poll() every every_s seconds until it ends.

    In the main thread Ray Train would install its own SIGINT handler, which aborts the run and exits the process
    (sys.exit(0)) before the driver can mark it stopped; here the driver's handlers run at once (they raise
    Stopped in the polling thread). An abandoned fit ends with the process, whose Ray actors die with it."""
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            trainer.fit()  # 3. Ray Train
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = e

    t = threading.Thread(target=target, name="pggan-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(every_s)
        poll()
    poll()
    if "error" in outcome:
        raise outcome["error"]
