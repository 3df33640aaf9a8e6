"""PG-GAN building blocks: equalized-learning-rate layers, fused resampling convolutions, PixelNorm and
minibatch standard deviation (Karras et al. 2018, section 4 and the official TF networks.py).

Equalized learning rate: weights are stored as N(0, 1) and multiplied at run time by
``gain / sqrt(fan_in)``. The multiplication is applied to whichever operand is smaller, the weight
or the input (``conv(x, s*w) == conv(s*x, w)``): for convolutions that is the weight (a few hundred
thousand numbers instead of millions of activations), for the first dense layer of G at small batch
it is the input. Biases start at zero and are not scaled.

Fused resampling (official upscale2d_conv2d / conv2d_downscale2d): the 3x3 weights stay the parameters;
the 4x4 kernel of the stride-2 (transposed) convolution is derived from them on every call by one small
matmul with a fixed [9, 16] matrix (pad-and-shift chains of tiny ops cost more than they save on CPU).

D's convolutions run through :func:`conv2d` with ``fast_double_backward``: the gradient penalty
differentiates D's backward, and PyTorch's generic double backward of a convolution is slow on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .mbstd import mbstd_group

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2


def _equalized(op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
               x: torch.Tensor,
               w: torch.Tensor,
               bias: torch.Tensor | None,
               scale: float,
               mode: str,
               ) -> torch.Tensor:
    """op(x, scale * w, bias) for a linear op, with the scale applied where it is cheapest.

    mode "operand" (default): scale the smaller of the weight and the input. mode "output": scale the
    output activations, as pytorch_GAN_zoo does (kept only so the benchmark can measure the difference).
    """
    if mode == "output":
        y = op(x, w, None) * scale
        return y if bias is None else y + bias.view(1, -1, *([1] * (y.ndim - 2)))
    if w.numel() <= x.numel():
        return op(x, w * scale, bias)
    return op(x * scale, w, bias)


_local = threading.local()


@contextlib.contextmanager
def input_grads_only() -> Iterator[None]:
    """Marks a backward pass that wants gradients w.r.t. inputs only (``autograd.grad(.., inputs=[x])``, the
    gradient penalty): convolutions with ``fast_double_backward`` then skip their weight gradients. Backward
    code on another thread (the CUDA engine's) does not see the mark and computes them, to be dropped by
    autograd as usual: the mark saves work, it never changes a result."""
    before = getattr(_local, "input_grads_only", False)
    _local.input_grads_only = True
    try:
        yield
    finally:
        _local.input_grads_only = before


class _Conv2dFastDoubleBackward(torch.autograd.Function):
    """F.conv2d with a backward that stays fast when differentiated again (create_graph=True).

    PyTorch's double backward of a convolution computes its weight term as a convolution of batch-transposed
    tensors (kernel = the whole feature map), several times slower on CPU than a weight-gradient kernel.
    Here the input gradient is built as conv_transpose2d(grad, w), whose own backward uses the ordinary
    kernels. Without create_graph it is aten.convolution_backward, as for F.conv2d.
    """

    @staticmethod
    def forward(ctx, x, w, b, stride, padding):  # type: ignore[override]
        ctx.save_for_backward(x, w)  # the originals, with their history: needed to differentiate backward
        ctx.stride, ctx.padding, ctx.bias_dtype = stride, padding, None if b is None else b.dtype
        return F.conv2d(x, w, b, stride, padding)  # autocast (if on) casts as for any conv

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        s, p = ctx.stride, ctx.padding
        gx = gw = gb = None
        if torch.is_grad_enabled():
            if need_x:
                out_pad = [x.shape[i] - ((g.shape[i] - 1) * s - 2 * p + w.shape[i]) for i in (2, 3)]
                gx = F.conv_transpose2d(g, w.to(g.dtype), None, s, p, out_pad)
            if getattr(_local, "input_grads_only", False):
                need_w = need_b = False
            if need_w or need_b:
                _, gw, gb = torch.ops.aten.convolution_backward(
                    g, x.to(g.dtype), w.to(g.dtype), [w.shape[0]] if need_b else None, [s, s], [p, p], [1, 1],
                    False, [0, 0], 1, [False, need_w, need_b])
        else:
            # Under autocast the forward ran in the autocast dtype, which is the gradient's dtype.
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x.to(g.dtype), w.to(g.dtype), [w.shape[0]] if need_b else None, [s, s], [p, p], [1, 1],
                False, [0, 0], 1, [need_x, need_w, need_b])
        return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(w.dtype),
                None if gb is None else gb.to(ctx.bias_dtype), None, None)


def conv2d(x: torch.Tensor,
           w: torch.Tensor,
           b: torch.Tensor | None,
           stride: int = 1,
           padding: int = 0,
           fast_double_backward: bool = False,  # see _Conv2dFastDoubleBackward (D, for the gradient penalty)
           ) -> torch.Tensor:
    """F.conv2d, optionally with a backward that is cheap to differentiate (same values and gradients)."""
    if fast_double_backward and torch.is_grad_enabled():
        return _Conv2dFastDoubleBackward.apply(x, w, b, stride, padding)
    return F.conv2d(x, w, b, stride, padding)


class EqualizedLinear(nn.Module):
    """Dense layer with equalized learning rate: y = x @ (gain/sqrt(in) * W)^T + b, W ~ N(0, 1)."""

    def __init__(self,
                 in_features: int,   # fan-in
                 out_features: int,  # outputs
                 gain: float = SQRT2,  # He gain; 1 for linear outputs
                 bias: bool = True,  # False when the bias is added per channel after a reshape (G's first layer)
                 ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)
        self.scale_mode = "operand"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        return _equalized(F.linear, x, self.weight, self.bias, self.scale, self.scale_mode)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, scale={self.scale:.4g}"


class EqualizedConv2d(nn.Module):
    """Same-padded stride-1 convolution with equalized learning rate (weights [out, in, k, k] ~ N(0, 1))."""

    def __init__(self,
                 in_channels: int,   # input feature maps
                 out_channels: int,  # output feature maps
                 kernel_size: int,   # 1 (toRGB / fromRGB) or 3
                 gain: float = SQRT2,  # 1 for toRGB
                 fast_double_backward: bool = False,  # D: the gradient penalty differentiates its backward
                 ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2
        self.scale_mode = "operand"
        self.fast_double_backward = fast_double_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in, H, W] -> [N, out, H, W]
        return _equalized(self._conv, x, self.weight, self.bias, self.scale, self.scale_mode)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return conv2d(x, w, b, 1, self.padding, self.fast_double_backward)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"in={i}, out={o}, k={k}, scale={self.scale:.4g}"


def shift_sum(w: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> [..., 4, 4]: the sum of the four one-pixel shifts of the zero-padded kernel (official
    upscale2d_conv2d / conv2d_downscale2d)."""
    w = F.pad(w, (1, 1, 1, 1))                                     # [..., 5, 5]
    return w[..., 1:, 1:] + w[..., :-1, 1:] + w[..., 1:, :-1] + w[..., :-1, :-1]


def _kernel_map(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 3x3 -> 4x4 kernel derivation as a [9, 16] matrix. One small matmul (and one in backward)
    replaces the pad/slice/add chain, which on CPU costs more than the fused convolution saves. Cached in
    eager mode; torch.compile traces the construction instead (a constant in its graph)."""
    build = _build_kernel_map if torch.compiler.is_compiling() else _cached_kernel_map
    return build(kind, device, dtype)


def _build_kernel_map(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    basis = shift_sum(torch.eye(9, dtype=torch.float64).view(9, 3, 3))  # [9, 4, 4]
    if kind == "up":
        basis = basis.flip(-2, -1)
    else:
        basis = basis * 0.25
    return basis.reshape(9, 16).to(device, dtype)


_cached_kernel_map = functools.lru_cache(maxsize=None)(_build_kernel_map)


def upsample_kernel(w: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """The conv_transpose2d kernel [in, out, 4, 4] equal to nearest-2x-upsample followed by a 3x3 conv.

    Output pixel 2a+d (d in {0, 1}) of upsample+conv sees input pixels a-1, a, a+1 through taps that pair
    up: the 4x4 kernel is :func:`shift_sum` of the 3x3 one. conv_transpose2d scatters with the kernel
    un-flipped, so the summed kernel is flipped in both spatial axes, and its layout is [in, out, kh, kw]
    (transposed from conv2d's). ``channels_last``: the kernel is written in that layout (the one the
    convolution uses with NHWC activations), so no copy per call converts it.
    """
    o, i = w.shape[:2]
    m = _kernel_map("up", w.device, w.dtype)                      # [9, 16]
    if channels_last:
        k = torch.matmul(m.t(), w.reshape(o, i, 9).permute(1, 2, 0))  # [in, 16, out]
        return k.view(i, 4, 4, o).permute(0, 3, 1, 2)             # [in, out, 4, 4], channels_last strides
    k = (w.reshape(o * i, 9) @ m).view(o, i, 4, 4)
    return k.transpose(0, 1)                                       # [in, out, 4, 4]


def downsample_kernel(w: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """The stride-2 conv2d kernel [out, in, 4, 4] equal to a 3x3 conv followed by 2x2 average pooling:
    :func:`shift_sum` / 4 (no flip: conv2d correlates, as the 3x3 conv does). ``channels_last`` as for
    :func:`upsample_kernel`."""
    o, i = w.shape[:2]
    m = _kernel_map("down", w.device, w.dtype)                    # [9, 16]
    if channels_last:
        k = torch.matmul(m.t(), w.reshape(o, i, 9).transpose(1, 2))  # [out, 16, in]
        return k.view(o, 4, 4, i).permute(0, 3, 1, 2)             # [out, in, 4, 4], channels_last strides
    return (w.reshape(o * i, 9) @ m).view(o, i, 4, 4)


def set_memory_format(module: nn.Module, memory_format: torch.memory_format) -> None:
    """Lay out a network's convolution weights as its activations will be (``torch.channels_last`` or
    ``torch.contiguous_format``). With NHWC activations and NCHW weights every convolution converts its
    weight, every weight gradient is converted back, and on CPU the transposed convolution takes a slower
    path: the 3x3 and 1x1 weights are stored NHWC instead, and the fused 4x4 kernels derived in NHWC.
    Values, parameter names and shapes do not change, so checkpoints load either way."""
    for m in module.modules():
        if isinstance(m, EqualizedConv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=memory_format)
        elif isinstance(m, _Resampling3x3):
            m.kernel_channels_last = memory_format == torch.channels_last


class _Resampling3x3(nn.Module):
    """The parameters both resampling convolutions share: 3x3 weights ~ N(0, 1), zero biases, equalized-lr scale."""

    def __init__(self, in_channels: int, out_channels: int, fused: bool, gain: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * 9)
        self.fused = fused
        self.scale_mode = "operand"
        self.kernel_channels_last = False  # see set_memory_format


class UpConv2d(_Resampling3x3):
    """Nearest 2x upsample then 3x3 conv, equalized lr. Fused: one stride-2 transposed conv with a 4x4
    kernel derived from the 3x3 weights (same result, 2.25x fewer FLOPs). The parameters are the 3x3
    conv's either way, so fused and unfused networks share checkpoints."""

    def __init__(self,
                 in_channels: int,   # input feature maps
                 out_channels: int,  # output feature maps
                 fused: bool = True,  # transposed conv instead of upsample + conv
                 gain: float = SQRT2,
                 ) -> None:
        super().__init__(in_channels, out_channels, fused, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in, H, W] -> [N, out, 2H, 2W]
        if self.fused:
            return _equalized(self._fused, x, self.weight, self.bias, self.scale, self.scale_mode)
        return _equalized(self._unfused, upsample2x(x), self.weight, self.bias, self.scale, self.scale_mode)

    def _fused(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv_transpose2d(x, upsample_kernel(w, self.kernel_channels_last), b, stride=2, padding=1)

    @staticmethod
    def _unfused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, padding=1)

    def extra_repr(self) -> str:
        o, i = self.weight.shape[:2]
        return f"in={i}, out={o}, fused={self.fused}"


class ConvDown2d(_Resampling3x3):
    """3x3 conv then 2x2 average pool, equalized lr. Fused: one stride-2 conv with a 4x4 kernel (the sum
    of the four shifts of the 3x3 kernel / 4). The bias is added after the pool in both forms."""

    def __init__(self,
                 in_channels: int,   # input feature maps
                 out_channels: int,  # output feature maps
                 fused: bool = True,  # strided conv instead of conv + avgpool
                 gain: float = SQRT2,
                 fast_double_backward: bool = False,  # D: the gradient penalty differentiates its backward
                 ) -> None:
        super().__init__(in_channels, out_channels, fused, gain)
        self.fast_double_backward = fast_double_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in, H, W] -> [N, out, H/2, W/2]
        op = self._fused if self.fused else self._unfused
        return _equalized(op, x, self.weight, self.bias, self.scale, self.scale_mode)

    def _fused(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return conv2d(x, downsample_kernel(w, self.kernel_channels_last), b, 2, 1, self.fast_double_backward)

    def _unfused(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = F.avg_pool2d(conv2d(x, w, None, 1, 1, self.fast_double_backward), 2)
        return y if b is None else y + b.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        o, i = self.weight.shape[:2]
        return f"in={i}, out={o}, fused={self.fused}"


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling. [N, C, H, W] -> [N, C, 2H, 2W]"""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling (the paper's downsampling). [N, C, H, W] -> [N, C, H/2, W/2]"""
    return F.avg_pool2d(x, 2)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


class PixelNorm(nn.Module):
    """Pixelwise feature normalization: x / sqrt(mean over channels of x^2 + eps) (paper section 4.2)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, ...] -> same
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + self.eps)


class MinibatchStdDev(nn.Module):
    """Appends one feature map: the population stddev over a group of samples, averaged over C, H, W
    (paper section 3). Groups follow the official layout ``x.reshape(G, M, ...)``: sample n is in group
    n % M, M = N / G. The group size is :func:`pggan.models.mbstd.mbstd_group` (the largest divisor of the
    batch not above ``group_size``), so any per-worker batch works."""

    def __init__(self,
                 group_size: int = 4,  # paper: 4
                 eps: float = 1e-8,
                 ) -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps

    def forward(self,
                x: torch.Tensor,    # [N, C, H, W]
                segments: int = 1,  # N is this many independent minibatches, back to back (groups stay inside one)
                ) -> torch.Tensor:  # [N, C+1, H, W]
        n, c, h, w = x.shape
        per = n // segments
        assert per * segments == n, f"batch {n} does not split into {segments} equal minibatches"
        g = mbstd_group(self.group_size, per)
        y = x.reshape(segments, g, per // g, c, h, w)             # [S, G, M, C, H, W]
        if y.dtype not in (torch.float32, torch.float64):
            y = y.float()                                         # statistics in fp32 under bf16 autocast
        y = y - y.mean(dim=1, keepdim=True)
        y = torch.sqrt(y.square().mean(dim=1) + self.eps)         # [S, M, C, H, W] population std
        y = y.mean(dim=(2, 3, 4)).to(x.dtype)                     # [S, M]
        y = y.repeat(1, g).view(n, 1, 1, 1).expand(n, 1, h, w)    # [N, 1, H, W]: sample n of a segment gets y[n % M]
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class GDrop(nn.Module):
    """Generalized dropout in the official Theano D_paper's 'prop' mode (the noise of the paper's LSGAN runs):
    ``x * (1 + strength * sqrt(C) * n)``, n ~ N(0, 1) per sample and channel, shared over H and W. ``strength``
    is adapted during training (:class:`pggan.training.losses.GDropStrength`); no noise in eval mode."""

    def forward(self,
                x: torch.Tensor,                 # [N, C, H, W]
                strength: torch.Tensor | None,   # 0-d, on x's device (a tensor: no host sync), None = off
                ) -> torch.Tensor:               # [N, C, H, W]
        if strength is None or not self.training:
            return x
        n, c = x.shape[:2]
        rnd = torch.randn(n, c, 1, 1, device=x.device, dtype=x.dtype)   # [N, C, 1, 1]
        return x * (rnd * (strength.to(x.dtype) * math.sqrt(c)) + 1)
