"""One network pass over a whole image, streamed in tiles whose stitched output is exact.

Per pair, once, after the trunk (stage 1, whose working maps then never sit beside it): the
reference context (LRC and Ref encoders, flow, alignment, LRC matching map and mask, dictionary
update); in a tiled run it is computed in bands of Ref rows (`reference_band_rows`) so that its
intermediate maps follow the tile size too. The LR image goes through in stages:

1. trunk at LR resolution: in tiles with a halo of its receptive field; a trunk with channel
   attention (each block pools over the whole image) runs whole, or with bounded tiles block by
   block in row bands (`model.trunk_bands`), holding two whole maps instead of about five;
2. matching features and SFM masks at 1/2 LR, in tiles with a halo; then one sparse top-1 match
   of every active LR position against the active LRC positions (memory O(queries + keys));
3. the 2x stage (upsampler, warp, high-pass, gate, dictionary attention, fusion, decoder) in
   output tiles with a halo; every tile warps from one prepared source (`with_warp_sources`).
   The fusion block's channel attention pools over the whole image, so a tile cannot finish
   before every tile's gated map (the fusion block up to its spatial gate) is known. Either a
   first pass sums that map tile by tile (with the smaller halo it needs) and a second pass
   runs the whole 2x stage again with the whole-image mean (bounded memory), or, with
   `keep_fusion_maps`, the first pass keeps the fusion input and the gated map for the whole
   output and the second runs only what follows them, with the small halo of the rest
   (`Tiling.tail_halo_hr`): the 2x stage once, at the cost of two maps of `fusion_channels`.

With `host_maps` (bounded tiles on a GPU), the whole maps live in host memory and only bands and
tiles cross to the device: the trunk's output (the LR features) and, when they would take more
than `TRUNK_DEVICE_BYTES` on the device, its two working maps; F_Ref_align as a block table from
which each tile takes the blocks its matches read (`kernels.table_part`); the LR matching maps
(matched in bands of queries, `MATCH_BAND_QUERIES`); the output. What the device still holds
whole is small beside them: the three input images, the flow, the LRC's matching keys and the
match index and score (about 60 bytes per LR pixel with as many Ref pixels).

The halos come from the network (`DualLensSR.tiling`); this module only cuts and stitches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..geometry import spans
from ..model.bands import empty_map, tiled_apply
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
    keep_fusion_maps: bool = False,
    host_maps: bool = False,
) -> torch.Tensor:
    """`model(lr, lrc, ref)` [1,3,2H,2W] in the model's dtype, computed in LR tiles of `tile`
    pixels (0: whole). Matching statistics (and with `keep_maps` the maps) go into `info`.
    `keep_fusion_maps` (tiled runs): hold the fusion block's input and gated map over the whole
    output (2 x `fusion_channels` values per output pixel) so that the 2x stage runs once, not
    twice (module docstring). `host_maps` (bounded tiles: neither whole nor kept maps): the
    whole maps in host memory, the output too (module docstring)."""
    m, tiling = model, model.tiling
    h, w = lr.shape[-2:]
    lr = pad_to_even(lr)
    hp, wp = lr.shape[-2:]
    whole = tile == 0 or (hp <= tile and wp <= tile)
    lr_tile = max(hp, wp) if whole else tile
    if whole:  # what ran: one tile is the whole image, whatever the plan said
        info.tile, keep_fusion_maps = 0, False
    info.fusion_maps = keep_fusion_maps
    bounded = not whole and not keep_fusion_maps
    host_maps = info.host_maps = host_maps and bounded
    home = torch.device("cpu") if host_maps else None  # where the whole maps live

    trunk_spans = [(y, x) for y in spans(hp, lr_tile) for x in spans(wp, lr_tile)]
    out_tile = 2 * lr_tile
    out_spans = [(y, x) for y in spans(2 * hp, out_tile) for x in spans(2 * wp, out_tile)]
    # bounded tiles: a trunk that pools over the whole image runs in bands (two whole maps)
    trunk_rows = trunk_band_rows(lr_tile, wp) if bounded and not tiling.trunk_tiles else 0
    total = len(trunk_spans) if tiling.trunk_tiles else m.trunk_steps(trunk_rows)
    total += len(trunk_spans)
    total += len(out_spans) * (1 if whole else 2)
    band_rows = 0 if whole or lrc is None else reference_band_rows(lr_tile, ref.shape[-1])
    total += m.reference_bands(ref.shape[-2:], band_rows) if lrc is not None else 1
    match_bands = matching_bands(lr, lrc, host_maps)
    total += match_bands
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # the trunk first: its working maps are the largest the LR side makes, and then they never
    # sit beside the reference context's (F_Ref_align), only its one output map does
    with timer("trunk"):
        if tiling.trunk_tiles:
            halo = tiling.trunk_halo_lr
            feat = tiled_apply(m.lr_trunk, lr, trunk_spans, halo, 1, 1, tick, home)
        elif home is not None and trunk_maps_fit_device(lr, m.config.channels):
            # its bands' crossings would cost more than its two maps' room: run it on the
            # device, then send the one result map home
            on_device = m.lr_trunk(lr, trunk_rows, tick)
            feat = empty_map(on_device.shape, on_device, home).copy_(on_device)
            del on_device
        else:
            feat = m.lr_trunk(lr, trunk_rows, tick, home)

    with timer("reference"):
        if lrc is None:
            ctx = m.empty_context(lr)
            tick()
        else:
            ctx = m.reference_context(
                lrc, ref, keep_taps=False, band_rows=band_rows, tick=tick, home=home
            )

    with timer("match_features"):
        halo = tiling.match_halo_lr
        maps = tiled_apply(m.query_maps, lr, trunk_spans, halo, 1, 2, tick, home)
        q_map, q_mask = m.split_query_maps(maps)

    with timer("matching"):
        conf, index, stats = m.sparse_match(q_map, q_mask, ctx, match_bands, tick)
        conf = conf.to(lr.dtype)

    ctx = m.with_warp_sources(ctx, host_maps)  # every tile warps against it: prepared once
    sr = empty_map((1, 3, 2 * hp, 2 * wp), lr, home)
    maps = (m, lr, feat, ctx, conf, index)
    if whole:
        with timer("decode"):
            _decode_tiles(sr, maps, out_spans, 0, None, tick)
    elif keep_fusion_maps:
        with timer("fusion_input"):
            fused, gated, pooled = _first_pass(maps, out_spans, tiling.fusion_halo_hr, tick, True)
        with timer("decode"):
            _decode_from_maps(sr, m, lr, fused, gated, pooled, out_spans, tiling.tail_halo_hr, tick)
    else:
        with timer("fusion_statistics"):
            _, _, pooled = _first_pass(maps, out_spans, tiling.fusion_halo_hr, tick, False)
        with timer("decode"):
            _decode_tiles(sr, maps, out_spans, tiling.decode_halo_hr, pooled, tick)

    _record(info, stats, q_mask, ctx, conf, index, keep_maps)
    return sr[..., : 2 * h, : 2 * w]


# On a CPU the matching runs in bands of query rows of about this many (query, key) pairs each
# (a few seconds of the reference kernel), each band a step of the progress; on a GPU the whole
# map is one launch (the fused kernel is fastest on it all), unless the run keeps its maps in
# host memory: then in bands of at most this many queries, so that the descriptors the matching
# builds for its queries (144 values each) follow the band, not the photo.
MATCH_BAND_PAIRS = 4_000_000_000
MATCH_BAND_QUERIES = 1 << 19


def matching_bands(lr: torch.Tensor, lrc: torch.Tensor | None, host_maps: bool = False) -> int:
    """How many bands of query rows the matching runs in: 1 without a reference, or on a GPU
    unless `host_maps` (bands of at least 8 rows)."""
    if lrc is None:
        return 1
    hq, wq = lr.shape[-2] // 2, lr.shape[-1] // 2
    bands = -(-hq * wq // MATCH_BAND_QUERIES) if host_maps else 1
    if lr.device.type == "cpu":
        pairs = hq * wq * (lrc.shape[-2] // 2) * (lrc.shape[-1] // 2)
        bands = max(bands, -(-pairs // MATCH_BAND_PAIRS))
    return max(1, min(bands, hq // 8))


# With host maps, a banded trunk whose two whole maps take at most this much keeps them on the
# device: each of its sweeps would move the whole map across the link and back (the full preset
# crosses about 84 maps: 25 GB at CameraFusion-Real's size in fp16), while its two maps there take
# 0.6 GB. Above it (photos of more than about 4 MP for the full preset in fp16) the maps wait in
# host memory, so the device's peak stops growing with the photo.
TRUNK_DEVICE_BYTES = 1 << 30


def trunk_maps_fit_device(lr: torch.Tensor, channels: int) -> bool:
    """Whether a host-maps run keeps the banded trunk's two whole maps on lr's device."""
    return 2 * channels * lr.shape[-2] * lr.shape[-1] * lr.element_size() <= TRUNK_DEVICE_BYTES


def trunk_band_rows(lr_tile: int, lr_width: int) -> int:
    """LR rows per band of a bounded run's trunk: about two tiles' pixels (a multiple of 8, at
    least 8). On the 2-core CPU a 12 MP trunk ran fastest in bands of 16 to 32 rows of 4032
    (40 s, against 49 s in 64-row bands and 28 s in one whole pass at 2.4 times the memory)."""
    return max(8, 2 * lr_tile * lr_tile // max(lr_width, 1) // 8 * 8)


def reference_band_rows(lr_tile: int, ref_width: int) -> int:
    """Ref rows per band of a tiled run's reference context: about as many Ref pixels as one
    output tile has (a multiple of 8, at least 8), so that its peak follows the tile's."""
    return max(8, (2 * lr_tile) ** 2 // max(ref_width, 1) // 8 * 8)


def _region(ys, xs, halo: int, hp: int, wp: int):
    """Output rows/cols ys, xs grown by `halo` and clipped to the 2x image; and the slices
    that take the requested span back out of that region."""
    y0, y1 = max(ys[0] - halo, 0), min(ys[1] + halo, 2 * hp)
    x0, x1 = max(xs[0] - halo, 0), min(xs[1] + halo, 2 * wp)
    inner = (..., slice(ys[0] - y0, ys[1] - y0), slice(xs[0] - x0, xs[1] - x0))
    return (y0, y1, x0, x1), inner


def _lr_context(y0, y1, x0, x1, hp, wp):
    """The LR rows/cols whose x2 maps cover output region y0:y1, x0:x1 exactly (the upsampler's
    3x3 conv needs one LR pixel of context, bicubic x2 two), and the crop of the x2 maps."""
    a0, a1 = max(y0 // 2 - 2, 0), min(y1 // 2 + 2, hp)
    b0, b1 = max(x0 // 2 - 2, 0), min(x1 // 2 + 2, wp)
    crop = (..., slice(y0 - 2 * a0, y1 - 2 * a0), slice(x0 - 2 * b0, x1 - 2 * b0))
    return (slice(a0, a1), slice(b0, b1)), crop


def _lr_up(m: DualLensSR, lr, box, hp, wp):
    """The bicubic x2 of LR over output region `box` (`global_skip`), else None."""
    if not m.config.global_skip:
        return None
    (rows, cols), crop = _lr_context(*box, hp, wp)
    return upsample_bicubic(lr[..., rows, cols])[crop]


def _decode_tiles(sr, maps, out_spans, halo, pooled, tick) -> None:
    """The 2x stage tile by tile, each from its own fusion input (`halo`: the stage's whole
    radius); `pooled`: the fusion statistic (None: each tile pools itself, the whole image)."""
    m = maps[0]
    for ys, xs in out_spans:
        fused, f_lr, lr_up, inner = _fusion_input(*maps, ys, xs, halo)
        out = m.decode(m.fuse(fused, pooled), f_lr, lr_up)
        sr[..., ys[0] : ys[1], xs[0] : xs[1]].copy_(out[inner])
        tick()


def _first_pass(maps, out_spans, halo, tick, keep: bool):
    """The fusion block's gated map, tile by tile: its whole-image mean [1,C,1,1] (the channel
    attention's statistic), and with `keep` the fusion input and the gated map over the whole
    output, so that the rest of the 2x stage runs once per tile (else None, None)."""
    m, lr = maps[0], maps[1]
    hp, wp = lr.shape[-2:]
    shape = (1, m.config.fusion_channels, 2 * hp, 2 * wp)
    fused_all = gated_all = None
    if keep:
        fused_all = empty_map(shape, lr)
        gated_all = torch.empty_like(fused_all)
    acc = torch.zeros(shape[1], device=lr.device, dtype=torch.float32)
    for ys, xs in out_spans:
        fused, _, _, inner = _fusion_input(*maps, ys, xs, halo)
        gated = m.fusion_pool_input(fused)[inner]
        acc += gated.float().sum(dim=(0, 2, 3))
        if keep:
            fused_all[..., ys[0] : ys[1], xs[0] : xs[1]] = fused[inner]
            gated_all[..., ys[0] : ys[1], xs[0] : xs[1]] = gated
        tick()
    return fused_all, gated_all, (acc / (4 * hp * wp)).to(lr.dtype).view(1, -1, 1, 1)


def _decode_from_maps(sr, m: DualLensSR, lr, fused_all, gated_all, pooled, spans_, halo, tick):
    """The 2x stage after the fusion block's gated map, tile by tile, from the whole maps."""
    hp, wp = lr.shape[-2:]
    for ys, xs in spans_:
        box, inner = _region(ys, xs, halo, hp, wp)
        y0, y1, x0, x1 = box
        fused = fused_all[..., y0:y1, x0:x1]
        gated = gated_all[..., y0:y1, x0:x1]
        f_lr = fused[:, m.f_lr_channels]
        out = m.decode(m.fuse_gated(fused, gated, pooled), f_lr, _lr_up(m, lr, box, hp, wp))
        sr[..., ys[0] : ys[1], xs[0] : xs[1]] = out[inner]
        tick()


def _fusion_input(m: DualLensSR, lr, feat, ctx: ReferenceContext, conf, index, ys, xs, halo):
    """The fusion block's input for output rows ys, cols xs (+ halo, clipped to the image).

    Returns (fused, f_lr, lr_up, inner): `lr_up` is the bicubic x2 of LR for `global_skip`
    (else None) and `inner` slices the requested span out of the region.
    """
    hp, wp = feat.shape[-2:]
    cell = m.tiling.cell_hr
    box, inner = _region(ys, xs, halo, hp, wp)
    y0, y1, x0, x1 = box
    (rows, cols), crop = _lr_context(*box, hp, wp)
    f_lr = m.upsample(feat[..., rows, cols].to(lr.device))[crop]  # feat may be in host memory
    cells = (slice(y0 // cell, y1 // cell), slice(x0 // cell, x1 // cell))
    idx = index[:, cells[0], cells[1]]
    match = MatchResult(m.warp(ctx, idx), conf[:, :, cells[0], cells[1]], idx, None, None)
    fused = m.fusion_input(f_lr, match, ctx)
    return fused, f_lr, _lr_up(m, lr, box, hp, wp), inner


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
