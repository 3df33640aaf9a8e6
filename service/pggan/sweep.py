"""Ray Tune sweep: each trial is one driver run (its own run directory) with config overrides.

The search space is config-driven (``sweep.search_space``: dotted key -> sampler). Trials report SWD at
every stage end, so ASHA can stop poor trials early; D losses of WGAN-GP and LSGAN are on different
scales and are not compared.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ray  # 1. Ray core
from ray import tune  # 2. Ray Tune: Tuner, samplers, report

from .config import RunConfig, apply_sets, from_json
from .driver import init_ray, run_training, run_url_of
from .errors import UserError
from .hub import get_hub
from .storage import normalize


def param_space(cfg: RunConfig) -> dict[str, Any]:
    """sweep.search_space -> Tune samplers, keyed by the dotted config key."""
    out: dict[str, Any] = {}
    for key, spec in cfg.sweep.search_space.items():
        kind, arg = next(iter(spec.items()))
        out[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](arg) if kind in ("grid", "choice") else \
            {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*arg)
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_name: str) -> RunConfig:
    """The base config with the trial's values set, in its own run directory."""
    sets = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    data = apply_sets(base, sets)
    data["run"]["name"] = f"{data['run']['name']}-{trial_name}"
    return from_json(data)


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: a whole driver run; reports SWD at each stage end."""
    base = params["_base"]  # the resolved base config, as JSON
    params = {k: v for k, v in params.items() if k != "_base"}
    ctx = tune.get_context()
    name = ctx.get_trial_name() or ctx.get_trial_id()
    cfg = trial_config(base, params, name)

    def report(record: dict[str, Any]) -> None:
        metrics = {"stage_index": record["stage_index"], "resolution": record["resolution"], "kimg": record["kimg"]}
        if "swd" in record:
            metrics["swd_avg"] = record["swd"]["avg"]
        tune.report(metrics)  # 3. Ray Tune: one result per stage end

    code = run_training(cfg, trial=name, report=report)
    if code != 0:
        raise RuntimeError(f"trial {name} ended with exit code {code}; see its run_state.json in {run_url_of(cfg)}")


def run_sweep(cfg: RunConfig, address: str | None = None) -> int:
    if not cfg.metrics.swd_images:
        raise UserError("metrics.swd_images: sweeps compare trials on SWD; set it above 0")
    if cfg.sweep.metric != "swd_avg":
        raise UserError("sweep.metric: only swd_avg is reported by trials")
    init_ray(cfg, address)
    hub = get_hub(cfg.metrics.host, cfg.metrics.port)  # on the driver's node, shared by all trials
    port = ray.get(hub.get_port.remote())
    if port:
        print(f"[pggan] Prometheus metrics on port {port} (/metrics), one `trial` label per trial", flush=True)

    scheduler = None
    if cfg.sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=2, reduction_factor=2)
    space = param_space(cfg) | {"_base": cfg.to_json()}
    base_url = normalize(cfg.storage.url)
    storage_path = os.path.join(base_url, f"{cfg.run.name}-sweep") if "://" not in base_url else None
    # A trial's driver holds no CPU: the CPUs belong to its Train workers (else small clusters deadlock).
    trainable = tune.with_resources(_trial, {"cpu": 0, "memory": 64 * 1024 * 1024})
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric="swd_avg", mode="min", num_samples=cfg.sweep.num_samples,
                                    max_concurrent_trials=cfg.sweep.max_concurrent, scheduler=scheduler),
        run_config=tune.RunConfig(name=f"{cfg.run.name}-sweep", storage_path=storage_path),
    )
    results = tuner.fit()
    rows = []
    for r in results:
        params = {k: v for k, v in (r.config or {}).items() if k != "_base"}
        swd = (r.metrics or {}).get("swd_avg")
        rows.append((swd if swd is not None else float("inf"), params, r.error))
    rows.sort(key=lambda t: t[0])
    print("sweep results (SWD x1e3 avg at the last evaluated stage; lower is better):", flush=True)
    for swd, params, err in rows:
        status = f"{swd:8.2f}" if swd != float("inf") else "  failed" if err else "     n/a"
        print(f"  {status}  {json.dumps(params, sort_keys=True)}", flush=True)
    ok = [r for r in rows if r[0] != float("inf")]
    if ok:
        print(f"best: {json.dumps(ok[0][1], sort_keys=True)}  SWD {ok[0][0]:.2f}", flush=True)
    return 0 if ok else 1
