"""One network pass over a whole image, streamed in tiles whose stitched output is exact.

Per pair, once: the reference context (LRC and Ref encoders, flow, alignment, LRC matching map and
mask, dictionary update); in a tiled run it is computed in bands of Ref rows
(`reference_band_rows`) so that its intermediate maps follow the tile size too. Then the LR image goes through in stages:

1. trunk at LR resolution: in tiles with a halo of its receptive field, or whole when the trunk
   has channel attention (each block then pools over the whole image);
2. matching features and SFM masks at 1/2 LR, in tiles with a halo; then one sparse top-1 match
   of every active LR position against the active LRC positions (memory O(queries + keys));
3. the 2x stage (upsampler, warp, high-pass, gate, dictionary attention, fusion, decoder) in
   output tiles with a halo. The fusion block's channel attention pools over the whole image, so
   a first pass over the tiles sums the pooled map (only up to the fusion block's first conv) and
   the second pass uses that whole-image mean.

The halos come from the network (`DualLensSR.tiling`); this module only cuts and stitches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..geometry import spans
from ..model.bands import tiled_apply
from ..model.network import DualLensSR, MatchResult, ReferenceContext, pad_to_even, upsample_bicubic
from ..timing import StageTimer
from .info import RunInfo

Progress = Callable[[int, int], None]


@torch.inference_mode()
def tiled_forward(
    model: DualLensSR,
    lr: torch.Tensor,
    lrc: torch.Tensor | None,
    ref: torch.Tensor | None,
    tile: int,
    timer: StageTimer,
    info: RunInfo,
    progress: Progress | None = None,
    keep_maps: bool = False,
) -> torch.Tensor:
    """`model(lr, lrc, ref)` [1,3,2H,2W] in the model's dtype, computed in LR tiles of `tile`
    pixels (0: whole). Matching statistics (and with `keep_maps` the maps) go into `info`."""
    m, tiling = model, model.tiling
    h, w = lr.shape[-2:]
    lr = pad_to_even(lr)
    hp, wp = lr.shape[-2:]
    whole = tile == 0 or (hp <= tile and wp <= tile)
    lr_tile = max(hp, wp) if whole else tile

    trunk_spans = [(y, x) for y in spans(hp, lr_tile) for x in spans(wp, lr_tile)]
    out_tile = 2 * lr_tile
    out_spans = [(y, x) for y in spans(2 * hp, out_tile) for x in spans(2 * wp, out_tile)]
    total = (len(trunk_spans) if tiling.trunk_tiles else 1) + len(trunk_spans)
    total += len(out_spans) * (1 if whole else 2)
    band_rows = 0 if whole or lrc is None else reference_band_rows(lr_tile, ref.shape[-1])
    total += m.reference_bands(ref.shape[-2:], band_rows) if lrc is not None else 1
    match_bands = matching_bands(lr, lrc)
    total += match_bands
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    with timer("reference"):
        if lrc is None:
            ctx = m.empty_context(lr)
            tick()
        else:
            ctx = m.reference_context(lrc, ref, keep_taps=False, band_rows=band_rows, tick=tick)

    with timer("trunk"):
        if tiling.trunk_tiles:
            feat = tiled_apply(m.lr_trunk, lr, trunk_spans, tiling.trunk_halo_lr, 1, 1, tick)
        else:
            feat = m.lr_trunk(lr)
            tick()

    with timer("match_features"):
        maps = tiled_apply(m.query_maps, lr, trunk_spans, tiling.match_halo_lr, 1, 2, tick)
        q_map, q_mask = m.split_query_maps(maps)

    with timer("matching"):
        conf, index, stats = m.sparse_match(q_map, q_mask, ctx, match_bands, tick)
        conf = conf.to(lr.dtype)

    halo = 0 if whole else tiling.decode_halo_hr
    pooled = None
    if not whole and tiling.fusion_pools_globally:
        with timer("fusion_statistics"):
            acc = torch.zeros(m.config.fusion_channels, device=lr.device, dtype=torch.float32)
            for ys, xs in out_spans:
                fused, _, _, inner = _fusion_input(m, lr, feat, ctx, conf, index, ys, xs, halo)
                acc += m.fusion_pool_input(fused)[inner].float().sum(dim=(0, 2, 3))
                tick()
            pooled = (acc / (4 * hp * wp)).to(lr.dtype).view(1, -1, 1, 1)

    with timer("decode"):
        sr = torch.empty(1, 3, 2 * hp, 2 * wp, dtype=lr.dtype, device=lr.device)
        for ys, xs in out_spans:
            fused, f_lr, lr_up, inner = _fusion_input(m, lr, feat, ctx, conf, index, ys, xs, halo)
            out = m.decode(m.fuse(fused, pooled), f_lr, lr_up)
            sr[..., ys[0] : ys[1], xs[0] : xs[1]] = out[inner]
            tick()

    _record(info, stats, q_mask, ctx, conf, index, keep_maps)
    return sr[..., : 2 * h, : 2 * w]


# On a CPU the matching runs in bands of query rows of about this many (query, key) pairs each
# (a few seconds of the reference kernel), each band a step of the progress; on a GPU the whole
# map is one launch (the fused kernel is fastest on it all).
MATCH_BAND_PAIRS = 4_000_000_000


def matching_bands(lr: torch.Tensor, lrc: torch.Tensor | None) -> int:
    """How many bands of query rows the matching runs in: 1 on a GPU or without a reference."""
    if lrc is None or lr.device.type != "cpu":
        return 1
    hq, wq = lr.shape[-2] // 2, lr.shape[-1] // 2
    pairs = hq * wq * (lrc.shape[-2] // 2) * (lrc.shape[-1] // 2)
    return max(1, min(-(-pairs // MATCH_BAND_PAIRS), hq // 8))


def reference_band_rows(lr_tile: int, ref_width: int) -> int:
    """Ref rows per band of a tiled run's reference context: about as many Ref pixels as one
    output tile has (a multiple of 8, at least 8), so that its peak follows the tile's."""
    return max(8, (2 * lr_tile) ** 2 // max(ref_width, 1) // 8 * 8)


def _fusion_input(m: DualLensSR, lr, feat, ctx: ReferenceContext, conf, index, ys, xs, halo):
    """The fusion block's input for output rows ys, cols xs (+ halo, clipped to the image).

    Returns (fused, f_lr, lr_up, inner): `lr_up` is the bicubic x2 of LR for `global_skip`
    (else None) and `inner` slices the requested span out of the region.
    """
    hp, wp = feat.shape[-2:]
    cell = m.tiling.cell_hr
    # region in output pixels, aligned to the matching cells
    y0, y1 = max(ys[0] - halo, 0), min(ys[1] + halo, 2 * hp)
    x0, x1 = max(xs[0] - halo, 0), min(xs[1] + halo, 2 * wp)
    # the upsampler's 3x3 conv needs one LR pixel of context, bicubic x2 two
    a0, a1 = max(y0 // 2 - 2, 0), min(y1 // 2 + 2, hp)
    b0, b1 = max(x0 // 2 - 2, 0), min(x1 // 2 + 2, wp)
    crop = (..., slice(y0 - 2 * a0, y1 - 2 * a0), slice(x0 - 2 * b0, x1 - 2 * b0))
    f_lr = m.upsample(feat[..., a0:a1, b0:b1])[crop]
    lr_up = upsample_bicubic(lr[..., a0:a1, b0:b1])[crop] if m.config.global_skip else None
    cells = (slice(y0 // cell, y1 // cell), slice(x0 // cell, x1 // cell))
    idx = index[:, cells[0], cells[1]]
    match = MatchResult(m.warp(ctx, idx), conf[:, :, cells[0], cells[1]], idx, None, None)
    fused = m.fusion_input(f_lr, match, ctx)
    inner = (..., slice(ys[0] - y0, ys[1] - y0), slice(xs[0] - x0, xs[1] - x0))
    return fused, f_lr, lr_up, inner


def _record(info: RunInfo, stats, q_mask, ctx, conf, index, keep_maps) -> None:
    dense = stats["queries"] * stats["keys"]
    info.matching = {
        **stats,
        "pairs_dense": dense,
        "work_saved": 1.0 - stats["pairs_evaluated"] / dense if dense else 0.0,
    }
    if q_mask is not None:
        info.mask_fraction_lr = float(q_mask.float().mean())
    if ctx.key_mask is not None and ctx.key_mask.numel() > 1:
        info.mask_fraction_lrc = float(ctx.key_mask.float().mean())
    if keep_maps:
        info.maps["confidence"] = conf[0, 0].float().cpu().numpy()
        info.maps["index"] = index[0].cpu().numpy()
        if q_mask is not None:
            info.maps["mask_lr"] = q_mask[0, 0].cpu().numpy()
        if ctx.key_mask is not None and ctx.key_mask.numel() > 1:
            info.maps["mask_lrc"] = ctx.key_mask[0, 0].cpu().numpy()
        if ctx.key_map.shape[-1] > 1:
            info.maps["key_grid_width"] = np.array(ctx.key_map.shape[-1])
