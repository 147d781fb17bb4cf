"""Applying a translation-equivariant stage to an image in tiles or row bands whose stitched output
equals one whole pass: each piece gets a halo of its receptive field, cut off again after; and the
whole maps such a pass writes (`empty_map`), on the compute device or in host memory."""

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
    home: torch.device | None = None,
) -> torch.Tensor:
    """Apply `fn` to x [B,C,H,W] in tiles ((y0, y1), (x0, x1)) with `halo` input pixels of context.
    The output is stitched on `home` (None: the device `fn` computes on; see `empty_map`).

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
            out = empty_map((*y.shape[:2], o(h), o(w)), y, home)
        out[..., o(y0) : o(y1), o(x0) : o(x1)].copy_(
            y[..., o(y0 - a0) : o(y1 - a0), o(x0 - b0) : o(x1 - b0)]
        )
        if tick is not None:
            tick()
    return out


def empty_map(shape, like: torch.Tensor, home: torch.device | None = None) -> torch.Tensor:
    """An uninitialised [B,C,H,W] map of `shape` with `like`'s dtype and layout (NHWC when `like`
    is channels_last, NCHW otherwise), on `home` (None: `like`'s device). A map kept in host
    memory for a GPU's computation is page-locked, so that its bands cross to the GPU at the
    link's full speed."""
    nhwc = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    home = like.device if home is None else torch.device(home)
    pin = home.type == "cpu" and like.device.type == "cuda"
    return torch.empty(shape, dtype=like.dtype, device=home, pin_memory=pin, memory_format=fmt)


def row_bands(height: int, width: int, rows: int) -> list[tuple[Span, Span]]:
    """Full-width bands of `rows` rows covering a height x width image, as `tiled_apply` spans."""
    return [((y, min(y + rows, height)), (0, width)) for y in range(0, height, rows)]


class RowWindow:
    """A stage's output rows computed on demand, in chunks of `chunk_rows` rows (each from its
    input rows with `halo` rows of context, so each equals the whole pass's rows), and kept only
    while they may still be asked for: for a reader that moves down the image reading a window of
    rows (the alignment reads F_Ref where the flow points). Chunks above the lowest row asked for
    are let go; one asked for again is recomputed (the same values). Memory: the chunks of one
    window, whatever the image's height."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x, chunk_rows: int, halo: int):
        self.fn, self.x, self.rows_per, self.halo = fn, x, chunk_rows, halo
        self.height = x.shape[-2]
        self.chunks: dict[int, torch.Tensor] = {}
        self.computed = 0  # chunks computed so far (a recomputed one counts again)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """The stage's output rows lo:hi (0 <= lo < hi <= height)."""
        if not 0 <= lo < hi <= self.height:
            raise ValueError(f"rows {lo}:{hi} outside 0:{self.height}")
        first, last = lo // self.rows_per, (hi - 1) // self.rows_per
        for k in [k for k in self.chunks if k < first]:
            del self.chunks[k]
        for k in range(first, last + 1):
            if k not in self.chunks:
                self.chunks[k] = self._chunk(k)
        parts = [self.chunks[k] for k in range(first, last + 1)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
        return out[..., lo - first * self.rows_per : hi - first * self.rows_per, :]

    def _chunk(self, k: int) -> torch.Tensor:
        y0, y1 = k * self.rows_per, min((k + 1) * self.rows_per, self.height)
        a0, a1 = max(y0 - self.halo, 0), min(y1 + self.halo, self.height)
        self.computed += 1
        return self.fn(self.x[..., a0:a1, :])[..., y0 - a0 : y1 - a0, :]
