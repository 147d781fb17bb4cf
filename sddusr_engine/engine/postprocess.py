"""Post-processing of the network's output: the low-band projection and the adaptation blend.

Both run in fp32 whatever the engine's precision (they add small corrections to a whole image,
which fp16 would round away), and return the input's dtype.

Low-band projection: outside the telephoto's footprint the network has only its single-image
path, whose residual over bicubic carries a faint error in the band below a couple of HR pixels.
A linear x2 upsampler fitted by least squares on the training pairs (`model.low_band`) gets that
band right on average, so outside the footprint the output keeps the network's band above
`sigma` and takes the band below from the linear upsampler:

    out = sr + weight * G_sigma * (linear(lr) - sr)

`weight` is 1 outside the footprint, 0 inside it (where the telephoto supplies that band better
than any linear filter), with a linear ramp between (`geometry.outside_weight`); with no
reference it is 1 everywhere. docs/decisions.md has the measurements behind it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..geometry import Box, outside_weight
from ..model.low_band import LinearUpsampler


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of std `sigma` pixels per channel, edges replicated."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * sigma * sigma))
    k = (k / k.sum()).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def project_low_band(
    sr: torch.Tensor,
    lr: torch.Tensor,
    upsampler: LinearUpsampler,
    sigma: float,
    box_lr: Box | None = None,
) -> torch.Tensor:
    """sr [B,3,2H,2W] with its band below `sigma` (HR pixels) replaced by `upsampler(lr)`'s,
    outside `box_lr` (the telephoto's LR rectangle; None: everywhere). `sr` is clamped to
    [0, 1] first, as the image it stands for. Computed in fp32 (the upsampler's taps too)."""
    h, w = sr.shape[-2:]
    sr32 = sr.float().clamp(0, 1)
    lin = upsampler(lr.float())[..., :h, :w]
    low = gaussian_blur(lin - sr32, sigma)
    weight = outside_weight((h, w), box_lr, sr.device, torch.float32)
    return (sr32 + weight * low).clamp(0, 1).to(sr.dtype)


def blend_outside(inside: torch.Tensor, outside: torch.Tensor, box_lr: Box) -> torch.Tensor:
    """`inside` within the LR box (scaled x2), `outside` beyond it, with the projection's ramp."""
    w = outside_weight(inside.shape[-2:], box_lr, inside.device, torch.float32)
    return (inside.float() * (1 - w) + outside.float() * w).to(inside.dtype)
