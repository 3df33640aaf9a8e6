"""The paper's generator and discriminator (Karras et al. 2018, table 2; official TF G_paper / D_paper).

Both are built once at full size and take the resolution and the fade-in alpha as inputs, so the
state_dict never changes shape during a run. Blocks are named by the resolution they produce (G) or
consume (D): ``G.blocks["8"]`` maps 4x4 features to 8x8, ``D.blocks["8"]`` maps 8x8 features to 4x4.
Layers above the current resolution take no part in the forward pass (and get no gradient).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers import (
    SQRT2,
    ConvDown2d,
    EqualizedConv2d,
    EqualizedLinear,
    GDrop,
    MinibatchStdDev,
    PixelNorm,
    UpConv2d,
    downsample2x,
    lrelu,
    set_memory_format,
    upsample2x,
)
from ..resolution import RULE, is_valid, levels

if TYPE_CHECKING:
    from ..config import ModelSection

IMG_CHANNELS = 3


def num_channels(res: int, fmap_base: int, fmap_max: int) -> int:
    """Feature maps of the block at resolution ``res``: min(fmap_base / 2^(log2(res) - 1), fmap_max).

    Paper (8192, 512): 512 for 4..32, then 256, 128, 64, 32, 16 at 1024. ``res=2`` gives the width of
    D's penultimate dense layer (official nf(0)).
    """
    n = min(int(fmap_base / 2.0 ** (int(math.log2(res)) - 1)), fmap_max)
    if n < 1:
        raise ValueError(f"fmap_base {fmap_base} leaves no channels at {res}x{res}")
    return n


def _resolutions(max_resolution: int) -> list[int]:
    if not is_valid(max_resolution):
        raise ValueError(f"max_resolution {max_resolution} {RULE}")
    return levels(max_resolution)


def _check_res(res: int, max_resolution: int) -> None:
    if not (is_valid(res) and res <= max_resolution):
        raise ValueError(f"resolution {res} is not a power of two in 4..{max_resolution}")


def blend_reals(x: torch.Tensor, res: int, alpha: float) -> torch.Tensor:
    """Fade real images the way G's output fades: lerp(nearest_up(avgpool(x)), x, alpha).

    During a fade-in G outputs a blend of the upsampled previous-resolution image and the new one; the
    reals shown to D are blended with the same alpha so they have the same mix of detail (official
    training_loop process_reals, 'FadeLOD').
    """
    assert x.shape[-1] == res and x.shape[-2] == res, f"reals {tuple(x.shape)} are not {res}x{res}"
    if alpha >= 1.0 or res <= 4:
        return x
    return torch.lerp(upsample2x(downsample2x(x)), x, alpha)


class GInitialBlock(nn.Module):
    """Latent -> 4x4 features: pixelnorm(z), dense (official gain sqrt(2)/4), bias, lrelu, pixelnorm,
    conv3x3, lrelu, pixelnorm."""

    def __init__(self,
                 latent_size: int,  # length of z
                 channels: int,     # feature maps at 4x4
                 ) -> None:
        super().__init__()
        self.channels = channels
        self.norm = PixelNorm()
        # The paper's "Conv 4x4" on a 1x1 input is a dense layer; its bias is per channel, added after the reshape.
        self.dense = EqualizedLinear(latent_size, channels * 16, gain=SQRT2 / 4, bias=False)
        self.dense_bias = nn.Parameter(torch.zeros(channels))
        self.conv = EqualizedConv2d(channels, channels, 3)
        self.memory_format = torch.contiguous_format

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [N, L] -> [N, C, 4, 4]
        x = self.dense(self.norm(z)).view(-1, self.channels, 4, 4)
        x = x.contiguous(memory_format=self.memory_format)
        x = self.norm(lrelu(x + self.dense_bias.view(1, -1, 1, 1)))
        return self.norm(lrelu(self.conv(x)))


class GBlock(nn.Module):
    """R/2 -> R: upsample + conv3x3 (fused), lrelu, pixelnorm, conv3x3, lrelu, pixelnorm."""

    def __init__(self,
                 in_channels: int,   # feature maps at R/2
                 out_channels: int,  # feature maps at R
                 fused: bool = True,  # transposed conv for upsample + conv
                 ) -> None:
        super().__init__()
        self.norm = PixelNorm()
        self.conv0 = UpConv2d(in_channels, out_channels, fused=fused)
        self.conv1 = EqualizedConv2d(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, Cin, H, W] -> [N, Cout, 2H, 2W]
        x = self.norm(lrelu(self.conv0(x)))
        return self.norm(lrelu(self.conv1(x)))


class Generator(nn.Module):
    """PG-GAN generator at full size; ``forward(z, res, alpha)`` gives [N, 3, res, res] images in about
    [-1, 1] (toRGB is linear)."""

    def __init__(self,
                 latent_size: int = 512,      # z length
                 max_resolution: int = 1024,  # the network is built up to here
                 fmap_base: int = 8192,       # channel rule, see num_channels
                 fmap_max: int = 512,         # channel cap
                 fused_scale: bool = True,    # fused upsample + conv
                 ) -> None:
        super().__init__()
        self.latent_size = latent_size
        self.max_resolution = max_resolution
        res_list = _resolutions(max_resolution)
        ch = {r: num_channels(r, fmap_base, fmap_max) for r in res_list}
        blocks: dict[str, nn.Module] = {"4": GInitialBlock(latent_size, ch[4])}
        for r in res_list[1:]:
            blocks[str(r)] = GBlock(ch[r // 2], ch[r], fused=fused_scale)
        self.blocks = nn.ModuleDict(blocks)
        self.to_rgb = nn.ModuleDict({str(r): EqualizedConv2d(ch[r], IMG_CHANNELS, 1, gain=1.0) for r in res_list})

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """Feature maps start in this layout (channels_last speeds up CPU and GPU convolutions), and the
        convolution weights follow it (:func:`pggan.models.layers.set_memory_format`)."""
        self.blocks["4"].memory_format = memory_format
        set_memory_format(self, memory_format)

    def forward(self, z: torch.Tensor, res: int, alpha: float | torch.Tensor = 1.0,
                fade: bool | None = None) -> torch.Tensor:
        """``alpha`` may be a 0-dim tensor with ``fade`` given (compiled callers: a new alpha every step must
        not be a new graph); ``fade`` defaults to ``alpha < 1``."""
        _check_res(res, self.max_resolution)
        assert z.ndim == 2 and z.shape[1] == self.latent_size, f"z {tuple(z.shape)}"
        x = self.blocks["4"](z)                                   # [N, C4, 4, 4]
        if res == 4:
            return self.to_rgb["4"](x)
        r = 8
        while r < res:
            x = self.blocks[str(r)](x)
            r *= 2
        # x: [N, C(res/2), res/2, res/2]
        img = self.to_rgb[str(res)](self.blocks[str(res)](x))    # [N, 3, res, res]
        if _fading(alpha, fade):
            prev = upsample2x(self.to_rgb[str(res // 2)](x))     # [N, 3, res, res]
            img = _lerp(prev, img, alpha)
        assert img.shape[1:] == (IMG_CHANNELS, res, res)
        return img


class DBlock(nn.Module):
    """R -> R/2: conv3x3, lrelu, conv3x3 + avgpool (fused), lrelu; with ``strength``, GDrop noise on each conv's
    input (official D_paper)."""

    def __init__(self,
                 in_channels: int,   # feature maps at R
                 out_channels: int,  # feature maps at R/2
                 fused: bool = True,  # strided conv for conv + avgpool
                 ) -> None:
        super().__init__()
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3, fast_double_backward=True)
        self.conv1 = ConvDown2d(in_channels, out_channels, fused=fused, fast_double_backward=True)
        self.gdrop = GDrop()

    def forward(self,
                x: torch.Tensor,                      # [N, Cin, H, W]
                strength: torch.Tensor | None = None,  # GDrop strength (None: no noise)
                ) -> torch.Tensor:                    # [N, Cout, H/2, W/2]
        x = lrelu(self.conv0(self.gdrop(x, strength)))
        return lrelu(self.conv1(self.gdrop(x, strength)))


class DFinalBlock(nn.Module):
    """4x4 features -> score: minibatch stddev, conv3x3, lrelu, dense 4x4xC -> C0, lrelu, dense -> 1 (gain 1)."""

    def __init__(self,
                 channels: int,        # feature maps at 4x4
                 dense_channels: int,  # width of the penultimate dense layer (official nf(0))
                 mbstd_group_size: int = 4,  # 0 or 1: no minibatch-stddev layer (official)
                 ) -> None:
        super().__init__()
        self.mbstd = MinibatchStdDev(mbstd_group_size) if mbstd_group_size > 1 else None
        self.conv = EqualizedConv2d(channels + (1 if self.mbstd is not None else 0), channels, 3,
                                    fast_double_backward=True)
        self.dense0 = EqualizedLinear(channels * 16, dense_channels)
        self.dense1 = EqualizedLinear(dense_channels, 1, gain=1.0)
        self.gdrop = GDrop()

    def forward(self, x: torch.Tensor, segments: int = 1,
                strength: torch.Tensor | None = None,  # GDrop strength (None: no noise)
                ) -> torch.Tensor:  # [N, C, 4, 4] -> [N]
        if self.mbstd is not None:
            x = self.mbstd(x, segments)                           # [N, C+1, 4, 4]
        x = lrelu(self.conv(self.gdrop(x, strength)))             # [N, C, 4, 4]
        # The dense 4x4xC -> C0 layer is the official 4x4 conv without padding: GDrop on its input too.
        x = lrelu(self.dense0(self.gdrop(x, strength).flatten(1)))  # [N, C0]; NCHW order as the official flatten
        return self.dense1(x).squeeze(1)                          # [N]


class Discriminator(nn.Module):
    """PG-GAN discriminator at full size; ``forward(x, res, alpha)`` gives [N] scores for [N, 3, res, res]."""

    def __init__(self,
                 max_resolution: int = 1024,  # the network is built up to here
                 fmap_base: int = 8192,       # channel rule, see num_channels
                 fmap_max: int = 512,         # channel cap
                 mbstd_group_size: int = 4,   # minibatch-stddev group (0 disables)
                 fused_scale: bool = True,    # fused conv + avgpool
                 gdrop: bool = False,         # the paper's LSGAN noise (GDrop) before each conv, at gdrop_strength
                 ) -> None:
        super().__init__()
        self.max_resolution = max_resolution
        # Set during training (GanTrainer, from losses.GDropStrength); not saved: the official code restarts
        # its adaptation on resume as well. 0 = no noise.
        self.register_buffer("gdrop_strength", torch.zeros(()) if gdrop else None, persistent=False)
        res_list = _resolutions(max_resolution)
        ch = {r: num_channels(r, fmap_base, fmap_max) for r in [2, *res_list]}
        blocks: dict[str, nn.Module] = {"4": DFinalBlock(ch[4], ch[2], mbstd_group_size)}
        for r in res_list[1:]:
            blocks[str(r)] = DBlock(ch[r], ch[r // 2], fused=fused_scale)
        self.blocks = nn.ModuleDict(blocks)
        self.from_rgb = nn.ModuleDict({str(r): EqualizedConv2d(IMG_CHANNELS, ch[r], 1, fast_double_backward=True)
                                       for r in res_list})

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """The layout the images will come in: the convolution weights follow it
        (:func:`pggan.models.layers.set_memory_format`)."""
        set_memory_format(self, memory_format)

    def forward(self,
                img: torch.Tensor,  # [N, 3, res, res]
                res: int,
                alpha: float | torch.Tensor = 1.0,  # a 0-dim tensor with ``fade`` given, as for the Generator
                segments: int = 1,  # img is this many independent minibatches back to back (minibatch stddev
                                    # groups stay inside each): one pass scores reals and fakes as two passes would
                fade: bool | None = None,
                ) -> torch.Tensor:  # [N]
        _check_res(res, self.max_resolution)
        assert img.shape[1:] == (IMG_CHANNELS, res, res), f"images {tuple(img.shape)} are not 3x{res}x{res}"
        x = lrelu(self.from_rgb[str(res)](img))                   # [N, C(res), res, res]
        s = self.gdrop_strength
        if res > 4:
            x = self.blocks[str(res)](x, s)                       # [N, C(res/2), res/2, res/2]
            if _fading(alpha, fade):
                # The new block fades in against the previous input path on the 2x2-pooled image.
                prev = lrelu(self.from_rgb[str(res // 2)](downsample2x(img)))
                x = _lerp(prev, x, alpha)
            r = res // 2
            while r > 4:
                x = self.blocks[str(r)](x, s)
                r //= 2
        # x: [N, C4, 4, 4]
        return self.blocks["4"](x, segments, s)


def _fading(alpha: float | torch.Tensor, fade: bool | None) -> bool:
    if fade is not None:
        return fade
    if isinstance(alpha, torch.Tensor):
        raise TypeError("alpha as a tensor needs fade=True/False (its value is not read on the host)")
    return alpha < 1.0


def _lerp(prev: torch.Tensor, x: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    return torch.lerp(prev, x, alpha.to(x.dtype) if isinstance(alpha, torch.Tensor) else alpha)


def build_networks(model_cfg: "ModelSection", gdrop: bool = False) -> tuple[Generator, Discriminator]:
    """G and D at full size from the config's model section (weights drawn from torch's global RNG); ``gdrop``:
    D with the paper's LSGAN noise (see :attr:`pggan.config.LossSection.gdrop`)."""
    g = Generator(latent_size=model_cfg.latent_size,
                  max_resolution=model_cfg.max_resolution,
                  fmap_base=model_cfg.fmap_base,
                  fmap_max=model_cfg.fmap_max,
                  fused_scale=model_cfg.fused_scale)
    d = Discriminator(max_resolution=model_cfg.max_resolution,
                      fmap_base=model_cfg.fmap_base,
                      fmap_max=model_cfg.fmap_max,
                      mbstd_group_size=model_cfg.mbstd_group_size,
                      fused_scale=model_cfg.fused_scale,
                      gdrop=gdrop)
    return g, d
