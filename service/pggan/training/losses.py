"""The paper's GAN objectives as per-sample losses (Karras et al. 2018, appendix A; official loss.py).

Every function returns one value per sample ([N]); the training step reduces them so that the
gradient equals that of the mean over the global minibatch, whatever the number of workers.
:class:`GanLoss` groups them into the two phases the step runs: ``d_loss`` and ``g_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..models.layers import input_grads_only

if TYPE_CHECKING:
    from ..config import LossSection

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, R, R] -> scores [N]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Loss arithmetic in at least fp32 (scores come out of bf16 autocast as bf16)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def wgan_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, drift: float) -> torch.Tensor:
    """D(fake) - D(real) + drift * D(real)^2; the drift term keeps scores near 0. [N] -> [N]"""
    return fake_scores - real_scores + drift * real_scores.square()


def wgan_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """-D(G(z)). [N] -> [N]"""
    return -fake_scores


def lsgan_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, fake_weight: float) -> torch.Tensor:
    """The paper's LSGAN (Theano code): reals target 0, fakes target 1, the fake term weighted 0.1:
    D(x)^2 + w * (D(G(z)) - 1)^2. [N] -> [N]"""
    return real_scores.square() + fake_weight * (fake_scores - 1.0).square()


def lsgan_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """G pulls D(G(z)) to the real target 0: D(G(z))^2. [N] -> [N]"""
    return fake_scores.square()


def gradient_norms(score_fn: ScoreFn, mixed: torch.Tensor) -> torch.Tensor:
    """Per-sample ||d sum(D(x)) / d x|| at ``mixed``, differentiable w.r.t. D's parameters. [N, ...] -> [N]

    ``mixed`` must be a detached leaf: the double backward then runs only through D. The sum over the
    batch is what the official code differentiates; with minibatch stddev a sample's score also depends
    on its group, and those cross terms are kept, as there.
    """
    mixed = mixed.detach().requires_grad_(True)
    scores = score_fn(mixed)
    with input_grads_only():  # D's convolutions skip their (unused) weight gradients in this pass
        (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    # Sum over C, H, W without flattening (grads may be channels_last); in fp32 under autocast.
    return _wide(grads).square().sum(dim=tuple(range(1, grads.ndim))).sqrt()


@dataclass
class DLossTerms:
    """What the D phase computes, all per sample ([N])."""

    loss: torch.Tensor         # the per-sample D loss to minimize
    real_scores: torch.Tensor  # D(x)
    fake_scores: torch.Tensor  # D(G(z))
    gp: torch.Tensor           # (||grad|| - target)^2, unweighted; zeros for LSGAN


class GDropStrength:
    """Adapts the strength of D's GDrop noise (the paper's LSGAN; official Theano train.py, "fade in D noise if we're
    close to becoming unstable"): after each step, avg = beta * avg + (1 - beta) * clip(D loss, 0, 1) and
    strength = coef * max(avg - lim, 0)^exp. The official loop reads the minibatch's D loss there (its
    ``mb_train_out[1]``). All on the device (no host sync); a non-finite D loss (a skipped step) leaves avg as it is."""

    def __init__(self, coef: float, lim: float = 0.5, exp: float = 2.0, beta: float = 0.9,
                 device: str | torch.device = "cpu") -> None:
        self.coef, self.lim, self.exp, self.beta = coef, lim, exp, beta
        self.avg = torch.zeros((), device=device)  # starts at 0, as the official loop (also on resume)

    @classmethod
    def from_config(cls, cfg: "LossSection", device: str | torch.device = "cpu") -> "GDropStrength | None":
        """None where the config has no noise (wgan-gp by default, or gdrop_coef 0)."""
        return cls(cfg.gdrop, cfg.gdrop_lim, cfg.gdrop_exp, cfg.gdrop_beta, device) if cfg.gdrop > 0 else None

    def update(self, d_loss: torch.Tensor) -> torch.Tensor:
        """One step's mean D loss (0-d) -> the strength for the next step (0-d, on the device)."""
        cur = d_loss.detach().float().clamp(0.0, 1.0)
        cur = torch.where(torch.isfinite(cur), cur, self.avg)
        self.avg = self.avg * self.beta + cur * (1.0 - self.beta)
        return self.coef * (self.avg - self.lim).clamp_min(0.0).pow(self.exp)


class GanLoss:
    """WGAN-GP with drift, or the paper's LSGAN, in two phases:

    - ``d_loss(D, reals, fakes, mix)``: D's per-sample loss (fakes are detached: no gradient reaches G);
    - ``g_loss(D, fakes)``: G's per-sample loss (gradients flow through D into G).
    """

    def __init__(self, cfg: "LossSection") -> None:
        self.kind = cfg.kind
        self.gp_lambda = cfg.gp_lambda
        self.gp_target = cfg.gp_target
        self.drift = cfg.drift
        self.lsgan_fake_weight = cfg.lsgan_fake_weight

    @property
    def needs_mix(self) -> bool:
        """True when d_loss uses per-sample mixing factors (the gradient penalty's interpolation)."""
        return self.kind == "wgan-gp" and self.gp_lambda > 0

    def d_loss(self, score_fn: ScoreFn, reals: torch.Tensor, fakes: torch.Tensor,
               mix: torch.Tensor | None = None, gp_score_fn: ScoreFn | None = None,
               pair_score_fn: ScoreFn | None = None) -> DLossTerms:
        """D phase. ``mix`` [N] in [0, 1): interpolation factors of the gradient penalty
        (x_hat = lerp(real, fake, mix), as the official code); needed when :attr:`needs_mix`.
        ``gp_score_fn``: the same D for the penalty, where ``score_fn`` cannot double-backward (compiled).
        ``pair_score_fn``: scores of [reals; fakes] ([2N]) as two independent minibatches in one pass (the same
        numbers as two ``score_fn`` calls, with half the per-layer overhead)."""
        fakes = fakes.detach()
        if pair_score_fn is not None:
            both = _wide(pair_score_fn(torch.cat([reals, fakes.to(reals.dtype)])))  # [2N]
            real_scores, fake_scores = both.chunk(2)             # [N], [N]
        else:
            real_scores = _wide(score_fn(reals))                 # [N]
            fake_scores = _wide(score_fn(fakes))                 # [N]
        if self.kind == "lsgan":
            loss = lsgan_d_loss(real_scores, fake_scores, self.lsgan_fake_weight)
            return DLossTerms(loss, real_scores, fake_scores, torch.zeros_like(loss))
        loss = wgan_d_loss(real_scores, fake_scores, self.drift)
        gp = torch.zeros_like(loss)
        if self.needs_mix:
            assert mix is not None and mix.shape == (reals.shape[0],), "the gradient penalty needs mix [N]"
            # Under autocast G's output is bf16 while the reals are fp32: mix in the reals' dtype.
            mixed = torch.lerp(reals.detach(), fakes.to(reals.dtype), mix.view(-1, 1, 1, 1).to(reals.dtype))
            gp = (gradient_norms(gp_score_fn or score_fn, mixed) - self.gp_target).square()
            # Official scaling lambda / target^2, so the penalty's size does not depend on the target.
            loss = loss + gp * (self.gp_lambda / self.gp_target**2)
        return DLossTerms(loss, real_scores, fake_scores, gp)

    def g_loss(self, score_fn: ScoreFn, fakes: torch.Tensor) -> torch.Tensor:
        """G phase: per-sample G loss [N] from D's scores of G(z)."""
        fake_scores = _wide(score_fn(fakes))
        if self.kind == "lsgan":
            return lsgan_g_loss(fake_scores)
        return wgan_g_loss(fake_scores)
