"""Ray Tune sweep: each trial is one whole run (its own run directory) with config overrides.

The search space is config-driven (``sweep.search_space``: dotted key -> sampler) and expanded here, once, into
a fixed list of trials (grid points x ``sweep.num_samples``, random keys drawn from a generator seeded with
``run.seed``): trial ``i`` trains in ``<storage.url>/<run.name>-t<i>/``, so running the same sweep again finds
its trials where they were. A finished trial returns at once ("already complete"), an unfinished one resumes
from its last checkpoint, one the scheduler stopped stays stopped.

Fair comparison: every trial has the same seed, data order and evaluation images (keys that would change them
cannot be swept) and trials are compared on SWD (never on D losses: WGAN-GP's and LSGAN's are on different
scales) at equal kimg. A trial reports to Tune only at stage ends that have SWD (4x4 has none), so every result
carries ``swd_avg``; with ``sweep.scheduler: asha`` the rungs are those stage ends (time attribute ``nimg``, the
images shown, i.e. kimg x 1000). A trial the scheduler stops is ``stopped`` in its run_state.json with the note
"stopped by the scheduler ...", not failed.

At the end, in ``<storage.url>/<run.name>-sweep/``: ``results.json`` (every trial: parameters, SWD per level at
each stage end, state, run directory), ``swd.png`` (SWD avg vs kimg, one line per trial) and ``best.yaml`` (the
best trial's full config, for ``launch.py --config``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import random
import signal
import sys
import threading
import time
from typing import Any

import ray  # 1. Ray core
from ray import tune  # 2. Ray Tune: Tuner, Trainable, schedulers

from .config import RunConfig, apply_sets, from_json
from .driver import init_ray, linger, run_training, run_url_of
from .errors import UserError
from .history import read_records
from .hub import call, get_hub
from .run_state import RUN_STATE, TERMINAL, RunState
from .schedule import stages
from .storage import Storage, join, normalize

SCHEDULER_NOTE = "stopped by the scheduler"
SWEEP_STOP_NOTE = "stopped with the sweep; run the same sweep command again to resume"
# Keys that would give trials different seeds, data, data order or evaluation images, or move their run directory.
UNSWEEPABLE = ("run.", "storage.", "data.", "metrics.swd_images", "sweep.")


def say(msg: str) -> None:
    print(f"[pggan] {msg}", flush=True)


# ---- the trials -----------------------------------------------------------------------------------------

def param_space(cfg: RunConfig) -> dict[str, Any]:
    """sweep.search_space -> Tune samplers, keyed by the dotted config key (what Tune itself would sample)."""
    out: dict[str, Any] = {}
    for key, spec in cfg.sweep.search_space.items():
        kind, arg = next(iter(spec.items()))
        out[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](arg) if kind in ("grid", "choice") else \
            {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*arg)
    return out


def expand_trials(cfg: RunConfig) -> list[dict[str, Any]]:
    """The sweep's trials in a fixed order: for each of num_samples, every grid point (the grid's product in the
    search space's key order), the other keys drawn from a generator seeded with run.seed. The same config gives
    the same list, which is what makes a sweep resumable from its run directories."""
    rng = random.Random(cfg.run.seed)
    space = cfg.sweep.search_space
    grid_keys = [k for k, spec in space.items() if "grid" in spec]
    trials: list[dict[str, Any]] = []
    for _ in range(cfg.sweep.num_samples):
        for point in itertools.product(*(space[k]["grid"] for k in grid_keys)):
            grid = dict(zip(grid_keys, point))
            params: dict[str, Any] = {}
            for key, spec in space.items():
                kind, arg = next(iter(spec.items()))
                params[key] = grid[key] if kind == "grid" else rng.choice(arg) if kind == "choice" else \
                    rng.uniform(*arg) if kind == "uniform" else math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1])))
            i = len(trials)
            trials.append({"index": i, "name": f"t{i:02d}", "params": params})
    return trials


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_name: str) -> RunConfig:
    """The base config with the trial's values set, in its own run directory. Trials do not keep the exporter up
    after they end (metrics.linger_s 0): the exporter belongs to the sweep, which lingers once at its end."""
    sets = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    data = apply_sets(base, sets)
    data["run"]["name"] = f"{data['run']['name']}-{trial_name}"
    data["metrics"]["linger_s"] = 0.0
    return from_json(data)


def sweep_url_of(cfg: RunConfig) -> str:
    return join(normalize(cfg.storage.url), f"{cfg.run.name}-sweep")


def check_sweep(cfg: RunConfig) -> None:
    """What a sweep needs beyond a valid config; one UserError naming every problem."""
    problems = []
    if not cfg.metrics.swd_images:
        problems.append("metrics.swd_images: sweeps compare trials on SWD; set it above 0")
    if cfg.sweep.metric != "swd_avg":
        problems.append(f"sweep.metric: trials report swd_avg (SWD x1e3 averaged over levels), not {cfg.sweep.metric}")
    if not any(st.resolution >= 8 for st in stages(cfg)):
        problems.append("model.max_resolution: SWD needs 8x8 or more; a 4x4-only sweep has nothing to compare on")
    for key in cfg.sweep.search_space:
        if key.startswith(UNSWEEPABLE):
            problems.append(f"sweep.search_space.{key}: trials share the seed, data, data order, evaluation images "
                            "and storage for a fair comparison; this key cannot be swept")
    if problems:
        raise UserError("; ".join(problems))


# ---- one trial ------------------------------------------------------------------------------------------

def swd_result(record: dict[str, Any]) -> dict[str, Any]:
    """A stage-end record with SWD -> one Tune result (always carrying swd_avg)."""
    swd = record["swd"]
    return {"swd_avg": float(swd["avg"]), "nimg": int(record["nimg"]), "kimg": float(record["nimg"]) / 1000,
            "stage_index": record["stage_index"], "stage": record["stage"], "resolution": record["resolution"],
            **{f"swd_{lvl}": float(v) for lvl, v in swd["swd_x1e3"].items()}}


def finalize(cfg: RunConfig, trial: str, to: str, note: str, hub: Any = None, restop: bool = False,
             wait: bool = True) -> bool:
    """Give an unfinished trial run a final state (run_state.json and the exporter's state series), so that no
    trial ends still `training` (PgganRunVanished fires on a run whose series vanish in that state). A run in a
    final state keeps it (a stopped one gets the new note with ``restop``). Returns whether it changed anything."""
    storage, url = Storage.from_config(cfg.storage), run_url_of(cfg)
    if not storage.exists(join(url, RUN_STATE)):
        return False  # never started
    st = RunState.load(storage, url)
    if (st.state in TERMINAL and not (restop and st.state == "stopped")) or (st.state == to and st.message == note):
        return False
    st.transition(to, note=note, force=True)
    st.save(storage, url)
    if hub is not None:
        try:
            if wait:
                call(hub, "set_state", cfg.run.name, trial, to)
            else:  # in a signal handler: no blocking Ray call
                hub.set_state.remote(cfg.run.name, trial, to)
        except Exception:  # noqa: BLE001 - the run directory holds the state; the exporter is best effort
            pass
    return True


class SweepControl:
    """A tiny actor of the sweep's driver (wrapped with ray.remote in :func:`run_sweep`): trials poll it, and stop
    (marking their run stopped) when the sweep is stopped or its driver is gone. A trial's own driver thread may
    write run_state.json at any transition, so only the trial itself can mark its run stopped without a race: it
    writes the state and ends its process (and with it the Train run it owns) at once."""

    def __init__(self) -> None:
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True

    def is_stopping(self) -> bool:
        return self.stopping


def control_name(cfg: RunConfig) -> str:
    return f"pggan-sweep-{cfg.run.name}"


class PgganTrial(tune.Trainable):
    """One Tune trial: a whole run (:func:`pggan.driver.run_training`) in a background thread.

    Each stage end with SWD is one Tune result. Like Tune's synchronous reporting, the run's driver thread waits
    at a stage end until Tune asks for the next result: when the scheduler stops the trial instead, the run is
    still between two states, and :meth:`cleanup` marks it stopped-by-scheduler before the actor (and the Train
    workers it owns) go away. Stage ends a previous sweep already evaluated are replayed from the run's history
    first, so the scheduler sees every trial's whole curve after a resume.
    """

    def setup(self, config: dict[str, Any], base: dict[str, Any] | None = None, control: str | None = None) -> None:
        spec = config["trial"]
        self.name: str = spec["name"]
        self.cfg = trial_config(base or {}, spec["params"], self.name)
        self.results: queue.Queue[tuple[str, Any, bool]] = queue.Queue()
        self.go = threading.Semaphore(0)     # released when Tune wants the next result
        self.held = False                    # the run's driver thread waits at a stage end
        self.replayed = False                # the last result was replayed from the history
        self.finishing = False               # the last result (done) was returned
        self.seen: set[int] = set()          # nimg of the stage ends Tune has been given
        self.last: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None
        self.hub = get_hub(self.cfg.metrics.host, self.cfg.metrics.port)
        self.control = ray.get_actor(control) if control else None
        self.ended = threading.Event()
        storage, url = Storage.from_config(self.cfg.storage), run_url_of(self.cfg)
        state = RunState.load(storage, url) if storage.exists(join(url, RUN_STATE)) else None
        done_before = state is not None and state.state == "stopped" and state.message.startswith(SCHEDULER_NOTE)
        if state is not None:
            for rec in read_records(storage, url):
                if rec.get("event") == "stage_end" and rec.get("swd") and rec["nimg"] not in self.seen:
                    self.seen.add(rec["nimg"])
                    self.results.put(("result", rec, False))
        self.results.put(("end", 0, False) if done_before else ("start", None, False))

    # ---- the run, in its own thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            code = run_training(self.cfg, trial=self.name, report=self._on_stage_end)
        except BaseException as e:  # noqa: BLE001 - handed to step()
            self.results.put(("error", e, False))
            return
        finally:
            self.ended.set()
        self.results.put(("end", code, False))

    def _watch(self) -> None:
        """Stop with the sweep: `ray job stop` on it (SweepControl.stop) or its driver gone."""
        from ray.exceptions import GetTimeoutError

        while not self.ended.wait(0.5):
            try:
                stopping = ray.get(self.control.is_stopping.remote(), timeout=10)
            except GetTimeoutError:
                continue
            except Exception:  # noqa: BLE001 - the control actor died with the sweep's driver
                stopping = True
            if stopping and not self.ended.is_set():
                try:
                    finalize(self.cfg, self.name, "stopped", SWEEP_STOP_NOTE, self.hub, wait=False)
                finally:
                    os._exit(0)  # at once: the run's driver thread must not write another state

    def _on_stage_end(self, record: dict[str, Any]) -> None:
        if not record.get("swd") or record["nimg"] in self.seen:
            return
        self.seen.add(record["nimg"])
        self.results.put(("result", record, True))
        self.go.acquire()  # until Tune asks for more (or the actor ends: the scheduler stopped the trial)

    # ---- Tune's side ------------------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        if self.held:
            self.held = False
            self.go.release()
        while True:
            kind, value, from_run = self.results.get()
            if kind == "start":  # the replay is over: train (or find the run complete)
                self.thread = threading.Thread(target=self._run, name=f"pggan-trial-{self.name}", daemon=True)
                self.thread.start()
                if self.control is not None:
                    threading.Thread(target=self._watch, name=f"pggan-watch-{self.name}", daemon=True).start()
                continue
            if kind == "result":
                self.held, self.replayed = from_run, not from_run
                self.last = swd_result(value)
                return dict(self.last)
            if kind == "end" and value == 0:
                self.finishing = True
                return {**(self.last or {"swd_avg": float("nan")}), "done": True}
            msg = f"trial {self.name} ended with exit code {value}" if kind == "end" else \
                f"trial {self.name} failed: {type(value).__name__}: {value}"
            storage, url = Storage.from_config(self.cfg.storage), run_url_of(self.cfg)
            finalize(self.cfg, self.name, "failed", msg, self.hub)  # an error the driver did not record
            state = RunState.load(storage, url) if storage.exists(join(url, RUN_STATE)) else None
            raise RuntimeError(f"{msg}: {state.message if state else ''} (run directory {url})")

    def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
        return {"run_url": run_url_of(self.cfg)}  # the run directory holds the trial's state, checkpoints included

    def load_checkpoint(self, checkpoint: Any) -> None:
        pass  # a restarted trial resumes from its run directory on its own

    def cleanup(self) -> None:
        if self.finishing:
            return
        last = self.last or {}
        if self.held and last.get("nimg", -1) >= stages(self.cfg)[-1].end:
            # The last stage end: a scheduler stops a trial that reached max_t, but the run is done; let it finish.
            self.held = False
            self.go.release()
            if self.thread is not None:
                self.thread.join(timeout=600)
            return
        if self.held or self.replayed:
            note = (f"{SCHEDULER_NOTE} (ASHA) at {last.get('kimg', 0):g} kimg, SWD x1e3 avg "
                    f"{last.get('swd_avg', float('nan')):.2f}; the sweep's other trials did better at this rung")
        else:
            note = SWEEP_STOP_NOTE
        finalize(self.cfg, self.name, "stopped", note, self.hub, restop=self.thread is None)
        # The run's driver thread stays blocked at its stage end; the Train run it owns ends with this actor.


# ---- results --------------------------------------------------------------------------------------------

def collect(cfg: RunConfig, trials: list[dict[str, Any]], errors: dict[str, str]) -> list[dict[str, Any]]:
    """Every trial as results.json lists it, from its run directory (the source of truth, also after resumes)."""
    base = cfg.to_json()
    storage = Storage.from_config(cfg.storage)
    out = []
    for t in trials:
        tcfg = trial_config(base, t["params"], t["name"])
        url = run_url_of(tcfg)
        has_state = storage.exists(join(url, RUN_STATE))
        state = RunState.load(storage, url) if has_state else RunState()
        ends = []
        for rec in read_records(storage, url) if has_state else []:
            if rec.get("event") == "stage_end" and rec.get("swd"):
                ends = [e for e in ends if e["nimg"] != rec["nimg"]]
                ends.append({"stage": rec["stage"], "stage_index": rec["stage_index"], "resolution": rec["resolution"],
                             "nimg": rec["nimg"], "kimg": rec["nimg"] / 1000, "swd_x1e3": rec["swd"]["swd_x1e3"],
                             "swd_avg": rec["swd"]["avg"]})
        ends.sort(key=lambda e: e["nimg"])
        st = state.state if has_state else "failed" if t["name"] in errors else "pending"
        msg = state.message if has_state else errors.get(t["name"], "not started")
        if t["name"] in errors and st not in ("failed", "stopped"):
            st, msg = "failed", errors[t["name"]]
        out.append({"trial": t["name"], "index": t["index"], "params": t["params"], "state": st, "message": msg,
                    "run_url": url, "kimg": state.nimg / 1000, "stage_ends": ends,
                    "swd_avg": ends[-1]["swd_avg"] if ends else None, "swd_kimg": ends[-1]["kimg"] if ends else None})
    return out


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first. Trials are compared at equal kimg: those that reached the furthest stage end with SWD first
    (all completed trials of a sweep share the schedule), then by SWD avg there; trials without SWD last."""
    def key(r: dict[str, Any]) -> tuple[float, float]:
        if r["swd_avg"] is None or not math.isfinite(r["swd_avg"]):
            return (math.inf, math.inf)
        return (-r["swd_kimg"], r["swd_avg"])

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked):
        r["rank"] = i + 1 if key(r)[0] != math.inf else None
    return ranked


def table(rows: list[dict[str, Any]]) -> str:
    """The per-trial table: parameters, state, and SWD avg at every stage end (columns by kimg)."""
    kimgs = sorted({e["kimg"] for r in rows for e in r["stage_ends"]})
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["rank", "trial", *keys, "state", *[f"{k:g}" for k in kimgs]]
    lines = [head]
    for r in rows:
        at = {e["kimg"]: e["swd_avg"] for e in r["stage_ends"]}
        lines.append([str(r["rank"] or "-"), r["trial"], *[_fmt(r["params"].get(k)) for k in keys], r["state"],
                      *[f"{at[k]:.2f}" if k in at else "" for k in kimgs]])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["sweep results: SWD x1e3 avg at each stage end, by kimg (lower is better; ranked at equal kimg)"]
    out += ["  " + "  ".join(c.rjust(w) if i >= len(head) - len(kimgs) else c.ljust(w)
                             for i, (c, w) in enumerate(zip(x, widths))) for x in lines]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """SWD avg vs kimg, one line per trial (Pillow, with the report's plotting helpers)."""
    from .report import PALETTE, Panel, Series, _png, render_panel

    series = []
    for i, r in enumerate(sorted(rows, key=lambda r: r["index"])):
        if not r["stage_ends"]:
            continue
        label = f"{r['trial']} " + " ".join(_fmt(v) for _, v in sorted(r["params"].items()))  # short: legend in one row
        series.append(Series(label + ("" if r["state"] == "completed" else f" ({r['state']})"),
                             [e["kimg"] for e in r["stage_ends"]], [e["swd_avg"] for e in r["stage_ends"]],
                             PALETTE[i % len(PALETTE)], width=2.0, dash=r["state"] != "completed", markers=True))
    ys = [y for s in series for y in s.y if math.isfinite(y) and y > 0]
    wide = bool(ys) and max(ys) / min(ys) > 5  # a log axis only where the values span a range worth it
    panel = Panel("SWD x1e3 avg vs kimg", "SWD x1e3 avg (lower is better)", series, log_y=wide,
                  empty_text="no SWD measured")
    from PIL import Image, ImageDraw

    from .report import INK, _font

    out = Image.new("RGB", (800, 474), "white")
    ImageDraw.Draw(out).text((12, 5), title, fill=INK, font=_font(14))
    out.paste(render_panel(panel, w=800, h=450).resize((800, 450), Image.LANCZOS), (0, 24))  # drawn at 2x: antialiased
    return _png(out)


def best_yaml(cfg: RunConfig, best: dict[str, Any]) -> str:
    """The best trial's full config. Its run.name is the trial's run directory: `launch.py --config best.yaml`
    finds it complete, and `--set schedule.total_kimg=...` trains the winner on from its final checkpoint."""
    import yaml

    data = trial_config(cfg.to_json(), best["params"], best["trial"]).to_json()
    data["metrics"]["linger_s"] = cfg.metrics.linger_s
    head = (f"# best trial of sweep {cfg.run.name}: {best['trial']} {json.dumps(best['params'], sort_keys=True)}\n"
            f"# SWD x1e3 avg {best['swd_avg']:.2f} at {best['swd_kimg']:g} kimg; run directory {best['run_url']}\n")
    return head + yaml.safe_dump(from_json(data).to_json(), sort_keys=False)


def write_results(cfg: RunConfig, rows: list[dict[str, Any]], wall_s: float) -> dict[str, str]:
    storage, url = Storage.from_config(cfg.storage), sweep_url_of(cfg)
    best = next((r for r in rows if r["rank"] == 1), None)
    doc = {"sweep": cfg.run.name, "metric": "swd_avg: SWD x1e3 averaged over Laplacian levels, G_ema vs reals; "
                                             "lower is better",
           "ranking": "furthest stage end with SWD first (equal kimg), then SWD avg there",
           "search_space": cfg.sweep.search_space, "scheduler": cfg.sweep.scheduler, "wall_s": round(wall_s, 1),
           "best": best["trial"] if best else None, "trials": rows}
    paths = {"results": join(url, "results.json"), "plot": join(url, "swd.png"), "best": join(url, "best.yaml")}
    storage.write_json(paths["results"], doc)
    keys = ", ".join(sorted({k for r in rows for k in r["params"]}))
    storage.write_bytes(paths["plot"], plot_png(rows, f"sweep {cfg.run.name}: one line per trial ({keys})"))
    if best is not None:
        storage.write_bytes(paths["best"], best_yaml(cfg, best).encode())
    else:
        paths.pop("best")
    return paths


# ---- the sweep ------------------------------------------------------------------------------------------

def _record_trials(cfg: RunConfig, trials: list[dict[str, Any]]) -> None:
    """trials.json in the sweep directory; a different sweep under the same name is refused (its trials' run
    directories would be reused for other parameters)."""
    storage, url = Storage.from_config(cfg.storage), join(sweep_url_of(cfg), "trials.json")
    storage.check_writable(sweep_url_of(cfg))
    listed = [{"name": t["name"], "params": t["params"]} for t in trials]
    if storage.exists(url):
        old = storage.read_json(url)
        if old.get("trials") != json.loads(json.dumps(listed)):
            raise UserError(f"{url} lists other trials (the search space, num_samples or seed changed); use "
                            "another run.name for a new sweep, or remove that sweep directory")
        say(f"sweep {cfg.run.name}: resuming; finished trials are not trained again")
    storage.write_json(url, {"sweep": cfg.run.name, "trials": listed})


def _stop_handler(cfg: RunConfig, trials: list[dict[str, Any]], hub: Any, control: Any) -> None:
    """SIGTERM (`ray job stop` allows 3 s before its SIGKILL; Kubernetes): the running trials mark themselves
    stopped and end (see :class:`SweepControl`); one that has not within 2 s is marked here. Then the process
    ends. Ctrl-C is Tune's: it stops the trials, whose cleanup marks them."""
    base = cfg.to_json()
    cfgs = [(trial_config(base, t["params"], t["name"]), t["name"]) for t in trials]

    def running() -> list[tuple[RunConfig, str]]:
        out = []
        for c, name in cfgs:
            storage, url = Storage.from_config(c.storage), run_url_of(c)
            if storage.exists(join(url, RUN_STATE)) and RunState.load(storage, url).state not in TERMINAL:
                out.append((c, name))
        return out

    def handler(signum: int, frame: Any) -> None:
        control.stop.remote()
        deadline = time.monotonic() + 2.0
        left = running()
        n = len(left)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = running()
        for c, name in left:
            try:
                finalize(c, name, "stopped", SWEEP_STOP_NOTE, hub, wait=False)
            except Exception as e:  # noqa: BLE001 - the others still get theirs
                print(f"warning: could not mark {name} stopped ({type(e).__name__}: {e})", file=sys.stderr)
        say(f"sweep stopped ({n} running trial(s) marked stopped); run the same command again to resume")
        sys.stdout.flush()
        os._exit(130)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _tuner(cfg: RunConfig, trials: list[dict[str, Any]]) -> Any:
    """The Tuner: one grid point per trial, ASHA rungs at stage ends, trial actors holding no CPU."""
    scheduler = None
    if cfg.sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # Rungs at stage ends: results come only at stage ends with SWD; the first rung is the first of them.
        ends = [st.end for st in stages(cfg) if st.resolution >= 8]
        scheduler = ASHAScheduler(time_attr="nimg", grace_period=ends[0], max_t=ends[-1],
                                  reduction_factor=cfg.sweep.reduction_factor)
    # A trial's own actor holds no CPU: the CPUs belong to its Train workers (else small clusters deadlock).
    trainable = tune.with_resources(tune.with_parameters(PgganTrial, base=cfg.to_json(), control=control_name(cfg)),
                                    {"cpu": 0, "memory": 64 * 1024 * 1024})
    local = os.path.join(os.path.expanduser("~"), "ray_results", "pggan-sweeps")
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(metric="swd_avg", mode="min", num_samples=1, scheduler=scheduler,
                                    max_concurrent_trials=cfg.sweep.max_concurrent,
                                    trial_name_creator=lambda t: t.config["trial"]["name"],
                                    trial_dirname_creator=lambda t: t.config["trial"]["name"]),
        # Tune's own records stay local (the run directories hold everything); a fresh name per driver life.
        run_config=tune.RunConfig(name=f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=local,
                                  verbose=1, failure_config=tune.FailureConfig(max_failures=0)),
    )


def run_sweep(cfg: RunConfig, address: str | None = None) -> int:
    check_sweep(cfg)
    trials = expand_trials(cfg)
    t0 = time.perf_counter()
    _record_trials(cfg, trials)
    init_ray(cfg, address)
    hub = get_hub(cfg.metrics.host, cfg.metrics.port)  # on the driver's node, shared by all trials
    port = ray.get(hub.get_port.remote())
    if port:
        say(f"Prometheus metrics on port {port} (/metrics), one `trial` label per trial")
    say(f"sweep {cfg.run.name}: {len(trials)} trials, up to {cfg.sweep.max_concurrent} at once, scheduler "
        f"{cfg.sweep.scheduler}; results in {sweep_url_of(cfg)}")
    for t in trials:
        say(f"  {t['name']}: {json.dumps(t['params'], sort_keys=True)}")
    control = ray.remote(num_cpus=0, max_restarts=0)(SweepControl).options(
        name=control_name(cfg), get_if_exists=True).remote()
    ray.get(control.is_stopping.remote())
    _stop_handler(cfg, trials, hub, control)

    results = _tuner(cfg, trials).fit()
    errors = {}
    for r in results:
        if r.error is not None and r.config:
            errors[r.config["trial"]["name"]] = str(r.error).strip().splitlines()[-1][:500]
    for t in trials:  # nothing ends still running (a trial actor lost without its cleanup)
        finalize(trial_config(cfg.to_json(), t["params"], t["name"]), t["name"], "failed" if t["name"] in errors
                 else "stopped", errors.get(t["name"], SWEEP_STOP_NOTE), hub)
    rows = rank(collect(cfg, trials, errors))
    print(table(rows), flush=True)
    paths = write_results(cfg, rows, time.perf_counter() - t0)
    best = next((r for r in rows if r["rank"] == 1), None)
    if best:
        say(f"best: {best['trial']} {json.dumps(best['params'], sort_keys=True)}  SWD x1e3 avg "
            f"{best['swd_avg']:.2f} at {best['swd_kimg']:g} kimg; config {paths['best']}")
    say(f"results {paths['results']}, plot {paths['plot']}; sweep took {time.perf_counter() - t0:.0f} s")
    linger(cfg, port)
    return 0 if best else 1
