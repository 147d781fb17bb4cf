"""The linear x2 upsampler whose output's low band the engine keeps outside the telephoto.

A model part with fitted taps and no learning: for each of the 4 output phases (2i+a, 2j+b), a
K x K filter on the LR around (i, j), shared by the three channels. The taps are fitted by least
squares on training pairs (`python -m sddusr_engine.train.low_band_fit`) and stored with the
weights; the projection that uses them is `sddusr_engine.engine.postprocess`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearUpsampler(nn.Module):
    """x2 linear upsampler: per output phase a K x K filter on the LR, the same for R, G and B."""

    def __init__(self, taps: int):
        super().__init__()
        if taps < 1 or taps % 2 == 0:
            raise ValueError(f"taps must be a positive odd number, got {taps}")
        self.k = taps
        # [4 phases (a*2+b), 1, K, K]; a fitted file fills it (zeros until then)
        self.register_buffer("taps", torch.zeros(4, 1, taps, taps))

    def forward(
        self, lr: torch.Tensor, rows: tuple[int, int] | None = None, dtype=None
    ) -> torch.Tensor:
        """lr [B,C,H,W] -> [B,C,2H,2W], on lr's device, computed in `dtype` (None: lr's; a
        16-bit LR's rows are widened one band at a time, never the whole image). `rows`
        (r0, r1): only the output rows 2 r0 .. 2 r1 that LR rows r0 .. r1 make (the same
        values), from those rows and the taps' context."""
        b, c, h, w = lr.shape
        k2 = self.k // 2
        r0, r1 = (0, h) if rows is None else rows
        c0, c1 = max(r0 - k2, 0), min(r1 + k2, h)
        x = lr[..., c0:c1, :].to(dtype or lr.dtype).reshape(b * c, 1, c1 - c0, w)
        # the image's edges replicated; inside it, the rows themselves are the context
        x = F.pad(x, (k2, k2, k2 - (r0 - c0), k2 - (c1 - r1)), mode="replicate")
        y = F.conv2d(x, self.taps.to(device=lr.device, dtype=x.dtype))  # [B*C, 4, rows, W]
        return F.pixel_shuffle(y, 2).reshape(b, c, 2 * (r1 - r0), 2 * w)
