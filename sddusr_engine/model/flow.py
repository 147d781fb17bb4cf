"""SpyNet optical flow (6-level pyramid) and flow warping, as the published KeDuSR code runs them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bands import row_bands, tiled_apply

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def flow_warp(
    x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros", row0: int = 0
) -> torch.Tensor:
    """Sample x [B,C,H,W] at (pixel + flow); flow [B,2,H,W] holds (dx, dy). Bilinear, align_corners.
    `row0`: flow holds only rows row0.. of x's grid (a band), and so does the result."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(row0, row0 + flow.shape[-2], device=x.device, dtype=flow.dtype),
        torch.arange(w, device=x.device, dtype=flow.dtype),
        indexing="ij",
    )
    gx = 2.0 * (xs + flow[:, 0]) / max(w - 1, 1) - 1.0
    gy = 2.0 * (ys + flow[:, 1]) / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)  # [B,H,W,2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


class _FlowLevel(nn.Module):
    """Five 7x7 convs 8 -> 32 -> 64 -> 32 -> 16 -> 2 with ReLU between them."""

    HALO = 5 * 3  # rows of context: five 7x7 convs

    def __init__(self):
        super().__init__()
        widths = [8, 32, 64, 32, 16, 2]
        layers: list[nn.Module] = []
        for i in range(5):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 7, 1, 3))
            if i < 4:
                layers.append(nn.ReLU(inplace=False))
        self.basic_module = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basic_module(x)


class SpyNet(nn.Module):
    """Flow from image a to image b: the returned flow warps b onto a's grid."""

    LEVELS = 6

    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList(_FlowLevel() for _ in range(self.LEVELS))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _pyramid_flow(self, a: torch.Tensor, b: torch.Tensor, band_rows: int = 0) -> torch.Tensor:
        a_levels, b_levels = [(a - self.mean) / self.std], [(b - self.mean) / self.std]
        for _ in range(self.LEVELS - 1):
            a_levels.insert(0, F.avg_pool2d(a_levels[0], 2, 2, count_include_pad=False))
            b_levels.insert(0, F.avg_pool2d(b_levels[0], 2, 2, count_include_pad=False))
        h0, w0 = a_levels[0].shape[-2:]
        flow = a.new_zeros(a.shape[0], 2, h0 // 2, w0 // 2)
        for level, (al, bl) in enumerate(zip(a_levels, b_levels, strict=True)):
            up = 2.0 * F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True)
            if up.shape[-2] != al.shape[-2]:
                up = F.pad(up, (0, 0, 0, 1), mode="replicate")
            if up.shape[-1] != al.shape[-1]:
                up = F.pad(up, (0, 1, 0, 0), mode="replicate")
            warped = flow_warp(bl, up, padding_mode="border")
            x = torch.cat([al, warped, up], dim=1)
            basic = self.basic_module[level]
            rows = max(band_rows, 2 * basic.HALO)  # not mostly context
            if band_rows and x.shape[-2] > rows:  # its 32 and 64-channel maps per band
                bands = row_bands(x.shape[-2], x.shape[-1], rows)
                flow = tiled_apply(basic, x, bands, basic.HALO) + up
            else:
                flow = basic(x) + up
        return flow

    def forward(self, a: torch.Tensor, b: torch.Tensor, band_rows: int = 0) -> torch.Tensor:
        """a, b: [B,3,h,w] in [0,1] -> flow [B,2,h,w] as (dx, dy) in a's pixels.

        `band_rows` > 0: each level's convolutions in bands of that many rows (at least 30; each
        with 15 rows of context), the same flow with the wide intermediate maps one band at a
        time."""
        h, w = a.shape[-2:]
        # The published code resizes to the next multiple of 32; at least 64 keeps the coarsest of
        # the 6 levels non-empty for tiny LRC crops (where the published code fails).
        hf, wf = max(math.ceil(h / 32) * 32, 64), max(math.ceil(w / 32) * 32, 64)
        a32 = F.interpolate(a, size=(hf, wf), mode="bilinear", align_corners=False)
        b32 = F.interpolate(b, size=(hf, wf), mode="bilinear", align_corners=False)
        flow = F.interpolate(
            self._pyramid_flow(a32, b32, band_rows),
            size=(h, w),
            mode="bilinear",
            align_corners=False,
        )
        scale = flow.new_tensor([w / wf, h / hf]).view(1, 2, 1, 1)
        return flow * scale
