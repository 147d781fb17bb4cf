"""Boxes and ramps on the LR and 2x grids: where the telephoto's rectangle lies, and blend weights.

A box is always `(y0, y1, x0, x1)`, half-open. A name ending `_lr` holds LR pixels, `_hr` HR
pixels (the 2x grid): the published datasets store their centre rectangles in HR pixels, the
engine works with the LR box of the LRC crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]

RAMP_HR = 16  # width (HR pixels) of the blend from the telephoto's box outward


def lr_box(box_hr) -> Box:
    """A rectangle in HR pixels as the LR box that covers it."""
    y0, y1, x0, x1 = (int(v) for v in box_hr)
    return y0 // 2, -(-y1 // 2), x0 // 2, -(-x1 // 2)


def spans(size: int, tile: int) -> list[tuple[int, int]]:
    """Cover [0, size) with spans of `tile` (the last one shorter)."""
    return [(s, min(s + tile, size)) for s in range(0, size, tile)]


def outside_weight(
    hw: tuple[int, int],
    box_lr: Box | None,
    device,
    dtype,
    ramp: int = RAMP_HR,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """[1,1,H,W] on the 2x grid of size `hw`: 0 inside `box_lr` scaled x2, rising linearly to 1
    over `ramp` pixels outside it (Chebyshev distance); all ones when `box_lr` is None.
    `rows` (r0, r1): only those rows of it."""
    h, w = hw
    r0, r1 = (0, h) if rows is None else rows
    if box_lr is None:
        return torch.ones(1, 1, r1 - r0, w, device=device, dtype=dtype)
    y0, y1, x0, x1 = (2 * int(v) for v in box_lr)
    ys = torch.arange(r0, r1, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    dy = torch.clamp(torch.maximum(y0 - ys, ys - (y1 - 1)), min=0)  # 0 inside the rows
    dx = torch.clamp(torch.maximum(x0 - xs, xs - (x1 - 1)), min=0)
    d = torch.maximum(dy[:, None], dx[None, :])
    return (d / ramp).clamp(max=1).to(dtype)[None, None]


def locate_crop(lr: torch.Tensor, lrc: torch.Tensor, tol: float = 2 / 255) -> Box | None:
    """Where `lrc` [1,3,h,w] lies in `lr` [1,3,H,W] as an exact crop (the published datasets'
    LR_center is one): its LR box, or None when no position matches to within `tol` mean
    absolute difference. Cross-correlation by FFT, window energies by cumulative sums."""
    H, W = lr.shape[-2:]
    h, w = lrc.shape[-2:]
    if h > H or w > W:
        return None
    a = lr[0].double().mean(0)
    t = lrc[0].double().mean(0)
    a0, t0 = a - a.mean(), t - a.mean()
    corr = torch.fft.irfft2(torch.fft.rfft2(a0) * torch.fft.rfft2(t0, s=(H, W)).conj(), s=(H, W))
    c = F.pad(a0.square().cumsum(0).cumsum(1), (1, 0, 1, 0))
    energy = c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]  # sum of a0^2 per window
    ssd = energy - 2 * corr[: H - h + 1, : W - w + 1] + t0.square().sum()
    y, x = divmod(int(torch.argmin(ssd)), W - w + 1)
    diff = (lr[0, :, y : y + h, x : x + w].float() - lrc[0].float()).abs().mean()
    return (y, y + h, x, x + w) if float(diff) <= tol else None
