"""Applying a translation-equivariant stage to an image in tiles or row bands whose stitched output
equals one whole pass: each piece gets a halo of its receptive field, cut off again after."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Span = tuple[int, int]


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_spans: Sequence[tuple[Span, Span]],
    halo: int,
    scale_num: int = 1,
    scale_den: int = 1,
    tick: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Apply `fn` to x [B,C,H,W] in tiles ((y0, y1), (x0, x1)) with `halo` input pixels of context.

    The output grid is x's scaled by scale_num/scale_den; tile origins are multiples of
    scale_den so every tile maps onto whole output pixels. Where a halo is clipped by the image's
    edge, the stage's own zero padding sees the same edge as in a whole pass, so the stitched
    output is exact when `halo` covers the receptive radius.
    """
    h, w = x.shape[-2:]
    out = None

    def o(v: int) -> int:
        return v * scale_num // scale_den

    for (y0, y1), (x0, x1) in tile_spans:
        a0, a1 = max(y0 - halo, 0) // scale_den * scale_den, min(y1 + halo, h)
        b0, b1 = max(x0 - halo, 0) // scale_den * scale_den, min(x1 + halo, w)
        y = fn(x[..., a0:a1, b0:b1])
        if out is None:
            out = y.new_empty(*y.shape[:2], o(h), o(w))
        out[..., o(y0) : o(y1), o(x0) : o(x1)] = y[
            ..., o(y0 - a0) : o(y1 - a0), o(x0 - b0) : o(x1 - b0)
        ]
        if tick is not None:
            tick()
    return out


def row_bands(height: int, width: int, rows: int) -> list[tuple[Span, Span]]:
    """Full-width bands of `rows` rows covering a height x width image, as `tiled_apply` spans."""
    return [((y, min(y + rows, height)), (0, width)) for y in range(0, height, rows)]
