"""The driver: a state machine over the run's phases, fed by the workers' reports, resumable from storage.

pending -> training k -> evaluating k -> training k+1 -> ... -> completed (or failed / stopped).
One Ray Train run (TorchTrainer.fit, :mod:`pggan.session`) trains every remaining stage; each worker report
reaches the driver through the telemetry hub, and :class:`StageMachine` turns the ones that matter into
transitions, each persisted in run_state.json. The run directory (``<storage.url>/<run.name>/``) holds
everything a new driver needs to continue. The driver stays small: state, metric relay, small records.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import ray  # 1. Ray core: the hub actor's methods

from .checkpoint.store import FINAL_SNAPSHOT, load_latest
from .config import RunConfig, from_json
from .errors import UserError
from .history import append_records, read_records
from .hub import call, get_hub
from .records import history_tick, stage_seconds
from .run_state import RunState
from .schedule import Stage, stages, total_nimg
from .session import Stopped, init_ray, install_stop_handlers, make_trainer, node_id, run_fit
from .stage_eval import EVAL_DIR, evaluated, swd_table
from .storage import Storage, StorageUnavailable, join, normalize

__all__ = ["run_training", "run_url_of", "init_ray", "RunFailed", "StageMachine"]


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
        for old_records in (EVAL_DIR, "history", "metrics.jsonl", "swd_floor"):  # evaluations of the old run
            if storage.exists(join(run_url, old_records)):
                storage.rm(join(run_url, old_records), recursive=True)
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


# ---- the state machine -------------------------------------------------------------------------------

class RunFailed(Exception):
    """The run cannot go on; ``message`` says why and what to do."""

    def __init__(self, message: str, stage: Stage | None = None):
        super().__init__(message)
        self.message, self.stage = message, stage


class StageMachine:
    """The run's phases as the workers' reports arrive. One short method per transition; each persists
    run_state.json and tells the exporter. Tick records are kept for the metric history and written at every
    stage end (one history object per stage)."""

    def __init__(self, cfg: RunConfig, storage: Storage, run_url: str, state: RunState, hub: Any,
                 trial: str | None, on_stage_end: Callable[[dict[str, Any]], None] | None = None):
        self.cfg, self.storage, self.run_url, self.state, self.hub, self.trial = cfg, storage, run_url, state, hub, trial
        self.stages = stages(cfg)
        self.on_stage_end = on_stage_end
        self.ticks: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}
        self.fatal: str | None = None
        self.storage_failed = False  # the run ended because storage stayed unavailable
        self.fit_start: float | None = None
        self.prev_restarts = state.worker_restarts
        self.prev_preemptions = state.preemptions
        self.bar: Any = None

    # ---- transitions ----------------------------------------------------------------------------------
    def _set(self, to: str, stage: Stage | None = None, note: str = "", nimg: int | None = None) -> None:
        self.state.transition(to, stage_index=stage.index if stage else None, stage=stage.name if stage else None,
                              nimg=self.state.nimg if nimg is None else nimg, note=note)
        self.state.worker_restarts = self.prev_restarts + call(self.hub, "get_restarts", self.cfg.run.name, self.trial)
        self.state.preemptions = self.prev_preemptions + call(self.hub, "get_preemptions", self.cfg.run.name,
                                                              self.trial)
        self.state.nonfinite_steps = max(self.state.nonfinite_steps, int(self.latest.get("nonfinite_total", 0)))
        self.state.save(self.storage, self.run_url)
        call(self.hub, "set_state", self.cfg.run.name, self.trial, to)  # awaited: the exporter shows it at once

    def begin_training(self, st: Stage, nimg: int) -> None:
        self._set("training", st, nimg=nimg)
        say(f"stage {st.index + 1}/{len(self.stages)} {st.name}: {st.resolution}x{st.resolution} {st.kind}, "
            f"{st.start / 1000:.1f}..{st.end / 1000:.1f} kimg, minibatch {st.minibatch}, lr {st.lr:g}")

    def begin_evaluating(self, st: Stage) -> None:
        self._set("evaluating", st, nimg=st.end)

    def stage_evaluated(self, record: dict[str, Any]) -> None:
        st = self.stages[record["stage_index"]]
        record = {**record, "seconds": stage_seconds(record, self.fit_start)}
        self.fit_start = None  # later stages of this fit start when the previous one's evaluation ends
        append_records(self.storage, self.run_url, [*self.ticks, record])
        self.ticks = []
        sec = record["seconds"]
        say(f"stage {st.name} done: " + ", ".join(f"{k} {v:.1f} s" for k, v in sec.items())
            + (f"; SWD x1e3 avg {record['swd']['avg']:.2f} ("
               + ", ".join(f"{k}: {v:.2f}" for k, v in record["swd"]["swd_x1e3"].items()) + ")"
               if record.get("swd") else ""))
        if self.on_stage_end is not None:
            self.on_stage_end(record)
        nxt = st.index + 1
        if nxt < len(self.stages):
            self.begin_training(self.stages[nxt], st.end)

    def complete(self, seconds: float) -> None:
        self._set("completed", self.stages[-1], note=f"completed in {seconds:.0f} s", nimg=self.stages[-1].end)

    def fail(self, message: str, stage: Stage | None) -> None:
        self.flush()
        self._set("failed", stage, note=message)

    def stop(self) -> None:
        self._set("stopped", None, note="stopped on request; start the same command again to resume")
        self.flush()  # after the state: `ray job stop` allows a few seconds before its SIGKILL

    def flush(self) -> None:
        """Write the tick records not yet in the history (at the end of a driver life)."""
        append_records(self.storage, self.run_url, self.ticks)
        self.ticks = []

    # ---- reports --------------------------------------------------------------------------------------
    def poll(self) -> None:
        for rep in call(self.hub, "drain", self.cfg.run.name, self.trial):
            self.on_report(rep)

    def on_report(self, rep: dict[str, Any]) -> None:
        event = rep.get("event", "tick")
        if rep.get("fatal"):
            self.fatal = rep["fatal"]
        if event == "tick":
            self.latest = rep
            self.state.nimg = rep["nimg"]
            self.ticks.append(history_tick(rep))
            if self.bar is not None:
                self.bar.update(rep)
            if self.state.state != "training" or self.state.stage_index != rep["stage_index"]:
                self.begin_training(self.stages[rep["stage_index"]], rep["nimg"])  # a resumed group's first tick
            if rep.get("stage_done"):
                self.begin_evaluating(self.stages[rep["stage_index"]])
        elif event == "stage_end":
            if self.state.state != "evaluating":
                self.begin_evaluating(self.stages[rep["record"]["stage_index"]])
            self.stage_evaluated(rep["record"])
        elif event == "baseline":
            append_records(self.storage, self.run_url, [rep["record"]])
            say(f"untrained generator: SWD x1e3 avg {rep['record']['swd']['avg']:.2f} "
                f"at {rep['record']['resolution']}x{rep['record']['resolution']}")


# ---- the run -------------------------------------------------------------------------------------------

def run_training(cfg: RunConfig, address: str | None = None, fresh: bool = False, trial: str | None = None,
                 report: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Train (or resume) the run described by cfg. Returns a process exit code."""
    storage = Storage.from_config(cfg.storage)
    run_url = run_url_of(cfg)
    state, nimg = _open_run(cfg, storage, run_url, fresh)
    if state.state == "completed":
        return 0
    init_ray(cfg, address)
    hub = get_hub(cfg.metrics.host, cfg.metrics.port)
    port = ray.get(hub.get_port.remote())
    if port:
        say(f"Prometheus metrics on port {port} (/metrics)")
    stop = install_stop_handlers()
    state.lives[-1]["node_id"] = node_id()  # where the driver (and the exporter) ran
    machine = StageMachine(cfg, storage, run_url, state, hub, trial, on_stage_end=report)
    call(hub, "set_images_seen", cfg.run.name, trial, nimg)
    try:
        code = _train(cfg, storage, run_url, machine, nimg, stop)
    except UserError as e:  # a bad dataset found while preparing it: exported and alerted like any failure
        _best_effort(lambda: machine.fail(str(e), None))
        linger(cfg, port)
        raise
    if not machine.storage_failed:  # with storage down the report cannot be written either
        _best_effort(lambda: say(f"report: {_write_report(storage, run_url)}"), "the training report")
    linger(cfg, port)
    return code


def _open_run(cfg: RunConfig, storage: Storage, run_url: str, fresh: bool) -> tuple[RunState, int]:
    """Check the run directory, register this driver life, and see where the run stands. A run already
    complete is recorded as such (its state then reads completed)."""
    storage.check_writable(run_url)  # missing bucket / credentials: one clear error before any work
    check_run_dir(cfg, storage, run_url, fresh)
    all_stages, total = stages(cfg), total_nimg(cfg)
    state = RunState.load(storage, run_url)
    state.new_life()
    state.total_nimg = total
    nimg = _verified_nimg(storage, run_url)
    _reconcile_history(storage, run_url, all_stages)
    state.nimg = nimg
    if nimg >= total and evaluated(storage, run_url, all_stages[-1].name, all_stages[-1].end) \
            and storage.exists(join(run_url, FINAL_SNAPSHOT)):
        state.transition("completed", note="already complete: nothing to train")
        say(f"run {cfg.run.name} is already complete at {nimg / 1000:.1f} kimg; nothing to train "
            f"(raise schedule.total_kimg to train longer)")
    state.save(storage, run_url)
    return state, nimg


def _train(cfg: RunConfig, storage: Storage, run_url: str, machine: StageMachine, nimg: int, stop: Any) -> int:
    """Prepare the data, run one fit over every remaining stage, and end the run in its final state."""
    all_stages, total = machine.stages, total_nimg(cfg)
    if sys.stderr.isatty() and machine.trial is None:
        machine.bar = _ProgressBar(total, nimg)
    t_run = time.perf_counter()
    try:
        data_url = prepare_data(cfg, storage, run_url)
        say(f"run {cfg.run.name}: {len(all_stages)} stages to {cfg.model.max_resolution}x"
            f"{cfg.model.max_resolution}, {total / 1000:.1f} kimg; run directory {run_url}"
            + (f"; resuming at {nimg / 1000:.1f} kimg" if nimg else ""))
        first = next(st for st in all_stages if nimg < st.end or not evaluated(storage, run_url, st.name, st.end))
        if nimg < first.end:
            machine.begin_training(first, nimg)
        else:
            machine.begin_evaluating(first)
        machine.fit_start = time.time()
        trainer = make_trainer(cfg, run_url, data_url, machine.hub, machine.trial,
                               name=f"{cfg.run.name}-{machine.state.life}")
        try:
            run_fit(trainer, poll=machine.poll)
        except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; classified by type
            if stop.is_set():
                raise Stopped() from None
            raise RunFailed(_failure_message(e, machine), _stage_of(machine)) from None
        if stop.is_set():
            raise Stopped()
        _check_complete(storage, run_url, all_stages, machine)
        machine.complete(time.perf_counter() - t_run)
        if machine.bar is not None:
            machine.bar.close()
            machine.bar = None
        say(f"run {cfg.run.name} completed at {total / 1000:.1f} kimg; final generator: "
            f"{join(run_url, FINAL_SNAPSHOT)}")
        print(swd_table(read_records(storage, run_url)), flush=True)
        return 0
    except KeyboardInterrupt:  # Stopped, or the KeyboardInterrupt ray.get raises for it
        _best_effort(machine.stop)
        say("stopped; start the same command again to resume from the last checkpoint")
        return 130
    except RunFailed as e:
        _best_effort(lambda: machine.fail(e.message, e.stage))
        print(f"error: {e.message}", file=sys.stderr, flush=True)
        return 1
    except StorageUnavailable as e:
        machine.storage_failed = True
        msg = (f"storage unavailable: {e}. The run stopped; nothing half-written counts as a checkpoint. Run the "
               "same command again when storage is back to resume from the last complete checkpoint")
        _best_effort(lambda: machine.fail(msg, None))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 1
    finally:
        if machine.bar is not None:
            machine.bar.close()


def _write_report(storage: Storage, run_url: str) -> str:
    from .report import write_run_report

    return write_run_report(storage, run_url)


def _stage_of(machine: StageMachine) -> Stage | None:
    i = machine.state.stage_index
    return machine.stages[i] if i is not None else None


def _check_complete(storage: Storage, run_url: str, all_stages: list[Stage], machine: StageMachine) -> None:
    """After a fit that ended without an error: every stage trained and evaluated, or the worker's fatal error."""
    machine.poll()
    if machine.fatal:
        raise RunFailed(machine.fatal, _stage_of(machine))
    missing = [st.name for st in all_stages if not evaluated(storage, run_url, st.name, st.end)]
    if missing or not storage.exists(join(run_url, FINAL_SNAPSHOT)):
        raise RunFailed(f"the workers ended with stages {', '.join(missing) or '(none)'} not evaluated and "
                        f"no final generator; see the job's log", _stage_of(machine))


def _failure_message(e: BaseException, machine: StageMachine) -> str:
    """A plain message for a failed fit, from the failure's type: Ray Train wraps what a worker raised
    (WorkerGroupError.worker_failures) or what stopped the controller (ControllerError.controller_failure)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    from .hub import WorkersUnplaceable

    st = _stage_of(machine)
    where = f"stage {st.name} failed" if st else "the run failed"
    # Ray raises the timeout itself where no retry is left; RestartWatch turns a retried one into WorkersUnplaceable.
    if isinstance(e, ControllerError) and isinstance(e.controller_failure,
                                                     (WorkerGroupStartupTimeoutError, WorkersUnplaceable)):
        return (f"{where}: the cluster could not place {machine.cfg.cluster.num_workers} worker(s) within "
                f"cluster.start_timeout_s ({machine.cfg.cluster.start_timeout_s:g} s): ask for fewer workers "
                f"(cluster.num_workers), fewer CPUs/GPUs per worker, or a bigger cluster")
    root = _root_error(e)
    if _is_storage_failure(root):
        machine.storage_failed = True
        return (f"{where}: {str(root).strip().splitlines()[-1] if str(root).strip() else 'storage unavailable'}; "
                "storage stayed unavailable past storage.retry_max_wait_s. Nothing half-written counts as a "
                "checkpoint: run the same command again when storage is back")
    text = str(root).strip()
    return f"{where}: {type(root).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


def _root_error(e: BaseException) -> BaseException:
    """What a worker raised (WorkerGroupError.worker_failures) or stopped the controller, to its first cause."""
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    roots = list(e.worker_failures.values()) if isinstance(e, WorkerGroupError) else \
        [e.controller_failure] if isinstance(e, ControllerError) else [e]
    root = roots[0] if roots else e
    while getattr(root, "__cause__", None) is not None:
        root = root.__cause__
    return root


def _is_storage_failure(root: BaseException) -> bool:
    # The worker's StorageUnavailable arrives as Ray's dual-inheritance copy of it: a subclass, or the same name.
    return isinstance(root, StorageUnavailable) or type(root).__name__ == "StorageUnavailable"


def _reconcile_history(storage: Storage, run_url: str, all_stages: list[Stage]) -> None:
    """Evaluation records that a previous driver did not get to write into the history (it died between the
    workers' commit and its own write) are added from their markers."""
    if not storage.exists(join(run_url, EVAL_DIR)):
        return
    have = {(r.get("event"), r.get("stage"), r.get("nimg")) for r in read_records(storage, run_url)}
    missing = []
    if not any(h[0] == "baseline" for h in have) and (rec := evaluated(storage, run_url, "baseline")):
        missing.append(rec)
    for st in all_stages:
        rec = evaluated(storage, run_url, st.name)
        if rec and ("stage_end", st.name, rec.get("nimg")) not in have:
            missing.append(rec)
    append_records(storage, run_url, missing)


def linger(cfg: RunConfig, port: int | None) -> None:
    """Keep the exporter up a little after the run ends, so Prometheus scrapes its final state."""
    if not port or not cfg.metrics.linger_s:
        return
    say(f"metrics stay up for {cfg.metrics.linger_s:g} s (metrics.linger_s) so Prometheus sees the final state")
    try:
        time.sleep(cfg.metrics.linger_s)
    except KeyboardInterrupt:
        pass


class _ProgressBar:
    """A local progress bar over the whole run (kimg), fed from the reports the driver drains; terminals only."""

    def __init__(self, total: int, nimg: int):
        from tqdm import tqdm

        self.bar = tqdm(total=round(total / 1000, 1), initial=round(nimg / 1000, 1), unit="kimg", leave=False,
                        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}]")

    def update(self, tick: dict[str, Any]) -> None:
        self.bar.n = round(tick["nimg"] / 1000, 1)
        self.bar.set_description(f"{tick.get('stage', '')} a={tick.get('alpha', 1):.2f}")
        self.bar.refresh()

    def close(self) -> None:
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
