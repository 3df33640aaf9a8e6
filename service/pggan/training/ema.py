"""G_ema: an exponential moving average of G's weights, with its half-life counted in images
(stylegan2-ada-pytorch training_loop: ``ema_beta = 0.5 ** (batch / ema_nimg)``).

The official PG-GAN code uses beta 0.999 per step at minibatch 16, a half-life of 11.09 kimg. Counting
in images keeps the smoothing the same when the minibatch or the number of workers changes.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int,
             half_life_kimg: float,
             nimg: int | None = None,
             rampup: float | None = None,
             ) -> float:
    """Per-step decay for a step of ``batch`` images: 0.5 ** (batch / half_life_images).

    With ``rampup`` the half-life is capped at ``rampup * nimg`` (images seen so far), so that a short run's
    G_ema does not stay stuck near the random initial weights. A half-life of 0 copies G.
    """
    half_life = half_life_kimg * 1000.0
    if rampup is not None and nimg is not None:
        half_life = min(half_life, nimg * rampup)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch / half_life)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """In place: ema = beta * ema + (1 - beta) * model, for every parameter; buffers are copied."""
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    assert len(ema_params) == len(params)
    if beta == 0.0:
        torch._foreach_copy_(ema_params, params)
    else:
        # lerp(ema, model, 1 - beta) == beta * ema + (1 - beta) * model, one fused pass over all tensors.
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
