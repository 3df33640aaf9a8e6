"""Training: per-sample GAN losses, G_ema, and the step every worker runs (GanTrainer)."""

from .ema import ema_beta, ema_update
from .losses import GanLoss, gradient_norms, lsgan_d_loss, lsgan_g_loss, wgan_d_loss, wgan_g_loss
from .step import GanTrainer, StepNoise, StepOptions, allreduce_sum

__all__ = [
    "GanLoss",
    "GanTrainer",
    "StepNoise",
    "StepOptions",
    "allreduce_sum",
    "ema_beta",
    "ema_update",
    "gradient_norms",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "wgan_d_loss",
    "wgan_g_loss",
]
