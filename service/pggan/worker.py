"""The per-worker loop for one stage, run by Ray Train's TorchTrainer on every data-parallel rank.

Sections (each a call): setup -> restore -> [fetch data, train step, counters, tick: report + checkpoint] -> finish.
Every rank runs the same number of steps and reports the same number of times (report is a barrier);
only rank 0 writes checkpoints and prints progress. The image count comes from the checkpoint, so a
restarted worker group (max_failures) continues at the exact position.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray.train  # 1. Ray Train: context, report
import torch

from .checkpoint import load_latest, prune, save_checkpoint
from .config import RunConfig, from_json
from .schedule import Stage, lr_at, stages, total_nimg
from .storage import Storage, StorageUnavailable


def stage_job(cfg: RunConfig, stage_index: int, run_url: str, data_url: str) -> dict[str, Any]:
    """The train_loop_config of one stage: plain JSON-able data (config is re-validated on arrival)."""
    return {"config": cfg.to_json(), "stage_index": stage_index, "run_url": run_url, "data_url": data_url}


@dataclass
class _Tick:
    start_time: float = field(default_factory=time.perf_counter)
    start_nimg: int = 0
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, stats: dict[str, float]) -> None:
        self.steps += 1
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


class _CheckpointWriter:
    """Rank 0 writes checkpoints in a background thread so training goes on during (slow or retried) uploads.
    At most one write is in flight; the next checkpoint (or the stage end) waits for it."""

    def __init__(self, storage: Storage, run_url: str, keep: int):
        self.storage, self.run_url, self.keep = storage, run_url, keep
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.results: list[dict[str, Any]] = []
        self.retries = 0

    def submit(self, nimg: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(nimg, state, meta), daemon=True,
                                        name=f"ckpt-{nimg}")
        self._thread.start()

    def _write(self, nimg: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        t0 = time.perf_counter()

        def on_retry(attempt: int, e: BaseException) -> None:
            self.retries += 1
            print(f"checkpoint at {nimg / 1000:.1f} kimg: storage error ({type(e).__name__}), retry {attempt}",
                  flush=True)

        try:
            url, size = save_checkpoint(self.storage, self.run_url, nimg, state, meta, on_retry=on_retry)
            prune(self.storage, self.run_url, self.keep, protect=nimg)
            self.results.append({"nimg": nimg, "ok": True, "seconds": time.perf_counter() - t0, "bytes": size,
                                 "time": time.time()})
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


def _quiet_ray_train_loggers() -> None:
    """No INFO line per report ("Reporting training result ..."): Ray Train v2 logs it from a logger named by
    its source file's path, not by module, so the "ray.train" logger's level does not reach it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name in list(logging.Logger.manager.loggerDict):
        if "ray/train" in name.replace("\\", "/"):
            logging.getLogger(name).setLevel(logging.WARNING)


def train_stage(job: dict[str, Any]) -> None:
    """Ray Train entry point: train stage ``job['stage_index']`` to its end (or resume it)."""
    _quiet_ray_train_loggers()
    try:
        _StageRun(job).run()
    except StorageUnavailable as e:
        # Past the retry budget. Ray logs the error with its traceback on every rank: without the storage client's
        # chain of connection errors (a hundred lines) the message still says what, how often and the last error.
        raise StorageUnavailable(str(e)) from None


class _StageRun:
    """One rank's view of one stage: restore, loop over steps, tick (report + checkpoint), finish."""

    def __init__(self, job: dict[str, Any]):
        from .data import open_dataset

        self.cfg = cfg = from_json(job["config"])  # validated again on arrival
        self.stage: Stage = stages(cfg)[job["stage_index"]]
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
        self.writer = _CheckpointWriter(self.storage, self.run_url, cfg.checkpoint.keep) if self.is_main else None
        self.rolled_back = False

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ---- build and restore ------------------------------------------------------------------------
    def restore(self) -> None:
        """Trainer from the newest complete checkpoint up to the stage end (or fresh), and a loader positioned
        at the exact batch that image count corresponds to."""
        from .training import GanTrainer

        st = self.stage
        # Same initial weights on every rank (seeded); gradients are all-reduced once per backward.
        self.trainer = GanTrainer.from_config(self.cfg, device=self.device)
        ck = load_latest(self.storage, self.run_url, max_nimg=st.end, log=self.log)
        self.nimg = 0
        if ck is not None:
            self.trainer.load_state_dict(ck.state["trainer"])
            self.nimg = ck.nimg
        if self.nimg < st.start:
            raise RuntimeError(f"stage {st.name} starts at {st.start} images but the latest complete checkpoint "
                               f"is at {self.nimg}: the previous stage did not finish")
        mid_stage = st.start < self.nimg < st.end
        if not mid_stage:
            self.trainer.reset_optimizers(st.lr)  # the paper resets Adam at every stage change
        self.log(f"[{st.name}] {'resuming' if mid_stage else 'starting'} at {self.nimg / 1000:.1f} kimg "
                 f"(stage {st.start / 1000:.1f}..{st.end / 1000:.1f} kimg, {self.world} worker(s), "
                 f"{self.device.type}) from {ck.url.rsplit('/', 1)[-1] if ck is not None else 'scratch'}")
        # Where and when this worker group (re)started the stage: every tick carries it, so the metric
        # history shows restarts, the checkpoint each resumed from and the images trained twice.
        self.group_start_nimg, self.group_start_time = self.nimg, time.time()
        if getattr(self, "_loader", None) is not None:
            self._loader.close()  # a rollback: stop the old prefetch thread
        self._loader = self.dataset.loader(
            st.resolution, rank=self.rank, world_size=self.world, batch_size=st.minibatch // self.world,
            seed=self.cfg.run.seed * 1000 + st.index, mirror=self.cfg.data.mirror,
            start_batch=(self.nimg - st.start) // st.minibatch)
        self.loader = iter(self._loader)
        self.tick = _Tick(start_nimg=self.nimg)
        self.nonfinite_in_row = 0

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        st, cfg = self.stage, self.cfg
        self.restore()
        tick_nimg = cfg.metrics.tick_nimg(st.resolution)
        ckpt_nimg = max(round(cfg.checkpoint.every_kimg * 1000), 1)
        while self.nimg < st.end:
            before = self.nimg
            self.train_one_step()
            if self.nonfinite_in_row >= cfg.optim.max_nonfinite_in_row:
                if not self.handle_nonfinite():
                    return  # fatal: reported to the driver, which fails the run
                continue
            at_end = self.nimg >= st.end
            due_ckpt = at_end or self.nimg // ckpt_nimg > before // ckpt_nimg
            if at_end or due_ckpt or self.nimg // tick_nimg > before // tick_nimg:
                self.end_tick(checkpoint=due_ckpt, wait=at_end)
        if self.writer is not None:
            self.writer.wait()

    def train_one_step(self) -> None:
        st = self.stage
        reals = next(self.loader).to(self.device, non_blocking=True)  # [per_worker, 3, R, R] in [-1, 1]
        self.trainer.set_lr(lr_at(self.nimg, st, self.cfg.schedule.lr_rampup_kimg))
        stats = self.trainer.train_step(reals, st.resolution, st.alpha(self.nimg), self.nimg, st.minibatch)
        self.nimg += st.minibatch
        self.tick.add(stats)
        # Gradients are all-reduced before the finiteness check, so every rank agrees on this count.
        self.nonfinite_in_row = self.nonfinite_in_row + 1 if stats.get("nonfinite") else 0

    def handle_nonfinite(self) -> bool:
        """Roll the stage back to its last checkpoint once; the second time, report a fatal error.
        Returns False when the stage must end."""
        st, n = self.stage, self.nonfinite_in_row
        if self.rolled_back:
            msg = (f"stage {st.name}: losses were non-finite for {n} steps in a row at {self.nimg / 1000:.1f} kimg, "
                   f"again after rolling back once; lower the learning rate (schedule.lr_base / schedule.lr_dict, "
                   f"now {st.lr:g})")
            self.log(f"[{st.name}] {msg}")
            self.report(fatal=msg)
            return False
        self.log(f"[{st.name}] {n} non-finite steps in a row at {self.nimg / 1000:.1f} kimg: rolling back to the "
                 "last checkpoint (once)")
        if self.writer is not None:
            self.writer.wait()  # the checkpoint every rank is about to load must be complete
        self.report(event="rollback")  # a barrier: no rank loads before rank 0's write has landed
        self.rolled_back = True
        self.restore()
        return True

    # ---- maintenance per tick: checkpoint (rank 0), then one report from every rank ---------------
    def end_tick(self, checkpoint: bool, wait: bool) -> None:
        st = self.stage
        if checkpoint and self.writer is not None:
            self.writer.submit(self.nimg, {"trainer": _cpu_state(self.trainer), "nimg": self.nimg,
                                           "stage_index": st.index},
                               {"stage_index": st.index, "stage": st.name, "resolution": st.resolution,
                                "fingerprint": self.cfg.model_fingerprint(), "run": self.cfg.run.name})
            if wait:
                self.writer.wait()  # the driver evaluates this checkpoint next
        m = self.report()
        self.log(f"[{st.name}] res {st.resolution:>4} alpha {m['alpha']:.3f} "
                 f"kimg {self.nimg / 1000:8.1f}/{self.total / 1000:.1f} img/s {m['img_per_s']:7.1f} "
                 f"loss G {m['loss_G']:+.3f} D {m['loss_D']:+.3f} gp {m['gp']:.3f}")
        self.tick = _Tick(start_nimg=self.nimg)

    def report(self, **extra: Any) -> dict[str, Any]:
        st = self.stage
        elapsed = time.perf_counter() - self.tick.start_time
        means = self.tick.means()
        metrics = {
            "nimg": self.nimg, "kimg": self.nimg / 1000, "stage_index": st.index, "stage": st.name,
            "resolution": st.resolution, "alpha": st.alpha(self.nimg), "progress": (self.nimg - st.start) / st.nimg,
            "total_nimg": self.total, "img_per_s": (self.nimg - self.tick.start_nimg) / max(elapsed, 1e-9),
            "loss_G": means.get("loss_G", float("nan")), "loss_D": means.get("loss_D", float("nan")),
            "gp": means.get("gp", 0.0), "nonfinite_total": self.trainer.counters.nonfinite_steps,
            "time": time.time(),
            "checkpoints": self.writer.drain_results() if self.writer is not None else [],
            "checkpoint_retries": self.writer.retries if self.writer is not None else 0,
            "group_start_nimg": self.group_start_nimg, "group_start_time": self.group_start_time,
            **extra,
        }
        ray.train.report(metrics)  # 4. Ray Train: per-tick report (a barrier: every rank, same count)
        return metrics
