"""The LR trunk in row bands, exact with channel attention, holding two whole maps.

Each `sddusr` trunk block scales its map by a channel attention that pools over the whole image,
so the trunk cannot run in independent tiles. It can run block by block, each block as two sweeps
of full-width row bands:

1. the block's pooled statistic: the mean of `pool_input` (its first conv and activation), summed
   band by band with the one row of context the conv needs;
2. the block itself with that mean, band by band with two rows of context, written back in place
   (`sweep_in_place` keeps the rows the next band still needs as they were).

The first conv runs twice per block (one and a half times the block's work) and the map between
blocks is the only whole map a block holds; a group also keeps its input (for the group's skip),
and the trunk's head is recomputed from the LR image per band. This holds two whole maps and a
few bands, whatever the image: on a 12 MP LR image the shipped trunk grew RSS by 3.0 GB (maps of
1.56 GB), against 7.5 GB for the whole-image pass, in 40 s against 28 s (fp32, 2-core CPU,
2026-12-06).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bands import row_bands, tiled_apply
from .blocks import ResList, Trunk, TrunkBlock

Tick = Callable[[], None] | None
BandFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def sweep_in_place(fn: BandFn, x: torch.Tensor, rows: int, halo: int, device=None) -> torch.Tensor:
    """x [B,C,H,W] replaced, band of `rows` rows by band, top to bottom, by `fn(band, a0, a1)`:
    the stage applied to x's rows a0:a1 (the band with `halo` rows of context each side, clipped
    to the image), returning those rows. A stage whose receptive radius is at most `halo` rows
    gives the whole-image result. Before a band is written, its last `halo` rows are kept as
    they were: the next band reads them as its context. `device` (None: x's) is where `fn`
    runs: each band goes there but for the kept rows, which are already there, and its result
    comes back into x (x in host memory for a GPU)."""
    if rows < halo:
        raise ValueError(f"bands of {rows} rows cannot carry {halo} rows of context")
    h = x.shape[-2]
    above = None  # x's rows y0 - halo : y0 as they were before the band above was written
    for y0 in range(0, h, rows):
        y1 = min(y0 + rows, h)
        a0, a1 = max(y0 - halo, 0), min(y1 + halo, h)
        band = x[..., y0:a1, :].to(device or x.device)
        if above is not None and halo:
            band = torch.cat([above, band], dim=-2)  # rows a0:a1
        above = band[..., max(y1 - halo, 0) - a0 : y1 - a0, :].clone()  # before x is written
        out = fn(band, a0, a1)
        x[..., y0:y1, :].copy_(out[..., y0 - a0 : y1 - a0, :])
    return x


def band_mean(fn: Callable[[torch.Tensor], torch.Tensor], x, rows: int, halo: int, device=None):
    """The whole image's channel mean [B,C,1,1] of `fn(x)`, a stage of receptive radius `halo`,
    summed over row bands in fp32 (`fn`'s dtype out), on `device` (None: x's)."""
    h, w = x.shape[-2:]
    acc = None
    for y0 in range(0, h, rows):
        y1 = min(y0 + rows, h)
        a0, a1 = max(y0 - halo, 0), min(y1 + halo, h)
        y = fn(x[..., a0:a1, :].to(device or x.device))[..., y0 - a0 : y1 - a0, :]
        part = y.float().sum(dim=(2, 3))
        acc = part if acc is None else acc + part
    return (acc / (h * w)).to(y.dtype)[..., None, None]


@torch.inference_mode()
def trunk_in_bands(
    trunk: Trunk, lr: torch.Tensor, rows: int, tick: Tick = None, home=None
) -> torch.Tensor:
    """`trunk(lr)` computed in full-width bands of `rows` LR rows (at least 2), holding two whole
    maps (module docstring). `tick()` after each block and group tail. `home` (None: lr's
    device) is where the two whole maps and the result live; the bands compute on lr's device
    (with a GPU and `home` the host, the GPU holds a few bands, whatever the image)."""
    h, w = lr.shape[-2:]
    dev = lr.device
    bands = row_bands(h, w, rows)
    x = tiled_apply(trunk.head, lr, bands, 1, home=home)
    group_input = torch.empty_like(x, pin_memory=x.is_pinned())  # pinned where x is
    for group in trunk.groups():
        group_input.copy_(x)
        for block in group.RBs:
            _block_in_bands(block, x, rows, dev)
            if tick is not None:
                tick()
        _group_tail_in_bands(group, x, group_input, rows, dev)
        if tick is not None:
            tick()
    del group_input

    def tail(band, a0, a1):  # the trunk's tail conv plus its head, recomputed from LR
        c0, c1 = max(a0 - 1, 0), min(a1 + 1, h)
        head = trunk.head(lr[..., c0:c1, :])[..., a0 - c0 : a1 - c0, :]
        return trunk.tail(band).add_(head)

    return sweep_in_place(tail, x, rows, 1, dev)


def trunk_band_steps(trunk: Trunk) -> int:
    """How many times `trunk_in_bands` ticks: once per block and per group tail."""
    return sum(len(g.RBs) + 1 for g in trunk.groups())


def _block_in_bands(block: TrunkBlock, x: torch.Tensor, rows: int, dev) -> None:
    pooled = None
    if block.use_attention:  # the statistic the whole pass would pool, from the bands
        pooled = band_mean(block.pool_input, x, rows, 1, dev)
    sweep_in_place(lambda band, a0, a1: block(band, pooled), x, rows, 2, dev)


def _group_tail_in_bands(group: ResList, x, group_input, rows: int, dev) -> None:
    def tail(band, a0, a1):
        return group.conv_tail(band).add_(group_input[..., a0:a1, :].to(dev))

    sweep_in_place(tail, x, rows, 1, dev)
