"""G_ema: an exponential moving average of G's weights, with its half-life counted in images
(stylegan2-ada-pytorch training_loop: ``ema_beta = 0.5 ** (batch / ema_nimg)``).

The official PG-GAN code uses beta 0.999 per step whatever the minibatch (a half-life of 11.09 kimg at
minibatch 16, 5.3x longer in images at minibatch 3). Counting in images keeps the smoothing the same when
the minibatch or the number of workers changes; ``beta_per_step`` reproduces the official form exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int,
             half_life_kimg: float | None,
             nimg: int | None = None,
             rampup: float | None = None,
             beta_per_step: float | None = None,
             ) -> float:
    """Per-step decay for a step of ``batch`` images: 0.5 ** (batch / half_life_images), or ``beta_per_step``
    when given (the official form: the same decay per step at any minibatch; ``half_life_kimg`` is then unused).

    With ``rampup`` the half-life is capped at ``rampup * nimg`` (images seen so far), so that a short run's
    G_ema does not stay stuck near the random initial weights; with ``beta_per_step`` the cap is the same
    (beta = min(beta_per_step, the capped half-life's beta)). A half-life of 0 copies G.
    """
    if beta_per_step is None and half_life_kimg is None:
        raise ValueError("ema_beta needs half_life_kimg or beta_per_step")
    cap: float | None = None
    if rampup is not None and nimg is not None:
        cap = nimg * rampup
    if beta_per_step is not None:
        if cap is None:
            return float(beta_per_step)
        return 0.0 if cap <= 0 else min(float(beta_per_step), 0.5 ** (batch / cap))
    half_life = half_life_kimg * 1000.0
    if cap is not None:
        half_life = min(half_life, cap)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch / half_life)


@torch.no_grad()
def ema_update(ema: nn.Module,
               model: nn.Module,
               beta: float,
               skip: torch.Tensor | None = None,  # 0-dim device flag: 1 leaves ema exactly as it is (no host sync)
               ) -> None:
    """In place: ema = beta * ema + (1 - beta) * model, for every parameter; buffers are copied."""
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    assert len(ema_params) == len(params)
    if skip is not None:
        # lerp(ema, model, w) with w = (1 - beta) * (1 - skip) on the device. w = 0 leaves ema bit for bit;
        # the list form of lerp is exact at w = 1 too (a copy); the fused sub/mul/add form is used where
        # w <= 1/2 always holds, where it rounds as lerp does.
        w = (1.0 - skip.to(ema_params[0].dtype)) * (1.0 - beta)
        if beta >= 0.5:
            delta = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(delta, w)
            torch._foreach_add_(ema_params, delta)
        else:
            torch._foreach_lerp_(ema_params, params, [w] * len(params))
        for b_ema, b in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(torch.where(skip.bool(), b_ema, b))
        return
    if beta == 0.0:
        torch._foreach_copy_(ema_params, params)
    else:
        # lerp(ema, model, 1 - beta) == beta * ema + (1 - beta) * model, one fused pass over all tensors.
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
