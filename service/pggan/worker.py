"""The per-worker loop over the stages of one Ray Train run (one TorchTrainer.fit), on every data-parallel rank.

Sections (each a call): setup -> restore the newest verified checkpoint (whichever stage it belongs to) ->
[baseline] -> per stage: [fetch data, train step, counters, tick: report + checkpoint] -> stage-end evaluation
(every rank its share) -> next stage. Every rank runs the same number of steps and reports the same number of
times (report is a barrier); only rank 0 writes checkpoints, grids and snapshots and prints progress. The image
count comes from the checkpoint, so a restarted worker group (max_failures) continues at the exact position.

Reports (plain dicts, see :mod:`pggan.records`): ``tick`` every metrics tick (the last tick of a stage carries
``stage_done``), ``stage_end`` with the evaluation record, ``baseline`` with the untrained generator's SWD.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray.train  # 1. Ray Train: context, report
import torch

from .checkpoint import load_checkpoint_at, load_latest, prune, save_checkpoint
from .config import RunConfig, from_json
from .schedule import Stage, lr_at, stages, total_nimg
from .stage_eval import StageEvaluator, evaluated
from .storage import Storage, StorageUnavailable


# Steps between checks for a preemption notice. ray.train.get_preemption_info() is a barrier (rank 0's view,
# broadcast), so every rank asks at the same steps; ranks step in lockstep (gradients are all-reduced), so a step
# count agrees where a clock would not. 32 steps are well under a second at low resolutions and a few seconds at
# 1024x1024, against notices of 30-120 s (GCP, AWS); every tick checks too.
PREEMPTION_CHECK_STEPS = 32
# After a notice, how long past the reclaim deadline a rank whose collective failed waits for Ray Train to tear
# the group down (Ray's own wait where a notice has no deadline is 120 s).
PREEMPTION_HOLD_GRACE_S = 30.0
PREEMPTION_HOLD_NO_DEADLINE_S = 120.0


def run_job(cfg: RunConfig, run_url: str, data_url: str) -> dict[str, Any]:
    """The train_loop_config of one fit: plain JSON-able data (config is re-validated on arrival)."""
    return {"config": cfg.to_json(), "run_url": run_url, "data_url": data_url}


@dataclass
class _Tick:
    start_time: float = field(default_factory=time.perf_counter)
    start_nimg: int = 0
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, stats: dict[str, Any]) -> None:
        """Sum a step's statistics; values may be device tensors (no host synchronisation until means())."""
        self.steps += 1
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}


class _CheckpointWriter:
    """Rank 0 writes checkpoints in a background thread so training goes on during (slow or retried) uploads.
    At most one write is in flight; the next checkpoint (or the stage end) waits for it."""

    def __init__(self, storage: Storage, run_url: str, keep: int):
        self.storage, self.run_url, self.keep = storage, run_url, keep
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.results: list[dict[str, Any]] = []
        self.retries = 0
        self.last_nimg = -1  # the newest checkpoint submitted by this worker group

    def submit(self, nimg: int, state: dict[str, Any], meta: dict[str, Any], reason: str = "interval") -> None:
        self.wait()
        self.last_nimg = nimg
        self._thread = threading.Thread(target=self._write, args=(nimg, state, meta, reason), daemon=True,
                                        name=f"ckpt-{nimg}")
        self._thread.start()

    def _write(self, nimg: int, state: dict[str, Any], meta: dict[str, Any], reason: str) -> None:
        t0 = time.perf_counter()

        def on_retry(attempt: int, e: BaseException) -> None:
            self.retries += 1
            print(f"checkpoint at {nimg / 1000:.1f} kimg: storage error ({type(e).__name__}), retry {attempt}",
                  flush=True)

        try:
            url, size = save_checkpoint(self.storage, self.run_url, nimg, state, meta, on_retry=on_retry)
            prune(self.storage, self.run_url, self.keep, protect=nimg)
            self.results.append({"nimg": nimg, "ok": True, "seconds": time.perf_counter() - t0, "bytes": size,
                                 "time": time.time(), "reason": reason})
        except BaseException as e:  # noqa: BLE001 - surfaced to the training loop by wait()
            self.results.append({"nimg": nimg, "ok": False, "seconds": time.perf_counter() - t0, "time": time.time()})
            self.error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def drain_results(self) -> list[dict[str, Any]]:
        out, self.results = self.results, []
        return out


def _cpu_state(trainer: Any) -> dict[str, Any]:
    """A detached CPU copy of the trainer state, safe to serialize while training continues."""

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", copy=True)
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    return copy(trainer.state_dict())


def _setup_device(cfg: RunConfig) -> torch.device:
    if cfg.cluster.use_gpu and torch.cuda.is_available():
        local = ray.train.get_context().get_local_rank()  # 2. Ray Train: local rank picks the GPU
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    return torch.device("cpu")


def _undo_ray_niceness() -> None:
    """Ray starts its worker processes at a lower CPU priority (nice 15) than its own system processes; the
    training loop then yields the CPU to every Ray daemon tick, which costs far more than the step at small
    resolutions. Back to the priority the node started with where the OS allows it (it does not for non-root)."""
    import os

    try:
        current = os.nice(0)
        if current > 0:
            os.nice(-current)
    except OSError:
        pass


def _quiet_ray_train_loggers() -> None:
    """No INFO line per report ("Reporting training result ..."): Ray Train v2 logs it from a logger named by
    its source file's path, not by module, so the "ray.train" logger's level does not reach it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name in list(logging.Logger.manager.loggerDict):
        if "ray/train" in name.replace("\\", "/"):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_run(job: dict[str, Any]) -> None:
    """Ray Train entry point: train from the newest checkpoint through every remaining stage."""
    _quiet_ray_train_loggers()
    _undo_ray_niceness()
    run: _WorkerRun | None = None
    try:
        run = _WorkerRun(job)
        run.run()
    except StorageUnavailable as e:
        # Past the retry budget. Ray logs the error with its traceback on every rank: without the storage client's
        # chain of connection errors (a hundred lines) the message still says what, how often and the last error.
        raise StorageUnavailable(str(e)) from None
    except RuntimeError as e:  # gloo and NCCL report a vanished peer as RuntimeError (DistBackendError)
        if run is not None:
            run.hold_error_through_preemption(e)
        raise


def _preemption_info() -> Any:
    """Ray Train's preemption notice for this worker group (rank 0's view, on every rank), or None."""
    try:
        return ray.train.get_preemption_info()  # 5. Ray Train: a barrier across ranks
    except (AttributeError, NotImplementedError):  # a Ray without it, or the in-process mode of unit tests
        return None


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (num_workers=0 tests)
        return ""


class _WorkerRun:
    """One rank's view of one fit: restore, then per stage: loop over steps, tick (report + checkpoint), evaluate."""

    def __init__(self, job: dict[str, Any]):
        from .data import open_dataset

        self.cfg = cfg = from_json(job["config"])  # validated again on arrival
        self.stages = stages(cfg)
        self.run_url: str = job["run_url"]
        ctx = ray.train.get_context()  # 3. Ray Train: rank and world size
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.is_main = self.rank == 0
        self.device = _setup_device(cfg)
        self.storage = Storage.from_config(cfg.storage)
        self.total = total_nimg(cfg)
        # The synthetic set is one fixed dataset (generator seed 0), like a real one: run.seed only shuffles it.
        self.dataset = open_dataset(job["data_url"], self.storage, cfg.data.resolution or cfg.model.max_resolution,
                                    synthetic_images=cfg.data.synthetic_images)
        self.evaluator = StageEvaluator(cfg, self.storage, self.run_url, self.dataset, job["data_url"], self.device)
        self.writer = _CheckpointWriter(self.storage, self.run_url, cfg.checkpoint.keep) if self.is_main else None
        self.node_id = _node_id()
        self._loader: Any = None
        self.rolled_back = False
        self.stage: Stage = self.stages[0]
        self.tick = _Tick()
        self.times: dict[str, float] = {}
        self.group_start_nimg = 0
        self.group_first_step_time: float | None = None  # this worker group's first training step (recovery time)
        self.steps = 0  # training steps of this worker group: the same on every rank
        self.preemption: Any = None  # Ray's PreemptionInfo once a notice came
        self.restored_from = "scratch"

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ---- the fit --------------------------------------------------------------------------------------
    def run(self) -> None:
        from .training import GanTrainer

        # Same initial weights on every rank (seeded); gradients are all-reduced once per backward.
        self.trainer = GanTrainer.from_config(self.cfg, device=self.device)
        self.group_start_time = time.time()
        self.restore(self.total)
        self.group_start_nimg = self.nimg
        if self.nimg == 0 and self.cfg.metrics.swd_images and evaluated(self.storage, self.run_url, "baseline") is None:
            self.report(event="baseline", record=self.evaluator.baseline(self.trainer.G_ema))
        ready = time.time()
        for st in self.stages:
            if self.nimg < st.end:
                if not self.train_stage(st, ready):
                    return  # fatal: reported to the driver, which fails the run
            if evaluated(self.storage, self.run_url, st.name, st.end) is None:
                self.evaluate(st)
            ready = time.time()
        if self.writer is not None:
            self.writer.wait()

    def restore(self, max_nimg: int) -> None:
        """Trainer state from the newest complete checkpoint up to max_nimg (or the fresh one)."""
        ck = load_latest(self.storage, self.run_url, max_nimg=max_nimg, log=self.log)
        self.nimg = 0
        if ck is not None:
            self.trainer.load_state_dict(ck.state["trainer"])
            self.nimg = ck.nimg
        self.restored_from = ck.url.rsplit("/", 1)[-1] if ck is not None else "scratch"

    # ---- one stage ------------------------------------------------------------------------------------
    def train_stage(self, st: Stage, ready: float) -> bool:
        """Train stage st from self.nimg to its end. Returns False on a fatal error (already reported)."""
        cfg = self.cfg
        self.stage = st
        self.times = {"ready": ready}
        self.start_stage()
        tick_nimg = cfg.metrics.tick_nimg(st.resolution)
        ckpt_nimg = max(round(cfg.checkpoint.every_kimg * 1000), 1)
        while self.nimg < st.end:
            before = self.nimg
            self.train_one_step()
            if "first_step" not in self.times:
                self.times["first_step"] = time.time()
                if self.group_first_step_time is None:
                    self.group_first_step_time = self.times["first_step"]
            at_end = self.nimg >= st.end
            due_ckpt = at_end or self.nimg // ckpt_nimg > before // ckpt_nimg
            due_tick = at_end or due_ckpt or self.nimg // tick_nimg > before // tick_nimg
            if due_tick and self.nonfinite_in_row() >= cfg.optim.max_nonfinite_in_row:
                if not self.handle_nonfinite():
                    return False
                continue
            if due_tick:
                self.end_tick(checkpoint=due_ckpt, at_end=at_end)
            elif self.steps % PREEMPTION_CHECK_STEPS == 0:
                self.check_preemption()
        self.times["trained"] = time.time()
        return True

    def start_stage(self) -> None:
        st = self.stage
        if self.nimg < st.start:
            raise RuntimeError(f"stage {st.name} starts at {st.start} images but the latest complete checkpoint "
                               f"is at {self.nimg}: the previous stage did not finish")
        mid_stage = st.start < self.nimg < st.end
        if not mid_stage:
            self.trainer.reset_optimizers(st.lr)  # the paper resets Adam at every stage change
        self.log(f"[{st.name}] {'resuming' if mid_stage else 'starting'} at {self.nimg / 1000:.1f} kimg "
                 f"(stage {st.start / 1000:.1f}..{st.end / 1000:.1f} kimg, {self.world} worker(s), "
                 f"{self.device.type}) from {self.restored_from}")
        self.restored_from = "the previous stage"
        if self._loader is not None:
            self._loader.close()  # the previous stage's (or a rollback's) prefetch thread
        self._loader = self.dataset.loader(
            st.resolution, rank=self.rank, world_size=self.world, batch_size=st.minibatch // self.world,
            seed=self.cfg.run.seed * 1000 + st.index, mirror=self.cfg.data.mirror,
            start_batch=(self.nimg - st.start) // st.minibatch)
        self.loader = iter(self._loader)
        self.tick = _Tick(start_nimg=self.nimg)
        self._in_row = 0

    def train_one_step(self) -> None:
        st = self.stage
        reals = next(self.loader).to(self.device, non_blocking=True)  # [per_worker, 3, R, R] in [-1, 1]
        self.trainer.set_lr(lr_at(self.nimg, st, self.cfg.schedule.lr_rampup_kimg))
        stats = self.trainer.train_step(reals, st.resolution, st.alpha(self.nimg), self.nimg, st.minibatch)
        self.nimg += st.minibatch
        self.steps += 1
        self.tick.add(stats)
        nf = stats.get("nonfinite", 0.0)
        if not isinstance(nf, torch.Tensor):  # a host value: count here; device values are read at ticks
            self._in_row = self._in_row + 1 if nf else 0

    def nonfinite_in_row(self) -> int:
        """Consecutive non-finite steps so far (all ranks agree: gradients are all-reduced before the check)."""
        counted = getattr(self.trainer, "nonfinite_in_row", None)
        return int(counted) if counted is not None else self._in_row

    def handle_nonfinite(self) -> bool:
        """Roll the stage back to its last checkpoint once; the second time, report a fatal error.
        Returns False when the run must end."""
        st, n = self.stage, self.nonfinite_in_row()
        if self.rolled_back:
            msg = (f"stage {st.name}: losses were non-finite for {n} steps in a row at {self.nimg / 1000:.1f} kimg, "
                   f"again after rolling back once; lower the learning rate (schedule.lr_base / schedule.lr_dict, "
                   f"now {st.lr:g})")
            self.log(f"[{st.name}] {msg}")
            self.report(fatal=msg, fatal_kind="nonfinite")
            return False
        self.log(f"[{st.name}] {n} non-finite steps in a row at {self.nimg / 1000:.1f} kimg: rolling back to the "
                 "last checkpoint (once)")
        if self.writer is not None:
            self.writer.wait()  # the checkpoint every rank is about to load must be complete
        self.report(event="rollback")  # a barrier: no rank loads before rank 0's write has landed
        self.rolled_back = True
        self.restore(st.end)
        self.start_stage()
        return True

    def evaluate(self, st: Stage) -> None:
        """Stage-end evaluation on every rank; G_ema must be the stage's final one."""
        t0 = time.time()
        G = self.trainer.G_ema
        if self.nimg != st.end:  # a stage trained by an earlier group whose evaluation never finished
            from .stage_eval import g_ema_from_state

            G = g_ema_from_state(self.cfg, load_checkpoint_at(self.storage, self.run_url, st.end).state["trainer"])
            G = G.to(self.device)
        record = self.evaluator.stage_end(G, st, last=st is self.stages[-1])
        if self.writer is not None:
            self.writer.wait()  # the stage's final checkpoint is committed before the driver hears of the end
        times = self.times if self.stage is st else {}
        record["times"] = {**times, "eval_start": t0, "evaluated": time.time()}
        record["nodes"] = [self.node_id]
        self.report(event="stage_end", record=record)

    # ---- maintenance per tick: checkpoint (rank 0), then one report from every rank ---------------
    def end_tick(self, checkpoint: bool, at_end: bool) -> None:
        st = self.stage
        if checkpoint:
            self.checkpoint()
        if not at_end:
            self.check_preemption()
        m = self.report(stage_done=at_end)
        self.log(f"[{st.name}] res {st.resolution:>4} alpha {m['alpha']:.3f} "
                 f"kimg {self.nimg / 1000:8.1f}/{self.total / 1000:.1f} img/s {m['img_per_s']:7.1f} "
                 f"loss G {m['loss_G']:+.3f} D {m['loss_D']:+.3f} gp {m['gp']:.3f}")
        self.tick = _Tick(start_nimg=self.nimg)

    def checkpoint(self, reason: str = "interval") -> None:
        """Rank 0 hands a CPU copy of the training state to the background writer; training goes on."""
        if self.writer is None or self.writer.last_nimg == self.nimg:
            return
        st = self.stage
        self.writer.submit(self.nimg, {"trainer": _cpu_state(self.trainer), "nimg": self.nimg, "stage_index": st.index},
                           {"stage_index": st.index, "stage": st.name, "resolution": st.resolution,
                            "fingerprint": self.cfg.model_fingerprint(), "run": self.cfg.run.name},
                           reason=reason)

    # ---- spot preemption: a just-in-time checkpoint at the notice, then train on until the node goes --------
    def check_preemption(self) -> None:
        """Every rank, at the same steps. At the first notice of this worker group rank 0 writes a checkpoint at
        once, so a restart loses at most the images after the notice; training goes on until the node goes (Ray
        Train then restarts the group, charging FailureConfig.max_preemption_failures, not max_failures)."""
        if self.preemption is not None:
            return  # one notice (and one just-in-time checkpoint) per worker group
        info = _preemption_info()
        if info is None:
            return
        self.preemption = info
        left = f", {info.deadline_ms / 1000 - time.time():.0f} s before the deadline" if info.deadline_ms else ""
        nodes = ", ".join(n[:8] for n in info.preempted_node_ids)
        self.log(f"[{self.stage.name}] preemption notice for node(s) {nodes} (ranks {info.preempted_ranks}{left}): "
                 f"just-in-time checkpoint at {self.nimg / 1000:.3f} kimg")
        self.checkpoint(reason="preemption")

    def hold_error_through_preemption(self, error: BaseException) -> None:
        """After a preemption notice, a failed collective is the reclaimed node going: its ranks vanish mid
        all-reduce. Raised at once, Ray Train can see this error before the preempted rank's death or the
        deadline and charge it to max_failures as an ordinary failure (ending a run with none left). Held, the
        group is torn down at the deadline (Ray Train kills this actor) and the restart counts as a preemption.
        Still alive past the deadline plus a grace, the error is raised after all."""
        info = self.preemption
        if info is None:
            return
        now = time.time()
        until = (info.deadline_ms / 1000 if info.deadline_ms else now + PREEMPTION_HOLD_NO_DEADLINE_S)
        until += PREEMPTION_HOLD_GRACE_S
        print(f"[{self.stage.name}] rank {self.rank}: {type(error).__name__} after the preemption notice (the node "
              f"going): waiting up to {max(until - now, 0):.0f} s for Ray Train to restart the worker group",
              flush=True)
        time.sleep(max(until - now, 0))

    def report(self, **extra: Any) -> dict[str, Any]:
        from .records import tick_record

        elapsed = time.perf_counter() - self.tick.start_time
        metrics = tick_record(
            nimg=self.nimg, stage=self.stage, total_nimg=self.total,
            img_per_s=(self.nimg - self.tick.start_nimg) / max(elapsed, 1e-9), means=self.tick.means(),
            nonfinite_total=int(self.trainer.counters.nonfinite_steps),
            checkpoints=self.writer.drain_results() if self.writer is not None else [],
            checkpoint_retries=self.writer.retries if self.writer is not None else 0,
            group_start_nimg=self.group_start_nimg, group_start_time=self.group_start_time, node_id=self.node_id,
            group_first_step_time=self.group_first_step_time, **extra)
        ray.train.report(metrics)  # 4. Ray Train: per-tick report (a barrier: every rank, same count)
        return metrics
