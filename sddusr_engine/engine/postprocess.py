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
    r = blur_radius(sigma)
    return _blur_padded(F.pad(x, (r, r, r, r), mode="replicate"), sigma)


def blur_radius(sigma: float) -> int:
    """The Gaussian's radius in pixels (3 sigma, at least 1)."""
    return max(1, math.ceil(3 * sigma))


def _blur_padded(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian of an x already padded by `blur_radius` on every side (the result is that
    much smaller)."""
    r = blur_radius(sigma)
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * sigma * sigma))
    k = (k / k.sum()).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# Output rows per band of the projection: its fp32 maps (the linear upsampler's output, the
# difference, the blur) exist for one band at a time, not as several whole 2x images (on a 12 MP
# pair each is 585 MB, and the whole-image projection held about ten at once).
PROJECTION_BAND_ROWS = 256


def project_low_band(
    sr: torch.Tensor,
    lr: torch.Tensor,
    upsampler: LinearUpsampler,
    sigma: float,
    box_lr: Box | None = None,
    band_rows: int = PROJECTION_BAND_ROWS,
) -> torch.Tensor:
    """sr [B,3,2H,2W] with its band below `sigma` (HR pixels) replaced by `upsampler(lr)`'s,
    outside `box_lr` (the telephoto's LR rectangle; None: everywhere). `sr` is clamped to
    [0, 1] first, as the image it stands for. Computed on lr's device in fp32 (the upsampler's
    taps too), in bands of `band_rows` output rows, each with the blur's rows of context: a new
    image in sr's dtype on sr's device (host memory for a GPU run with host maps), and one
    band's maps besides."""
    h, w = sr.shape[-2:]
    r = blur_radius(sigma)
    dev = lr.device  # LR stays in its dtype: the upsampler widens the rows each band reads
    out = torch.empty(sr.shape, dtype=sr.dtype, device=sr.device)
    for y0 in range(0, h, band_rows):
        y1 = min(y0 + band_rows, h)
        a0, a1 = max(y0 - r, 0), min(y1 + r, h)  # the band and its context, in the image
        l0, l1 = a0 // 2, min(-(-a1 // 2), lr.shape[-2])  # the LR rows that make rows a0..a1
        lin = upsampler(lr, (l0, l1), torch.float32)[..., a0 - 2 * l0 : a1 - 2 * l0, :w]
        s = sr[..., a0:a1, :].to(dev).float().clamp(0, 1)
        diff = F.pad(lin - s, (r, r, r - (y0 - a0), r - (a1 - y1)), mode="replicate")
        low = _blur_padded(diff, sigma)
        weight = outside_weight((h, w), box_lr, dev, torch.float32, rows=(y0, y1))
        band = s[..., y0 - a0 : y1 - a0, :].add_(low.mul_(weight))
        out[..., y0:y1, :].copy_(band.clamp_(0, 1))
    return out


def blend_outside(inside: torch.Tensor, outside: torch.Tensor, box_lr: Box) -> torch.Tensor:
    """`inside` within the LR box (scaled x2), `outside` beyond it, with the projection's ramp."""
    w = outside_weight(inside.shape[-2:], box_lr, inside.device, torch.float32)
    return (inside.float() * (1 - w) + outside.float() * w).to(inside.dtype)
