"""One PG-GAN training step, as every worker runs it: D step, G step, G_ema update.

:class:`GanTrainer` owns G, D, G_ema and their Adam optimizers. Per step:

1. noise: latents and gradient-penalty mixing factors, drawn on the device from a generator seeded by
   (run seed, rank, step), so a resumed run draws exactly what an uninterrupted one would;
2. D step: G(z) under no_grad, reals and fakes scored in one D pass (two independent minibatches), per-sample
   D loss (WGAN-GP + drift or LSGAN), backward, gradient sync, finiteness check, Adam;
3. G step: D's parameters frozen (no weight gradients computed for D), per-sample G loss, backward,
   sync, check, Adam;
4. G_ema update (half-life in images, or the official per-step beta).

No host synchronisation on the hot path (``StepOptions.device_skip``, the default): finiteness is a device
flag (``found_inf``, as torch.amp.GradScaler keeps it) that fused Adam reads to skip its update, that masks
the G_ema update, and that feeds device-side counters; the statistics come back as 0-dim device tensors.
Python reads a device value only when asked (``counters.nonfinite_steps``, ``nonfinite_in_row``, float() of a
statistic), i.e. at ticks.

Distributed data parallel, two ways (``dist_mode``):

- ``"allreduce"`` (default when torch.distributed is initialized with more than one rank): no DDP
  wrapper. Gradients are summed across ranks by async all-reduces of buckets (about
  ``StepOptions.bucket_mb`` each) launched from post-accumulate-grad hooks while the backward pass runs, as
  DDP does: a bucket goes out once its last gradient is accumulated and every earlier bucket has gone, in
  an order rank 0 fixes (broadcast) the first time a (network, resolution, fade) combination is seen; that
  first pass, and any run with a custom ``grad_sync`` or ``overlap_grad_sync=False``, sums one flat buffer
  after the backward instead (stylegan2-ada style). The gradient penalty's inner ``autograd.grad`` does not
  accumulate into ``.grad``, so only the outer backward fires the hooks, once per parameter with its whole
  gradient; blocks unused at the current resolution never fire and are not in the plan.
- ``"ddp"``: G and D wrapped in DistributedDataParallel(find_unused_parameters=True).

Either way per-sample losses are reduced as sum / global_batch (scaled by the world size under DDP,
which averages), so the gradient every rank applies is that of the mean over the global minibatch.

A step whose D gradients are not finite changes nothing (no weight, no optimizer state, no G_ema) and
is counted; if only G's gradients are not finite, D's update stands and G and G_ema are left as they
were. Either way the images count as shown (the schedule advances), as in the official code.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..models.networks import Discriminator, Generator, blend_reals, build_networks
from .ema import ema_beta, ema_update
from .losses import GanLoss, GDropStrength

if TYPE_CHECKING:
    from ..config import EmaSection, LossSection, ModelSection, OptimSection, RunConfig

GradSync = Callable[[torch.Tensor], None]  # sums a flat gradient buffer across ranks, in place
DistMode = Literal["auto", "local", "allreduce", "ddp"]
STAT_KEYS = ("loss_D", "gp", "score_real", "score_fake", "loss_G", "nonfinite")


def allreduce_sum(group: Any = None) -> GradSync:
    """The default gradient sync: one SUM all-reduce of the flattened gradients on ``group``."""

    def sync(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)

    return sync


@dataclass
class StepOptions:
    """How the step computes. None of these changes the math (bf16 aside); they are speed levers."""

    amp: Literal["auto", "bf16", "none"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True        # NHWC activations
    compile: bool = False             # torch.compile G, and D where no double backward runs through it
    compile_backend: str = "inductor" # torch.compile backend ("aot_eager": traced, no code generation)
    no_grad_fakes: bool = True        # D step: G(z) under no_grad (else G's graph is built and dropped)
    freeze_d_in_g_step: bool = True   # G step: D.requires_grad_(False) (else D's weight grads are computed)
    one_d_pass: bool = True           # D step: reals and fakes scored in one D pass of 2N (minibatch-stddev
                                      # groups kept within each half), not two passes of N
    fused_adam: bool | None = None    # None: fused Adam where torch has it (CPU and CUDA float params)
    device_skip: bool | None = None   # non-finite steps skipped by a device flag (fused Adam's found_inf, a
                                      # masked G_ema): no host sync. False (or foreach Adam): the host reads
                                      # the flag twice per step and skips in Python. None: on except on CPU,
                                      # where reading a CPU tensor costs nothing and Python skips are cheapest
    overlap_grad_sync: bool = True    # allreduce mode: bucketed async all-reduce during backward
    bucket_mb: float = 25.0           # bucket size for overlap_grad_sync (the first bucket is 1/25 of it, as DDP)
    cudnn_benchmark: bool = True      # CUDA: let cuDNN pick the fastest kernels per shape (a process-wide flag)


@dataclass
class StepNoise:
    """The random inputs of one step on one rank."""

    z_d: torch.Tensor  # [N, L] latents for the D step
    z_g: torch.Tensor  # [N, L] latents for the G step
    mix: torch.Tensor  # [N] gradient-penalty interpolation factors in [0, 1)


class _Counters:
    """Images and steps are host ints; the non-finite counts live on the device (no sync per step) and are
    read as ints (one sync) when asked."""

    def __init__(self, device: torch.device) -> None:
        self.nimg = 0  # images shown to D (global), including skipped steps
        self.steps = 0  # train_step calls
        self.nonfinite_dev = torch.zeros((), dtype=torch.int64, device=device)  # steps with non-finite gradients
        self.in_row_dev = torch.zeros((), dtype=torch.int64, device=device)     # ... consecutive, up to now

    @property
    def nonfinite_steps(self) -> int:
        return int(self.nonfinite_dev.item())

    @nonfinite_steps.setter
    def nonfinite_steps(self, value: int) -> None:
        self.nonfinite_dev.fill_(int(value))

    def count(self, bad: torch.Tensor) -> None:
        """Add one step; ``bad`` is a 0-dim 0/1 device tensor."""
        bad = bad.to(torch.int64)
        self.nonfinite_dev.add_(bad)
        self.in_row_dev.add_(1).mul_(bad)


class _BucketPlan:
    """Which parameters one backward pass reduces, in buckets, in launch order."""

    def __init__(self, order: list[int], sizes: list[int], bucket_bytes: int, elem_bytes: int) -> None:
        self.buckets: list[list[int]] = []
        cap, cur, cur_bytes = max(bucket_bytes // 25, 1), [], 0  # a small first bucket starts traffic early
        for i in order:
            cur.append(i)
            cur_bytes += sizes[i] * elem_bytes
            if cur_bytes >= cap:
                self.buckets.append(cur)
                cap, cur, cur_bytes = bucket_bytes, [], 0
        if cur:
            self.buckets.append(cur)
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}


class OverlappedGradSync:
    """Sums a module's gradients across ranks while its backward pass runs (see the module docstring).

    Usage per backward: ``begin(key)``; ``loss.backward()``; ``flats = finish()``. ``key`` names the set of
    parameters that get a gradient (the same on every rank). Hooks outside begin/finish do nothing.
    """

    def __init__(self, module: nn.Module, group: Any = None, bucket_mb: float = 25.0) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.group = group
        self.bucket_bytes = max(int(bucket_mb * 2**20), 1)
        self.plans: dict[Any, _BucketPlan] = {}
        self._key: Any = None
        self._plan: _BucketPlan | None = None
        self._seen: list[int] = []
        self._remaining: list[int] = []
        self._next = 0
        self._works: list[tuple[Any, torch.Tensor, list[int]]] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def on_grad(_p: torch.Tensor) -> None:
            if self._key is None:
                return
            if self._plan is None:
                self._seen.append(i)
                return
            b = self._plan.bucket_of.get(i)
            if b is None:
                return  # not in the plan (cannot happen for a fixed key); finish() reduces it flat
            self._remaining[b] -= 1
            while self._next < len(self._plan.buckets) and self._remaining[self._next] == 0:
                self._launch(self._next)
                self._next += 1

        return on_grad

    def _launch(self, b: int) -> None:
        idx = self._plan.buckets[b]  # type: ignore[union-attr]
        grads = [self.params[i].grad for i in idx]
        flat = torch.cat([g.reshape(-1) if g is not None else self.params[i].new_zeros(self.sizes[i])
                          for i, g in zip(idx, grads)])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._works.append((work, flat, idx))

    def begin(self, key: Any) -> None:
        self._key = key
        self._plan = self.plans.get(key)
        self._seen, self._works, self._next = [], [], 0
        if self._plan is not None:
            self._remaining = [len(b) for b in self._plan.buckets]

    def finish(self) -> list[torch.Tensor]:
        """Wait for the reductions, write the sums into ``.grad``; returns the flat reduced buffers."""
        plan, key = self._plan, self._key
        self._key = None
        if plan is None:
            # First pass for this key: one flat all-reduce, and rank 0's readiness order becomes the plan.
            with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
            order = list(dict.fromkeys(i for i in self._seen if self.params[i].grad is not None))
            seen = set(order)
            order += [i for i in with_grad if i not in seen]
            t = torch.tensor(order, dtype=torch.int64, device=self.params[0].device)
            dist.broadcast(t, src=0, group=self.group)
            order = t.tolist()
            elem = self.params[0].element_size()
            self.plans[key] = _BucketPlan(order, self.sizes, self.bucket_bytes, elem)
            grads = [self.params[i].grad for i in order]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            _copy_flat_into(flat, grads)
            return [flat]
        while self._next < len(plan.buckets):  # only if some hook did not fire: reduce the rest now
            self._launch(self._next)
            self._next += 1
        flats = []
        for work, flat, idx in self._works:
            work.wait()
            grads = [self.params[i].grad for i in idx]
            if any(g is None for g in grads):
                for i in idx:
                    if self.params[i].grad is None:
                        self.params[i].grad = torch.zeros_like(self.params[i])
                grads = [self.params[i].grad for i in idx]
            _copy_flat_into(flat, grads)
            flats.append(flat)
        self._works = []
        return flats


def _copy_flat_into(flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
    torch._foreach_copy_(grads, [v.view(g.shape) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])


def _found_inf(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 if any element of ``tensors`` is not finite, else 0.0: a float32 0-dim device tensor (the form fused
    Adam's ``found_inf`` takes). A norm per tensor (NaN or inf if any element is) is one fused pass."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
    return (~torch.isfinite(norms.sum())).float()


class GanTrainer:
    """G, D, G_ema, both Adams, and the training step. See the module docstring."""

    def __init__(self,
                 model_cfg: "ModelSection",   # architecture
                 loss_cfg: "LossSection",     # wgan-gp | lsgan and weights
                 optim_cfg: "OptimSection",   # Adam betas, eps
                 ema_cfg: "EmaSection",       # G_ema half-life (kimg) or beta per step, and ramp-up
                 device: str | torch.device = "cpu",
                 options: StepOptions | None = None,
                 dist_mode: DistMode = "auto",  # auto: allreduce if torch.distributed has > 1 rank, else local
                 grad_sync: GradSync | None = None,  # allreduce mode: custom sum of the flat gradients (no overlap)
                 seed: int = 0,                # weights (same on every rank) and per-rank noise
                 lr: float = 0.001,            # initial learning rate (reset_optimizers / set_lr change it)
                 dtype: torch.dtype = torch.float32,  # parameter dtype (float64 for exactness tests)
                 ) -> None:
        self.device = torch.device(device)
        self.opts = options or StepOptions()
        self.loss = GanLoss(loss_cfg)
        self.optim_cfg = optim_cfg
        self.ema_cfg = ema_cfg
        self.seed = seed
        self.dtype = dtype
        self.latent_size = model_cfg.latent_size
        self.counters = _Counters(self.device)

        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        if dist_mode == "auto":
            dist_mode = "allreduce" if self.world_size > 1 else "local"
        if dist_mode in ("allreduce", "ddp") and not distributed:
            raise ValueError(f"dist_mode={dist_mode!r} needs an initialized torch.distributed process group")
        self.dist_mode = dist_mode

        amp = self.opts.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "none"
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        self.memory_format = torch.channels_last if self.opts.channels_last else torch.contiguous_format
        if self.device.type == "cuda" and self.opts.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True

        # Same weights on every rank: built from the run seed without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            G, D = build_networks(model_cfg, gdrop=loss_cfg.gdrop > 0)
        self.G: Generator = G.to(self.device, dtype)
        self.D: Discriminator = D.to(self.device, dtype)
        self.G.set_memory_format(self.memory_format)
        self.D.set_memory_format(self.memory_format)
        if dist_mode != "local":
            _broadcast_params([*self.G.parameters(), *self.D.parameters()])  # (DDP would, too; G_ema needs it first)
        self.G_ema: Generator = copy.deepcopy(self.G).eval().requires_grad_(False)

        self._setup_parallel(grad_sync)
        if self.opts.compile:
            self._setup_compile()
        self._gen = torch.Generator(self.device)
        self.gdrop = GDropStrength.from_config(loss_cfg, self.device)  # the paper's LSGAN noise in D, or None
        self.lr = lr
        self.reset_optimizers(lr)

    def _setup_parallel(self, grad_sync: GradSync | None) -> None:
        """The callables that get gradients: G and D themselves, or their DDP wrappers."""
        self._grad_sync: GradSync | None = None
        self._overlap: dict[str, OverlappedGradSync] = {}
        self._G_train: Callable[..., torch.Tensor] = self.G
        self._D_train: Callable[..., torch.Tensor] = self.D
        if self.dist_mode == "allreduce":
            if grad_sync is None and self.opts.overlap_grad_sync:
                self._overlap = {"G": OverlappedGradSync(self.G, bucket_mb=self.opts.bucket_mb),
                                 "D": OverlappedGradSync(self.D, bucket_mb=self.opts.bucket_mb)}
            else:
                self._grad_sync = grad_sync or allreduce_sum()
        elif self.dist_mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: blocks above the current resolution get no gradient.
            self._G_train = DDP(self.G, device_ids=ids, find_unused_parameters=True)
            self._D_train = DDP(self.D, device_ids=ids, find_unused_parameters=True)
        # DDP averages gradients; our per-sample losses are summed and divided by the global batch.
        self._loss_world_factor = self.world_size if self.dist_mode == "ddp" else 1
        self._G_nograd: Callable[..., torch.Tensor] = self.G     # D step's fakes
        self._D_scores: Callable[..., torch.Tensor] = self._D_train  # D step, reals and fakes
        self._D_frozen: Callable[..., torch.Tensor] = self.D     # G step: a path for G's gradient, no reducer

    def _setup_compile(self) -> None:
        # One graph per (resolution, fade or stable, grad mode): more than dynamo's default limit of 8.
        dynamo_cfg = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(dynamo_cfg, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_cfg, limit_name, max(getattr(dynamo_cfg, limit_name), 64))
        # Double backward does not run through compiled graphs: the gradient penalty's D stays eager.
        backend = self.opts.compile_backend
        self._G_nograd = self._alpha_as_tensor(torch.compile(self.G, backend=backend))
        self._G_train = self._alpha_as_tensor(torch.compile(self._G_train, backend=backend))
        self._D_scores = self._alpha_as_tensor(torch.compile(self._D_train, backend=backend))
        self._D_frozen = self._alpha_as_tensor(torch.compile(self.D, backend=backend))

    def _alpha_as_tensor(self, compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """A fade-in's alpha changes every step: as a Python float each value would be a new graph (dynamo
        guards on it), as a 0-dim device tensor (a fill kernel, no host sync) it is an input of one graph.
        A fresh tensor per call: autograd saves it for the backward pass."""
        device = self.device

        def call(x: torch.Tensor, res: int, alpha: float = 1.0, **kw: Any) -> torch.Tensor:
            a = torch.full((), float(alpha), device=device, dtype=torch.float32)
            return compiled(x, res, a, fade=alpha < 1.0, **kw)

        return call

    @classmethod
    def from_config(cls, cfg: "RunConfig", device: str | torch.device = "cpu", **kwargs: Any) -> "GanTrainer":
        """A trainer for a validated run config (seed, model, loss, optim, ema, cluster.amp/channels_last/compile)."""
        options = kwargs.pop("options", None) or StepOptions(amp=cfg.cluster.amp,
                                                             channels_last=cfg.cluster.channels_last,
                                                             compile=cfg.cluster.compile)
        return cls(cfg.model, cfg.loss, cfg.optim, cfg.ema, device=device, options=options, seed=cfg.run.seed,
                   lr=kwargs.pop("lr", cfg.schedule.lr_base), **kwargs)

    # ------------------------------------------------------------------------------------------ optimizers

    def _adam(self, params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
        fused = self.opts.fused_adam
        if fused is None:
            fused = self.device.type in ("cpu", "cuda")
        return torch.optim.Adam(params, lr=lr, betas=(self.optim_cfg.beta1, self.optim_cfg.beta2),
                                eps=self.optim_cfg.eps, fused=fused or None, foreach=None if fused else True)

    def reset_optimizers(self, lr: float) -> None:
        """Fresh Adam state for G and D (the paper resets it at the start of every stage)."""
        self.lr = lr
        self.opt_G = self._adam(list(self.G.parameters()), lr)
        self.opt_D = self._adam(list(self.D.parameters()), lr)

    def set_lr(self, lr: float) -> None:
        """Change the learning rate of both optimizers, keeping their state (lr ramp-up)."""
        self.lr = lr
        for opt in (self.opt_G, self.opt_D):
            for group in opt.param_groups:
                group["lr"] = lr

    @property
    def _skip_on_device(self) -> bool:
        """Fused Adam takes a device found_inf flag; foreach Adam does not, so it skips on the host."""
        on = self.device.type != "cpu" if self.opts.device_skip is None else self.opts.device_skip
        return on and bool(self.opt_D.defaults.get("fused"))

    # ----------------------------------------------------------------------------------------------- step

    @property
    def nimg(self) -> int:
        return self.counters.nimg

    @nimg.setter
    def nimg(self, value: int) -> None:
        self.counters.nimg = int(value)

    @property
    def nonfinite_in_row(self) -> int:
        """Consecutive non-finite steps up to now (0 after a good step). Reads the device: call it at ticks."""
        return int(self.counters.in_row_dev.item())

    def sample_noise(self, n: int, step: int | None = None) -> StepNoise:
        """Latents and mixing factors for ``n`` samples, a pure function of (seed, rank, step)."""
        step = self.counters.steps if step is None else step
        s = np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1, dtype=np.uint64)[0]
        self._gen.manual_seed(int(s) & (2**63 - 1))
        z_d = torch.randn(n, self.latent_size, generator=self._gen, device=self.device, dtype=self.dtype)
        z_g = torch.randn(n, self.latent_size, generator=self._gen, device=self.device, dtype=self.dtype)
        mix = torch.rand(n, generator=self._gen, device=self.device, dtype=self.dtype)
        return StepNoise(z_d, z_g, mix)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self,
                   reals: torch.Tensor,            # [N, 3, res, res] this rank's images in [-1, 1], not yet faded
                   res: int,                       # current resolution
                   alpha: float,                   # fade-in alpha (1.0 in stable stages)
                   nimg: int | None = None,        # images seen before this step (default: the counter)
                   global_batch: int | None = None,  # images over all ranks (default: N * world size)
                   noise: StepNoise | None = None,  # default: sample_noise(N)
                   ) -> dict[str, torch.Tensor]:
        """One D step, one G step and the G_ema update. Returns this rank's means as 0-dim float32 tensors
        on the trainer's device (sum them across steps as they are; float() only at ticks): loss_D, gp
        (unweighted penalty), score_real, score_fake, loss_G, and nonfinite (0 or 1; 1 when D's or G's
        gradients were not finite and the step was skipped)."""
        n = reals.shape[0]
        assert reals.shape[1:] == (3, res, res), f"reals {tuple(reals.shape)} are not 3x{res}x{res}"
        if nimg is not None:
            self.counters.nimg = int(nimg)
        gb = global_batch or n * self.world_size
        loss_scale = self._loss_world_factor / gb
        noise = noise or self.sample_noise(n)
        reals = reals.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=self.memory_format)
        reals = blend_reals(reals, res, alpha)                     # [N, 3, res, res]
        key = (res, alpha < 1.0)

        d_bad, d_stats = self._d_step(reals, res, alpha, noise, loss_scale, key)
        if self._skip_on_device or not bool(d_bad):  # (host decisions: no G step at all after a bad D step)
            g_bad, loss_g = self._g_step(n, res, alpha, noise, loss_scale, key, d_bad)  # D bad: G skips too
        else:
            g_bad, loss_g = d_bad, torch.full((), float("nan"), device=self.device)
        beta = ema_beta(gb, self.ema_cfg.half_life_kimg, self.counters.nimg, self.ema_cfg.rampup,
                        self.ema_cfg.beta_per_step)
        if self._skip_on_device:
            ema_update(self.G_ema, self.G, beta, skip=g_bad)
        elif not bool(g_bad):
            ema_update(self.G_ema, self.G, beta)

        if self.gdrop is not None:  # ---- the paper's LSGAN: D's noise follows its loss (for the next step)
            self.D.gdrop_strength.copy_(self.gdrop.update(d_stats[0]))

        self.counters.nimg += gb
        self.counters.steps += 1
        self.counters.count(g_bad)
        stats = torch.stack([*d_stats, loss_g.float(), g_bad.float()])
        return dict(zip(STAT_KEYS, stats.unbind()))

    def _d_step(self, reals: torch.Tensor, res: int, alpha: float, noise: StepNoise, loss_scale: float,
                key: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.opt_D.zero_grad(set_to_none=True)
        sync = self._overlap.get("D")
        if sync is not None:
            sync.begin(key)
        with self._autocast():
            if self.opts.no_grad_fakes:
                with torch.no_grad():
                    fakes = self._G_nograd(noise.z_d, res, alpha)  # [N, 3, res, res]
            else:
                fakes = self._G_train(noise.z_d, res, alpha).detach()
            pair = (lambda x: self._D_scores(x, res, alpha, segments=2)) if self.opts.one_d_pass else None
            terms = self.loss.d_loss(lambda x: self._D_scores(x, res, alpha), reals, fakes, noise.mix,
                                     gp_score_fn=lambda x: self._D_train(x, res, alpha), pair_score_fn=pair)
            loss = terms.loss.sum() * loss_scale
        loss.backward()
        bad = self._reduce_grads(self.D, sync)
        self._adam_step(self.opt_D, bad)
        stats = [t.detach().mean().float() for t in (terms.loss, terms.gp, terms.real_scores, terms.fake_scores)]
        return bad, stats

    def _g_step(self, n: int, res: int, alpha: float, noise: StepNoise, loss_scale: float, key: Any,
                d_bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.opt_G.zero_grad(set_to_none=True)
        sync = self._overlap.get("G")
        if sync is not None:
            sync.begin(key)
        # D is only a path for G's gradient here: the raw module (no DDP reducer), weights frozen.
        if self.opts.freeze_d_in_g_step:
            self.D.requires_grad_(False)
        try:
            with self._autocast():
                fakes = self._G_train(noise.z_g, res, alpha)      # [N, 3, res, res]
                per_sample = self.loss.g_loss(lambda x: self._D_frozen(x, res, alpha), fakes)  # [N]
                loss = per_sample.sum() * loss_scale
            loss.backward()
        finally:
            self.D.requires_grad_(True)
        if not self.opts.freeze_d_in_g_step:
            self.opt_D.zero_grad(set_to_none=True)
        bad = torch.maximum(self._reduce_grads(self.G, sync), d_bad)  # a skipped D step skips G's too
        self._adam_step(self.opt_G, bad)
        return bad, per_sample.detach().mean()

    def _adam_step(self, opt: torch.optim.Adam, bad: torch.Tensor) -> None:
        if self._skip_on_device:
            opt.found_inf = bad  # fused Adam: no update and no step count where bad == 1 (GradScaler's protocol)
            try:
                opt.step()
            finally:
                opt.found_inf = None
        elif not bool(bad):
            opt.step()

    def _reduce_grads(self, module: nn.Module, sync: OverlappedGradSync | None) -> torch.Tensor:
        """Sum gradients across ranks (allreduce mode) and return the device flag "some gradient is not
        finite" (float32 0/1, the same on every rank: it is computed from the summed gradients)."""
        if sync is not None:
            return _found_inf(sync.finish(), self.device)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if not grads or self._grad_sync is None:
            # Local or DDP (already reduced): a norm per tensor is cheaper than a flat copy.
            return _found_inf(grads, self.device)
        # Every rank runs the same resolution and alpha, so the set of parameters with gradients (and the
        # flat layout) is the same on all ranks.
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._grad_sync(flat)
        _copy_flat_into(flat, grads)
        return _found_inf([flat], self.device)

    # --------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: networks, optimizers, counters. Tensors and plain types only, so
        ``torch.load(..., weights_only=True)`` reads it."""
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "counters": {"nimg": self.counters.nimg, "steps": self.counters.steps,
                         "nonfinite_steps": self.counters.nonfinite_steps, "lr": self.lr, "seed": self.seed},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (on any device; tensors are moved here)."""
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        c = state["counters"]
        self.reset_optimizers(float(c["lr"]))
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        _match_state_layout(self.opt_G)
        _match_state_layout(self.opt_D)
        self.counters.nimg = int(c["nimg"])
        self.counters.steps = int(c["steps"])
        self.counters.nonfinite_steps = int(c["nonfinite_steps"])
        self.counters.in_row_dev.zero_()


@torch.no_grad()
def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Lay out each loaded optimizer state tensor as its parameter is (a checkpoint written with another
    ``channels_last`` setting has the other layout). Fused Adam walks parameter, gradient and moments as flat
    memory, so a moment in another layout than its parameter would be updated at the wrong elements."""
    for p, st in opt.state.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)


@torch.no_grad()
def _broadcast_params(params: list[nn.Parameter], src: int = 0) -> None:
    """Make every rank start from rank ``src``'s weights (one flat broadcast)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=src)
    torch._foreach_copy_(params, [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params)])
