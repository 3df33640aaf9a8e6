"""Typed, validated run configuration.

Every section of the config is a pydantic model with ``extra="forbid"``; field ranges are checked
where they are declared and the checks that span fields live in :func:`_cross_checks`, run as the
top-level model validator so that ``RunConfig.model_validate`` always applies them. All problems of
one config are reported together (:class:`ConfigError`), each with its dotted key and the value given.

Config crosses process boundaries as JSON: ``cfg.model_dump(mode="json")`` on one side and
``RunConfig.model_validate(d)`` (or :func:`from_json`) on the other.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .models.mbstd import mbstd_group
from .resolution import RESOLUTIONS, RULE, is_valid

PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_NAMES = ("demo", "paper", "paper-8gpu")

# Keys that would carry credentials: refused anywhere in storage.options (they come from the environment).
_SECRET_KEY_RE = re.compile(r"(secret|password|passwd|token|credential|^key$|access_key|session)", re.I)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_res_keys(d: dict[int, Any]) -> dict[int, Any]:
    for res in d:
        if not is_valid(res):
            raise ValueError(f"resolution key {res} {RULE}")
    return d


def _positive_per_res(d: dict[int, float]) -> dict[int, float]:
    """A per-resolution mapping with power-of-two keys and positive, finite values."""
    _check_res_keys(d)
    for res, x in d.items():
        if not (x > 0 and math.isfinite(x)):
            raise ValueError(f"value for {res} must be a positive number, got {x}")
    return d


class RunSection(_Section):
    """Identity of the run: its directory name under storage.url and its random seed."""

    name: str = Field("demo", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Run directory name under storage.url (letters, digits, '.', '_', '-').")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for weights, latents, data order and metrics.")


class StorageSection(_Section):
    """Where the run directory lives. Credentials come only from the environment (AWS_* variables or a
    Kubernetes Secret mounted as env), never from this section."""

    url: str = Field("./runs", min_length=1,
                     description="Any fsspec URL or local path: s3://bucket/prefix, file:///abs, ./runs, memory://x.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, Ceph), e.g. http://minio:9000.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Extra fsspec storage options (non-secret), e.g. {anon: false}.")
    retry_attempts: int = Field(8, ge=1, le=100, description="Attempts per storage operation before giving up.")
    retry_max_wait_s: float = Field(120.0, gt=0, le=3600,
                                    description="Total backoff budget per storage operation; past it the run stops cleanly.")

    @field_validator("url")
    @classmethod
    def _no_inline_credentials(cls, v: str) -> str:
        if re.match(r"^[a-z0-9+]+://[^/]*:[^/]*@", v):
            raise ValueError("credentials must not be embedded in the URL; set them in the environment")
        return v

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(k for k in v if _SECRET_KEY_RE.search(k))
        if bad:
            raise ValueError(f"secret-looking keys {bad} are not allowed here; credentials come from the environment")
        return v


class DataSection(_Section):
    """Training images: the built-in synthetic set or a prepared dataset / image folder / zip at any URL."""

    source: str = Field("synthetic:shapes", min_length=1,
                        description="'synthetic:shapes', a prepared dataset (has manifest.json), or a folder/.zip of images.")
    resolution: int | None = Field(None, description="Resolution of the prepared data (default: model.max_resolution).")
    mirror: bool = Field(True, description="Random horizontal flips (mirror augment, as in the paper).")
    synthetic_images: int = Field(16384, ge=64, le=10_000_000, description="Size of the synthetic dataset.")
    cache_url: str | None = Field(None, description="Where an unprepared folder/zip is prepared on the fly (default: run dir/data).")
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0,
                                    description="Fail prepare if more than this fraction of source files is unreadable.")
    upscale_small: bool = Field(False, description="Upscale images smaller than the target instead of rejecting them.")

    @field_validator("resolution")
    @classmethod
    def _pow2(cls, v: int | None) -> int | None:
        if v is not None and not is_valid(v):
            raise ValueError(RULE)
        return v


class ModelSection(_Section):
    """Network architecture (the paper's: fmap_base 8192, fmap_max 512, latent 512)."""

    max_resolution: int = Field(1024, description="Final resolution; G and D are built at this size.")
    latent_size: int = Field(512, ge=1, le=4096, description="Latent vector length.")
    fmap_base: int = Field(8192, ge=1, le=65536, description="Channels at a block = min(fmap_base / 2^stage, fmap_max).")
    fmap_max: int = Field(512, ge=1, le=4096, description="Cap on channels per block.")
    mbstd_group_size: int = Field(4, ge=0, le=64, description="Minibatch-stddev group size (0 disables the layer).")
    fused_scale: bool = Field(True, description="Fuse upsample+conv and conv+avgpool (same math, fewer FLOPs).")

    @field_validator("max_resolution")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if not is_valid(v):
            raise ValueError(RULE)
        return v


class ScheduleSection(_Section):
    """Progressive-growing timeline, counted in thousands of images shown to D (kimg)."""

    start_resolution: int = Field(4, description="First (stable) resolution.")
    fade_kimg: float = Field(800.0, gt=0, le=1e6, description="kimg of each fade-in stage (paper 800).")
    stable_kimg: float = Field(800.0, gt=0, le=1e6, description="kimg of each stable stage (paper 800).")
    fade_kimg_dict: dict[int, float] = Field(default_factory=dict, description="Per-resolution fade-in kimg overrides.")
    stable_kimg_dict: dict[int, float] = Field(default_factory=dict, description="Per-resolution stable kimg overrides.")
    minibatch_base: int = Field(16, ge=1, le=65536, description="Global minibatch where minibatch_dict has no entry.")
    minibatch_dict: dict[int, int] = Field(default_factory=dict, description="Global minibatch per resolution.")
    lr_base: float = Field(0.001, gt=0, le=1.0, description="Adam learning rate where lr_dict has no entry.")
    lr_dict: dict[int, float] = Field(default_factory=dict, description="Learning rate per resolution.")
    lr_rampup_kimg: float = Field(0.0, ge=0, le=1e5, description="Linear lr ramp-up at the start of each stage (Theano: 40).")
    total_kimg: float | None = Field(None, gt=0, le=1e7,
                                     description="Stop here; past the schedule's end the final stable stage goes on.")

    @field_validator("start_resolution")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if not is_valid(v):
            raise ValueError(RULE)
        return v

    @field_validator("fade_kimg_dict", "stable_kimg_dict", "lr_dict")
    @classmethod
    def _positive(cls, v: dict[int, float]) -> dict[int, float]:
        return _positive_per_res(v)

    @field_validator("minibatch_dict")
    @classmethod
    def _positive_int(cls, v: dict[int, int]) -> dict[int, int]:
        _check_res_keys(v)
        for res, x in v.items():
            if x < 1:
                raise ValueError(f"minibatch for {res} must be >= 1, got {x}")
        return v

    def minibatch(self, res: int) -> int:
        return self.minibatch_dict.get(res, self.minibatch_base)

    def lr(self, res: int) -> float:
        return self.lr_dict.get(res, self.lr_base)

    def fade_nimg(self, res: int) -> int:
        return round(self.fade_kimg_dict.get(res, self.fade_kimg) * 1000)

    def stable_nimg(self, res: int) -> int:
        return round(self.stable_kimg_dict.get(res, self.stable_kimg) * 1000)


class LossSection(_Section):
    """GAN objective: WGAN-GP with drift (paper default) or the paper's LSGAN."""

    kind: Literal["wgan-gp", "lsgan"] = Field("wgan-gp", description="wgan-gp | lsgan.")
    gp_lambda: float = Field(10.0, ge=0, le=1e4, description="Gradient-penalty weight (WGAN-GP).")
    gp_target: float = Field(1.0, gt=0, le=1e4, description="Target gradient norm of the penalty.")
    drift: float = Field(0.001, ge=0, le=1.0, description="eps_drift * D(real)^2 keeps D's output near 0.")
    lsgan_fake_weight: float = Field(0.1, ge=0, le=10, description="Weight of the fake term in the paper's LSGAN D loss.")
    gdrop_coef: float | None = Field(None, ge=0, le=100,
                                     description="D's multiplicative Gaussian noise (the paper's LSGAN runs, official "
                                                 "Theano gdrop): strength = coef * max(avg D loss - gdrop_lim, 0)^gdrop_exp; "
                                                 "null = 0.2 with lsgan, 0 (off) with wgan-gp.")
    gdrop_lim: float = Field(0.5, ge=0, le=100, description="D loss average above which the noise fades in (official 0.5).")
    gdrop_exp: float = Field(2.0, gt=0, le=10, description="Exponent of the noise strength (official 2.0).")
    gdrop_beta: float = Field(0.9, ge=0, lt=1, description="Per-step decay of the D loss average (official 0.9).")

    @property
    def gdrop(self) -> float:
        """The noise's coefficient in effect (0 = no noise layers in D)."""
        if self.gdrop_coef is not None:
            return self.gdrop_coef
        return 0.2 if self.kind == "lsgan" else 0.0


class OptimSection(_Section):
    """Adam for G and D (paper: beta1 0, beta2 0.99, eps 1e-8); state is reset at every stage change."""

    beta1: float = Field(0.0, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.99, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, le=1, description="Adam epsilon.")
    max_nonfinite_in_row: int = Field(50, ge=1, le=100000,
                                      description="Non-finite steps in a row before the stage rolls back to its last checkpoint.")


class EmaSection(_Section):
    """G_ema: the smoothed generator used for samples, metrics and the exported snapshot."""

    half_life_kimg: float | None = Field(11.09, ge=0, le=1e4,
                                         description="Half-life in kimg (official beta 0.999 per step at minibatch 16 = "
                                                     "11.09); null when beta_per_step is set.")
    beta_per_step: float | None = Field(None, ge=0, lt=1,
                                        description="Decay per step whatever the minibatch, as the official code "
                                                    "(G_smoothing 0.999); needs half_life_kimg: null.")
    rampup: float | None = Field(None, gt=0, le=1,
                                 description="Cap the half-life at this fraction of images seen (stylegan2-ada), for short runs.")


class ClusterSection(_Section):
    """How workers are placed and how they compute."""

    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; otherwise CPU and gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs reserved per worker (torch threads follow it).")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources per worker.")
    max_failures: int = Field(3, ge=-1, le=1000, description="Worker-group restarts per stage (-1 = unlimited).")
    start_timeout_s: float = Field(120.0, gt=0, le=86400,
                                   description="Give up if the workers cannot be placed within this time.")
    amp: Literal["auto", "bf16", "none"] = Field("auto", description="Mixed precision: auto = bf16 on GPU, fp32 on CPU "
                                                                     "(the paper presets set none: fp32 as the official runs).")
    channels_last: bool = Field(True, description="NHWC memory format for convolutions.")
    compile: bool = Field(False, description="torch.compile G and D (the gradient penalty's D pass stays eager). "
                                             "Off: not measured faster yet (CPU: even; GPU: gpu_check section 7).")


class CheckpointSection(_Section):
    """Training-state checkpoints in the run directory."""

    every_kimg: float = Field(100.0, gt=0, le=1e6, description="Checkpoint interval (also at every stage end).")
    keep: int = Field(3, ge=1, le=1000, description="Newest checkpoints kept; stage-final ones are pruned too.")


class MetricsSection(_Section):
    """Progress reporting, Prometheus exporter and stage-end evaluation."""

    port: int = Field(9108, ge=0, le=65535, description="Prometheus exporter port on the driver (0 = disabled).")
    host: str = Field("0.0.0.0", description="Exporter bind address.")
    linger_s: float = Field(75.0, ge=0, le=3600,
                            description="Seconds the exporter stays up after a run ends (completed, failed or stopped) "
                                        "so Prometheus scrapes the final state (>= 2 scrape intervals; 0 = none).")
    tick_kimg: float = Field(4.0, gt=0, le=1e5,
                             description="One progress line and one Ray report per tick (keep ticks >= a few seconds).")
    tick_kimg_dict: dict[int, float] = Field(default_factory=dict, description="Per-resolution tick overrides.")
    swd_images: int = Field(16384, ge=0, le=1_000_000,
                            description="Images (real and fake) for SWD at each stage end (0 = skip).")
    swd_every_stage: bool = Field(True, description="Evaluate SWD at every stage end, not only at the end.")
    grid_size: int = Field(8, ge=1, le=32, description="Sample grid is grid_size x grid_size images.")


    @field_validator("tick_kimg_dict")
    @classmethod
    def _ticks(cls, v: dict[int, float]) -> dict[int, float]:
        return _positive_per_res(v)

    def tick_nimg(self, res: int) -> int:
        return max(round(self.tick_kimg_dict.get(res, self.tick_kimg) * 1000), 1)


class SweepSection(_Section):
    """Ray Tune sweep over config keys (used by `launch.py sweep`)."""

    search_space: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"schedule.lr_base": {"loguniform": [3e-4, 3e-3]},
                                 "loss.kind": {"choice": ["wgan-gp", "lsgan"]}},
        description="Dotted key -> {grid|choice: [...]} or {uniform|loguniform: [low, high]}.")
    num_samples: int = Field(4, ge=1, le=10000, description="Trials (per grid point).")
    max_concurrent: int = Field(1, ge=1, le=1000, description="Trials running at once.")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="fifo, or asha (early-stops trials on SWD at stage ends).")
    reduction_factor: int = Field(2, ge=2, le=100, description="ASHA: rungs at the first stage end with SWD x this^k; "
                                                               "1/this of the trials at a rung go on.")
    metric: str = Field("swd_avg", description="Metric trials are compared on (lower is better).")

    @field_validator("search_space")
    @classmethod
    def _known_samplers(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in v.items():
            if len(spec) != 1 or next(iter(spec)) not in ("grid", "choice", "uniform", "loguniform"):
                raise ValueError(f"{key}: use exactly one of grid, choice, uniform, loguniform")
            kind, arg = next(iter(spec.items()))
            if not isinstance(arg, list) or not arg:
                raise ValueError(f"{key}: {kind} needs a non-empty list")
            if kind in ("uniform", "loguniform") and len(arg) != 2:
                raise ValueError(f"{key}: {kind} needs [low, high]")
        return v


class RunConfig(_Section):
    """The whole configuration of one run."""

    preset: str | None = Field(None, description="Built-in preset this config starts from (demo, paper, paper-8gpu).")
    run: RunSection = Field(default_factory=RunSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    ema: EmaSection = Field(default_factory=EmaSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    sweep: SweepSection = Field(default_factory=SweepSection)

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        issues = _cross_checks(self)
        if issues:
            raise PydanticCustomError("cross_field", "{summary}",
                                      {"summary": "; ".join(f"{k}: {m}" for k, _, m in issues), "issues": issues})
        return self

    def resolutions(self) -> list[int]:
        """Resolutions trained, from start to max."""
        lo, hi = self.schedule.start_resolution, self.model.max_resolution
        return [r for r in RESOLUTIONS if lo <= r <= hi]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def model_fingerprint(self) -> dict[str, Any]:
        """The fields a checkpoint's tensors depend on: a run directory refuses a config that differs here."""
        return {"model": self.model.model_dump(mode="json"),
                "start_resolution": self.schedule.start_resolution}


def _cross_checks(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    """Checks spanning fields. Returns (dotted key, value, message) for every problem."""
    out: list[tuple[str, Any, str]] = []
    s, m, c = cfg.schedule, cfg.model, cfg.cluster
    if s.start_resolution > m.max_resolution:
        out.append(("schedule.start_resolution", s.start_resolution,
                     f"must be <= model.max_resolution ({m.max_resolution})"))
    if cfg.data.resolution is not None and cfg.data.resolution < m.max_resolution:
        out.append(("data.resolution", cfg.data.resolution,
                     f"data must be at least model.max_resolution ({m.max_resolution})"))
    for res in cfg.resolutions():
        mb = s.minibatch(res)
        key = f"schedule.minibatch_dict.{res}" if res in s.minibatch_dict else "schedule.minibatch_base"
        if mb % c.num_workers:
            out.append((key, mb, f"global minibatch at {res}x{res} must be divisible by cluster.num_workers ({c.num_workers})"))
            continue
        per_worker = mb // c.num_workers
        if m.mbstd_group_size > 1 and mbstd_group(m.mbstd_group_size, per_worker) < 2:
            out.append((key, mb, f"per-worker minibatch {per_worker} at {res}x{res} has no divisor in "
                                 f"2..model.mbstd_group_size ({m.mbstd_group_size}): minibatch-stddev groups would "
                                 "hold one image; use an even minibatch or fewer workers"))
    e = cfg.ema
    if (e.half_life_kimg is None) == (e.beta_per_step is None):
        out.append(("ema.beta_per_step", e.beta_per_step,
                    f"set exactly one of ema.half_life_kimg (got {e.half_life_kimg}) and ema.beta_per_step; "
                    "null the other"))
    if cfg.metrics.swd_images and cfg.metrics.swd_images < 64:
        out.append(("metrics.swd_images", cfg.metrics.swd_images, "use 0 to skip SWD or at least 64 images"))
    if cfg.data.source.startswith("synthetic:") and cfg.data.source != "synthetic:shapes":
        out.append(("data.source", cfg.data.source, "the only built-in dataset is synthetic:shapes"))
    if cfg.preset is not None and cfg.preset not in PRESET_NAMES:
        out.append(("preset", cfg.preset, f"unknown preset; choose one of {', '.join(PRESET_NAMES)}"))
    for key in cfg.sweep.search_space:
        if not _is_config_key(key):
            out.append((f"sweep.search_space.{key}", key, "not a config key"))
    return out


def _is_config_key(dotted: str) -> bool:
    parts = dotted.split(".")
    model: Any = RunConfig
    for p in parts:
        fields = getattr(model, "model_fields", None)
        if fields is None or p not in fields:
            return False
        model = fields[p].annotation
    return True


# --------------------------------------------------------------------------------------------------
# Loading: preset -> YAML file -> --set overrides -> validation, with every problem reported together.

class ConfigError(Exception):
    """Invalid configuration. ``problems`` lists (dotted key, value given, message)."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"config error: {key}: {msg} (got {_short(val)})" for key, val, msg in self.problems]


def _short(v: Any) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _problems_from(err: ValidationError, data: dict[str, Any]) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    for e in err.errors(include_url=False):
        if e["type"] == "cross_field":
            out.extend(tuple(i) for i in e["ctx"]["issues"])
            continue
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference in README.md)"
        out.append((key, e.get("input"), msg))
    return out


def load_preset(name: str) -> dict[str, Any]:
    if name not in PRESET_NAMES:
        raise ConfigError([("preset", name, f"unknown preset; choose one of {', '.join(PRESET_NAMES)}")])
    return yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text()) or {}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested merge; an empty mapping in ``over`` clears the base's (e.g. a preset's per-resolution dict)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """'schedule.minibatch_dict.8=32' -> (['schedule', 'minibatch_dict', '8'], 32). Values are YAML scalars."""
    if "=" not in item:
        raise ConfigError([(item, item, "--set needs the form section.key=value")])
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([(key or item, raw, "--set needs a dotted key such as schedule.lr_base")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_sets(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    problems: list[tuple[str, Any, str]] = []
    for item in sets:
        try:
            parts, value = parse_set(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                problems.append((".".join(parts), value, f"{p} is not a section"))
                break
            node = nxt
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


def validate(data: dict[str, Any]) -> RunConfig:
    """Validate plain data into a RunConfig, raising ConfigError with every problem."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_problems_from(err, data)) from None


def from_json(d: dict[str, Any] | str) -> RunConfig:
    """Re-validate a config that crossed a process boundary as JSON."""
    return validate(json.loads(d) if isinstance(d, str) else d)


def load_config(config_file: str | None = None, preset: str | None = None, sets: list[str] | None = None) -> RunConfig:
    """preset (explicit, or named by the file, or demo) <- YAML file <- --set overrides, then validate."""
    file_data: dict[str, Any] = {}
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as e:
            raise ConfigError([("--config", config_file, f"cannot read the file: {e.strerror}")]) from None
        try:
            file_data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError([("--config", config_file, f"not valid YAML: {e}")]) from None
        if not isinstance(file_data, dict):
            raise ConfigError([("--config", config_file, "the file must hold a mapping of sections")])
    name = preset or file_data.get("preset") or "demo"
    if not isinstance(name, str):
        raise ConfigError([("preset", name, "must be a preset name")])
    data = deep_merge(load_preset(name), file_data)
    data["preset"] = name
    data = apply_sets(data, sets or [])
    return validate(data)


def reference_markdown() -> str:
    """The config reference table in README.md (a test keeps the two identical)."""
    defaults = RunConfig().model_dump(mode="json")
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        if not hasattr(model, "model_fields"):
            lines.append(f"| `{section}` | `{json.dumps(defaults[section])}` | {field.description} |")
            continue
        for name, f in model.model_fields.items():
            default = json.dumps(defaults[section][name])
            if len(default) > 40:
                default = default[:37] + "..."
            lines.append(f"| `{section}.{name}` | `{default}` | {f.description} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pggan.config: print the reference table
    print(reference_markdown())
