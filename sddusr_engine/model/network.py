"""The two networks assembled: `kedusr` (published KeDuSR) and `sddusr` (KeDuSR + SFM + TDL).

Stages are separate methods so that the engine can run the reference context once per pair and
stream the LR image through the rest in tiles, and the network describes its own halos
(`DualLensSR.tiling`), so the engine holds no counted constants. No device, dtype, file or
post-processing logic lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, get_config
from ..kernels import KernelOps, get_ops, patch_table, patch_warp_blocked, table_part
from .align import FlowGuidedAlign
from .bands import RowWindow, empty_map, row_bands, tiled_apply
from .blocks import FusionBlock, PixelShuffleUp, ResList, Trunk, conv3x3
from .flow import SpyNet
from .low_band import LinearUpsampler
from .matching import (
    MaskGenerator,
    MatchFeatures,
    dense_match_train,
    high_pass,
    high_pass_covered,
    sparse_match,
    warp_by_index,
    warp_coverage,
)
from .tdl import Dictionaries, TokenDictionary
from .trunk_bands import trunk_band_steps, trunk_in_bands


@dataclass
class ReferenceContext:
    """Everything computed once per (LRC, Ref) pair; shared by all tiles of the LR image."""

    f_ref_align: torch.Tensor  # [B,C,2hc,2wc]
    key_map: torch.Tensor  # [B,m,hc/2,wc/2] matching map of LRC
    key_mask: torch.Tensor | None  # bool [B,1,hc/2,wc/2], inference with SFM only
    dicts: Dictionaries | None  # TDL, sddusr only
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    empty: bool = False  # no reference (`empty_context`): nothing can match
    # per batch item, what the warp reads for many tiles (`DualLensSR.with_warp_sources`)
    warp_sources: list | None = None
    # the sources are block tables in host memory: each warp takes the part it reads
    host_tables: bool = False


@dataclass(frozen=True)
class Tiling:
    """How the network may be cut into tiles whose stitched output equals a whole-image pass.

    Halos are the receptive radii of the stages that run per tile, rounded up to the grids the
    stages work on; the engine adds them around each tile and crops them off again.
    """

    trunk_tiles: bool  # False: the trunk's channel attention pools over the whole image
    trunk_halo_lr: int  # LR pixels of context each trunk tile needs
    match_halo_lr: int  # LR pixels of context of the matching features and SFM masks
    ref_encoder_halo_hr: int  # Ref pixels of context of the Ref encoder
    lrc_encoder_halo_lr: int  # LRC pixels of context of the LRC encoder (which outputs at 2x)
    decode_halo_hr: int  # output pixels of context of the 2x stage (multiple of 8)
    fusion_halo_hr: int  # ... of the fusion block's gated map (`fusion_pool_input`)
    tail_halo_hr: int  # ... of the 2x stage after that map (`fuse_gated` and `decode`)
    cell_hr: int  # output pixels per matching cell: 2x-stage tiles are aligned to it


@dataclass
class MatchResult:
    warp_sum: torch.Tensor  # [B,C,4hq,4wq] summed fold of matched Ref patches
    confidence: torch.Tensor  # [B,1,hq,wq]
    index: torch.Tensor | None  # [B,hq,wq] (inference only)
    mask_logits: torch.Tensor | None  # [B,2,hq,wq] (SFM only)
    mask: torch.Tensor | None  # [B,1,hq,wq] (SFM only): hard Gumbel (train) or bool (eval)
    stats: dict[str, int] = field(default_factory=dict)  # matching work (inference only)
    query_map: torch.Tensor | None = None  # [B,m,hq,wq] the LR matching map (for its loss)


# `warp_low_band`: the gain on the low band is 2·alpha·LOW_BAND_SCALE·low_band_gain, so a stored
# value of 1/LOW_BAND_SCALE passes the whole warp (detail plus low band) at the detail's scale.
# Adam moves a parameter by about the learning rate per step, whatever its gradient, and the
# detail map's 2·alpha is about 30 in the shipped weights: unscaled, the gain would need tens of
# thousands of steps to matter (a 300-step CPU run moved it by at most 0.005).
LOW_BAND_SCALE = 100.0


def _head(channels: int) -> nn.Sequential:
    # A plain conv (no activation), matching the published golden outputs; Sequential for its keys.
    return nn.Sequential(conv3x3(3, channels))


class DualLensSR(nn.Module):
    """LR (wide) + LRC (its centre crop) + Ref (telephoto on the 2xLRC grid) -> 2x LR."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n = config.channels
        self.ops: KernelOps = get_ops("torch")
        # LR branch
        self.SISR = Trunk(
            n,
            config.trunk_groups,
            config.trunk_blocks,
            config.ca_reduction,
            config.trunk_channel_attention,
        )
        self.upsample = PixelShuffleUp(n)
        # reference branch
        self.lr_nearby_head = _head(n)
        self.upsample_lr_nearby = PixelShuffleUp(n)
        self.lr_nearby_encoder = ResList(n, config.encoder_blocks)
        self.ref_head = _head(n)
        self.ref_encoder = ResList(n, config.encoder_blocks)
        self.spynet = SpyNet()
        self.Ref_align = FlowGuidedAlign(n)
        # matching
        self.feature_match = MatchFeatures(config.match_channels)
        self.alpha = nn.Parameter(torch.ones(1))
        if config.warp_low_band:  # zero: starts as the network without it (config.warp_low_band)
            self.low_band_gain = nn.Parameter(torch.zeros(1, n, 1, 1))
        self.alphaConf2X = nn.Sequential(
            nn.Conv2d(1, 16, 7, 1, 3),
            nn.LeakyReLU(0.2),
            nn.Conv2d(16, n, 3, 1, 1),
            nn.LeakyReLU(0.2),
        )
        if config.use_sfm:
            self.mask_generator = MaskGenerator(128, config.mask_hidden)
        if config.use_tdl:
            self.tdl = TokenDictionary(n, config.tokens, config.token_dim)
        # fusion and decoder ("AdaFuison" is the published checkpoint's spelling)
        self.AdaFuison = FusionBlock(config.fusion_channels, config.ca_reduction)
        self.fusion_tail = nn.Sequential(conv3x3(config.fusion_channels, n), nn.LeakyReLU(0.2))
        self.decoder = ResList(n, config.decoder_blocks)
        self.decoder_tail = nn.Sequential(conv3x3(n, n // 2), nn.LeakyReLU(0.2), conv3x3(n // 2, 3))
        if config.low_band_taps:  # used by the engine's post-processing (engine/postprocess.py)
            self.low_band_upsampler = LinearUpsampler(config.low_band_taps)
        if config.global_skip:  # start as exactly bicubic
            nn.init.zeros_(self.decoder_tail[-1].weight)
            nn.init.zeros_(self.decoder_tail[-1].bias)

    # -- kernels --------------------------------------------------------------------------------
    def use_kernels(self, backend: str) -> DualLensSR:
        """Run the matching, warp, attention and deformable conv on `backend` ("torch"/"triton")."""
        self.ops = get_ops(backend)
        return self

    # -- reference context (once per pair) ------------------------------------------------------
    def encode_lrc(self, lrc: torch.Tensor) -> torch.Tensor:
        return self.lr_nearby_encoder(self.upsample_lr_nearby(self.lr_nearby_head(lrc)))

    def encode_ref(self, ref: torch.Tensor) -> torch.Tensor:
        return self.ref_encoder(self.ref_head(ref))

    def reference_context(
        self,
        lrc: torch.Tensor,
        ref: torch.Tensor,
        keep_taps: bool = True,
        band_rows: int = 0,
        tick=None,
        home=None,
    ) -> ReferenceContext:
        """lrc [B,3,hc,wc] (even sides), ref [B,3,2hc,2wc]. `keep_taps=False` lets the
        intermediate features go (the engine's runs: F_Ref alone is C values per Ref pixel).

        `band_rows` (a multiple of 8; 0: whole), inference only: the same context computed in
        full-width bands of that many Ref rows, each with the halo of its stage, so that the
        encoders', the alignment's and the matching features' intermediate maps exist for one band
        at a time (see `_reference_context_in_bands`). `tick()` is called after each step (each
        band of each stage in bands; `reference_bands` of them in all), so that a long reference
        stage shows its progress. In bands, F_Ref_align is written to `home` (None: lrc's device;
        the host for a GPU run with host maps)."""
        _check_pair(lrc, ref)
        if band_rows:
            return self._reference_context_in_bands(lrc, ref, band_rows, tick, home)
        tick = tick or (lambda: None)
        f_lrc = self.encode_lrc(lrc)
        f_ref = self.encode_ref(ref)
        tick()
        flow = self.spynet(lrc, F.avg_pool2d(ref, 2))
        tick()
        f_ref_align = self.Ref_align(f_ref, f_lrc, flow, self.ops.deform_conv2d)
        tick()
        f_m, key_map = self.feature_match(lrc)
        key_mask = None
        if self.config.use_sfm and not self.training:
            # Training masks only the LR side (paper 3.2); inference masks both.
            key_mask = MaskGenerator.hard_mask(self.mask_generator(f_m))
        dicts = (
            self.tdl.update(f_lrc, f_ref_align, self.ops.attention) if self.config.use_tdl else None
        )
        tick()
        taps = {"f_lrc": f_lrc, "f_ref": f_ref, "flow": flow} if keep_taps else {}
        return ReferenceContext(f_ref_align, key_map, key_mask, dicts, taps)

    def reference_bands(self, ref_hw: tuple[int, int], band_rows: int) -> int:
        """How many times `reference_context(..., band_rows)` ticks for a Ref of `ref_hw`: per
        band of the alignment and of the LRC keys; whole (0), after the encoders, the flow, the
        alignment and the keys with the dictionaries."""
        if not band_rows:
            return 4
        return 2 * -(-ref_hw[0] // band_rows)

    def _reference_context_in_bands(
        self, lrc, ref, band_rows: int, tick, home=None
    ) -> ReferenceContext:
        """What stays whole: F_Ref_align (the warp picks its patches anywhere), C values per Ref
        pixel, and the flow. F_Ref is made in chunks of rows as the alignment's bands reach
        them (`FlowGuidedAlign.reach`: where the flow points) and let go above the band
        (`RowWindow`), so it is whole only where the flow sends every band everywhere. F_LRC is
        made band by band (with the halo of its encoder) for the alignment and the dictionary
        update, whose softmax over all positions is merged from the bands'."""
        if band_rows <= 0 or band_rows % 8:
            raise ValueError(f"band_rows must be a positive multiple of 8, got {band_rows}")
        if self.training:
            raise ValueError("the banded reference context is for inference")
        t = self.tiling
        hr, wr = ref.shape[-2:]
        f_ref = RowWindow(self.encode_ref, ref, band_rows, t.ref_encoder_halo_hr)
        flow = self.spynet(lrc, F.avg_pool2d(ref, 2), band_rows // 2)  # LRC rows per band
        flow = self.Ref_align.upsampled_flow(flow)
        f_ref_align = None
        tdl_bands = []
        halo, lrc_halo = self.Ref_align.HALO, t.lrc_encoder_halo_lr
        for y0 in range(0, hr, band_rows):
            y1 = min(y0 + band_rows, hr)
            # Ref rows a0..a1 of context (even, so that they are whole LRC rows), and the LRC rows
            # with the encoder's halo that make them
            a0, a1 = max(y0 - halo, 0) // 2 * 2, min(y1 + halo + 1, hr) // 2 * 2
            c0, c1 = max(a0 // 2 - lrc_halo, 0), min(a1 // 2 + lrc_halo, hr // 2)
            f_lrc = self.encode_lrc(lrc[..., c0:c1, :])[..., a0 - 2 * c0 : a1 - 2 * c0, :]
            rows = slice(y0 - a0, y1 - a0)
            band_flow = flow[..., a0:a1, :]
            lo, hi = self.Ref_align.reach(band_flow, a0, hr)
            out = self.Ref_align.band(
                f_ref.rows(lo, hi), f_lrc, band_flow, a0, rows, self.ops.deform_conv2d, lo
            )
            if f_ref_align is None:
                f_ref_align = empty_map((*out.shape[:2], hr, out.shape[-1]), out, home)
            f_ref_align[..., y0:y1, :].copy_(out)
            if self.config.use_tdl:
                tdl_bands.append(
                    self.tdl.partial_update(f_lrc[..., rows, :], out, self.ops.attention)
                )
            if tick is not None:
                tick()
        del f_ref
        maps = tiled_apply(self.query_maps, lrc, row_bands(hr // 2, wr // 2, band_rows // 2),
                           t.match_halo_lr, 1, 2, tick)  # fmt: skip
        key_map, key_mask = self.split_query_maps(maps)
        dicts = self.tdl.finish_update(tdl_bands) if self.config.use_tdl else None
        return ReferenceContext(f_ref_align, key_map, key_mask, dicts, {})

    def empty_context(self, lr: torch.Tensor) -> ReferenceContext:
        """A context with no reference: nothing matches (C = 0, no warp), TDL uses its learned
        dictionaries without the per-pair update. The network "with the reference switched off"."""
        b, n = lr.shape[0], self.config.channels
        return ReferenceContext(
            f_ref_align=lr.new_zeros(b, n, 4, 4),
            key_map=lr.new_zeros(b, self.config.match_channels, 2, 2),
            key_mask=torch.zeros(b, 1, 2, 2, dtype=torch.bool, device=lr.device),
            dicts=self.tdl.learned(b) if self.config.use_tdl else None,
            empty=True,
        )

    # -- how it tiles ---------------------------------------------------------------------------
    @property
    def tiling(self) -> Tiling:
        c = self.config
        # trunk: the head conv (1) + per group its blocks (2 convs each) and the group conv (1),
        # + the trunk's tail conv (1)
        trunk = 2 + c.trunk_groups * (2 * c.trunk_blocks + 1)
        # matching features: four 3x3 convs (two at LR, two at 1/2 LR) and the map conv, then the
        # 3x3 descriptor and the SFM generator: 16 LR pixels covers them with the 2x2 pooling grid
        match = 16
        # 2x stage, in output pixels: the warp/high-pass/gate inputs' fringe (a 9x9 patch of
        # stride 4 and the 7x7 + 3x3 confidence convs after a x4 bicubic: 16), the fusion block's
        # two 3x3 convs and 7x7 spatial attention (5), the fusion tail (1), the decoder's blocks
        # and group conv (2 per block + 1), the decoder tail (2)
        fringe, gated = 16, 1 + 3  # the fusion block's first conv and its 7x7 spatial gate
        tail = 1 + 1 + (2 * c.decoder_blocks + 1) + 2  # its second conv, the fusion tail, ...
        radius = fringe + gated + tail
        # encoders: the head conv and a ResList (2 convs per block and its tail conv); the LRC's
        # also has the x2 upsampler's conv at LRC resolution before its ResList at Ref resolution
        encoder_hr = 2 * c.encoder_blocks + 1
        return Tiling(
            trunk_tiles=not c.trunk_channel_attention,
            trunk_halo_lr=trunk,
            match_halo_lr=match,
            ref_encoder_halo_hr=1 + encoder_hr,
            lrc_encoder_halo_lr=2 + -(-encoder_hr // 2),
            decode_halo_hr=-(-radius // 8) * 8,
            fusion_halo_hr=-(-(fringe + gated) // 8) * 8,
            tail_halo_hr=-(-tail // 8) * 8,
            cell_hr=c.patch_stride,  # a matching cell (2 LR pixels) is one warp stride
        )

    # -- LR branch (streams in tiles) -----------------------------------------------------------
    def lr_trunk(self, lr: torch.Tensor, band_rows: int = 0, tick=None, home=None) -> torch.Tensor:
        """The LR trunk; `band_rows` > 0 (inference): in full-width bands of that many rows,
        exact with the channel attention, holding two whole maps (a whole pass: about five)
        on `home` (None: lr's device; the host for a GPU run with host maps)
        (`trunk_bands.trunk_in_bands`; `tick()` after each of its `trunk_steps`)."""
        if band_rows:
            return trunk_in_bands(self.SISR, lr, band_rows, tick, home)
        out = self.SISR(lr)
        if tick is not None:
            tick()
        return out

    def trunk_steps(self, band_rows: int = 0) -> int:
        """How many times `lr_trunk(..., band_rows, tick)` ticks."""
        return trunk_band_steps(self.SISR) if band_rows else 1

    def query_maps(self, lr: torch.Tensor) -> torch.Tensor:
        """lr [B,3,H,W] -> [B, m (+2 with SFM), H/2, W/2]: the matching map and the SFM logits,
        stacked so that a tiled caller stitches one tensor (`split_query_maps` takes it apart)."""
        f_m, q_map = self.feature_match(lr)
        if not self.config.use_sfm:
            return q_map
        return torch.cat([q_map, self.mask_generator(f_m)], dim=1)

    def split_query_maps(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(matching map, hard SFM mask or None) from `query_maps`' stacked output."""
        m = self.config.match_channels
        if not self.config.use_sfm:
            return maps, None
        return maps[:, :m], MaskGenerator.hard_mask(maps[:, m:])

    def sparse_match(self, q_map, q_mask, ctx: ReferenceContext, row_bands: int = 1, tick=None):
        """(confidence, index, work counts): top-1 of every active query among the active keys;
        in `row_bands` bands of query rows, `tick()` after each (`matching.sparse_match`)."""
        return sparse_match(
            q_map, ctx.key_map, q_mask, ctx.key_mask, self.ops.patch_match, row_bands, tick
        )

    def warp(self, ctx: ReferenceContext, index: torch.Tensor) -> torch.Tensor:
        """The summed fold of the aligned Ref patches that `index` [B,hq,wq] picks."""
        source = ctx.f_ref_align if ctx.warp_sources is None else ctx.warp_sources
        c = self.config
        if ctx.host_tables:  # only the blocks this index reads cross to its device
            parts = [table_part(t, index[i]) for i, t in enumerate(source)]
            return warp_by_index(parts, index, patch_warp_blocked, c.patch_size, c.patch_stride)
        return warp_by_index(source, index, self.ops.patch_warp, c.patch_size, c.patch_stride)

    def with_warp_sources(self, ctx: ReferenceContext, host_tables: bool = False):
        """`ctx` prepared for warping many tiles: each item's `KernelOps.warp_source` of
        F_Ref_align (on the CPU its block table, cut once instead of per tile). Where a table
        replaces the map, the map itself is let go (the table holds the same values).

        `host_tables` (F_Ref_align kept where it is, in host memory for a GPU run): block
        tables in F_Ref_align's dtype where it lives, from which each warp sends its device only
        the blocks its index reads (`kernels.table_part`), whatever the photo's size."""
        c = self.config
        maps = list(ctx.f_ref_align)
        if host_tables and not ctx.empty:  # `patch_table` refuses patches not of whole blocks
            tables = [patch_table(f, c.patch_size, c.patch_stride, f.dtype) for f in maps]
            return replace(ctx, warp_sources=tables, f_ref_align=None, host_tables=True)
        sources = [self.ops.warp_source(f, c.patch_size, c.patch_stride) for f in maps]
        kept = all(s is f for s, f in zip(sources, maps, strict=True))
        return replace(ctx, warp_sources=sources, f_ref_align=ctx.f_ref_align if kept else None)

    def fusion_pool_input(self, fused: torch.Tensor) -> torch.Tensor:
        """The map whose whole-image channel mean the fusion block's channel attention pools."""
        return self.AdaFuison.gated(fused)

    def fuse(self, fused: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The fusion block; `pooled` [1,C,1,1] is the whole image's mean when run in tiles."""
        return self.AdaFuison(fused, pooled)

    def fuse_gated(self, fused, gated, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The fusion block from its input and its `fusion_pool_input`, computed before."""
        return self.AdaFuison.finish(fused, gated, pooled)

    @property
    def f_lr_channels(self) -> slice:
        """Where F_LR sits among the fusion input's channels (see `fusion_input`)."""
        n = self.config.channels
        return slice(n, 2 * n) if self.config.variant == "kedusr" else slice(0, n)

    def match(self, lr: torch.Tensor, ctx: ReferenceContext) -> MatchResult:
        """Match the LR tile's patches against the whole LRC and warp the aligned Ref patches."""
        f_m, q_map = self.feature_match(lr)
        logits = self.mask_generator(f_m) if self.config.use_sfm else None
        if self.training and ctx.empty:
            # as inference does with no active key: no query matches, zero warp, zero confidence
            b, _, hq, wq = q_map.shape
            n, stride = ctx.f_ref_align.shape[1], self.config.patch_stride
            none = q_map.new_zeros(b, 1, hq, wq)
            warp_sum = q_map.new_zeros(b, n, stride * hq, stride * wq)
            return MatchResult(warp_sum, none, None, logits, none, query_map=q_map)
        if self.training:
            if logits is not None:
                mask = MaskGenerator.gumbel_mask(logits)
            else:
                mask = q_map.new_ones(q_map.shape[0], 1, *q_map.shape[-2:])
            warp_sum, conf = dense_match_train(
                q_map, ctx.key_map, ctx.f_ref_align, mask,
                temperature=self.config.match_temperature,
            )  # fmt: skip
            return MatchResult(warp_sum, conf, None, logits, mask, query_map=q_map)
        mask = MaskGenerator.hard_mask(logits) if logits is not None else None
        conf, index, stats = sparse_match(
            q_map, ctx.key_map, mask, ctx.key_mask, self.ops.patch_match
        )
        warp_sum = warp_by_index(ctx.f_ref_align, index, self.ops.patch_warp)
        return MatchResult(
            warp_sum, conf.to(warp_sum.dtype), index, logits, mask, stats, query_map=q_map
        )

    def confidence_gate(self, confidence: torch.Tensor) -> torch.Tensor:
        """h(C): the confidence [B,1,hq,wq] on the output grid, mapped to per-channel gates."""
        return self.alphaConf2X(
            F.interpolate(confidence, scale_factor=4, mode="bicubic", align_corners=False)
        )

    @property
    def warp_channels(self) -> slice:
        """Where gate * hf sits among the fusion input's channels (see `fusion_input`)."""
        n = self.config.channels
        return slice(0, n) if self.config.variant == "kedusr" else slice(n, 2 * n)

    def reference_detail(self, m: MatchResult) -> torch.Tensor:
        """hf: the high band of the warped Ref features (see `config.warp_norm`)."""
        if self.config.warp_norm == "constant":  # the published arithmetic
            return high_pass(m.warp_sum, self.alpha)
        if m.index is not None:  # inference: the queries that were matched
            active = (m.index >= 0)[:, None].to(m.warp_sum.dtype)
        elif m.mask is not None:  # training: the (straight-through) SFM mask
            active = m.mask.to(m.warp_sum.dtype)
        else:
            active = m.warp_sum.new_ones(m.warp_sum.shape[0], 1, *m.confidence.shape[-2:])
        coverage = warp_coverage(active, self.config.patch_size, self.config.patch_stride)
        low_gain = None
        if self.config.warp_low_band:
            low_gain = 2.0 * self.alpha * (LOW_BAND_SCALE * self.low_band_gain)
        return high_pass_covered(m.warp_sum, coverage, self.alpha, low_gain)

    def fusion_input(self, f_lr, m: MatchResult, ctx: ReferenceContext) -> torch.Tensor:
        fused_kernel = self.ops.fused_detail is not None and m.index is not None
        if fused_kernel and not torch.is_grad_enabled():
            return self._fusion_input_fused(f_lr, m, ctx)
        hf = self.reference_detail(m)
        gate = self.confidence_gate(m.confidence)
        if self.config.variant == "kedusr":
            return torch.cat([hf * gate, f_lr], dim=1)
        f_dict = self.tdl.learn(f_lr, ctx.dicts, self.ops.attention)
        return torch.cat([f_lr, gate * hf, f_dict], dim=1)  # paper eq. 1

    def _fusion_input_fused(self, f_lr, m: MatchResult, ctx: ReferenceContext) -> torch.Tensor:
        """`fusion_input` for inference with `KernelOps.fused_detail`: each part written into
        its channels of one tensor (f_lr's layout), the detail and its gate by one kernel,
        instead of a chain of element-wise maps and a concatenation."""
        c, n = self.config, self.config.channels
        gate = self.confidence_gate(m.confidence)
        b, _, h, w = f_lr.shape
        shape = (b, c.fusion_channels, h, w)
        fused = empty_map(shape, f_lr)
        fused[:, self.f_lr_channels] = f_lr
        low_gain = None
        if c.warp_low_band:
            low_gain = (2.0 * self.alpha * (LOW_BAND_SCALE * self.low_band_gain)).reshape(-1)
        for i in range(b):
            self.ops.fused_detail(
                m.warp_sum[i], gate[i], self.alpha, norm=c.warp_norm, index=m.index[i],
                low_gain=low_gain, out=fused[i, self.warp_channels],
            )  # fmt: skip
        if c.variant != "kedusr":
            fused[:, 2 * n :] = self.tdl.learn(f_lr, ctx.dicts, self.ops.attention)
        return fused

    def decode(self, fused: torch.Tensor, f_lr: torch.Tensor, lr_up: torch.Tensor | None = None):
        """Fused features -> image; `lr_up` (bicubic x2 of LR) is added with `global_skip`."""
        x = self.fusion_tail(fused)
        out = self.decoder_tail(self.decoder(x) + f_lr)
        return out + lr_up if self.config.global_skip else out

    # -- whole image ----------------------------------------------------------------------------
    def forward(self, lr, lrc, ref, return_aux: bool = False):
        """lr [B,3,H,W], lrc [B,3,hc,wc], ref [B,3,2hc,2wc], in [0,1] -> [B,3,2H,2W].

        lrc = ref = None runs the network with the reference switched off (`empty_context`).
        """
        h, w = lr.shape[-2:]
        lr = pad_to_even(lr)
        ctx = self.empty_context(lr) if lrc is None else self.reference_context(lrc, ref)
        f_lr = self.upsample(self.lr_trunk(lr))
        m = self.match(lr, ctx)
        fused = self.fusion_input(f_lr, m, ctx)
        block_out = self.AdaFuison(fused)
        lr_up = upsample_bicubic(lr) if self.config.global_skip else None
        sr = self.decode(block_out, f_lr, lr_up)[..., : 2 * h, : 2 * w]
        if not return_aux:
            return sr
        aux: dict[str, Any] = {
            **ctx.taps,
            "f_ref_align": ctx.f_ref_align,
            "f_lr": f_lr,
            "confidence": m.confidence,
            "index": m.index,
            "warp_sum": m.warp_sum,
            "fusion_block": block_out,
            "match_stats": m.stats,
            "query_map": m.query_map,
            "key_map": ctx.key_map,
        }
        if m.mask_logits is not None:
            aux["mask_prob_lr"] = MaskGenerator.probability(m.mask_logits)
            aux["mask_lr"] = m.mask
            aux["mask_lrc"] = ctx.key_mask
        return sr, aux


def upsample_bicubic(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)


def pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """Odd sides get one replicated row/column, cropped from the output again."""
    ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def _check_pair(lrc: torch.Tensor, ref: torch.Tensor) -> None:
    hc, wc = lrc.shape[-2:]
    if hc % 2 or wc % 2:
        raise ValueError(f"LRC must have even height and width, got {hc}x{wc}")
    if tuple(ref.shape[-2:]) != (2 * hc, 2 * wc):
        raise ValueError(
            f"Ref must be exactly twice LRC's size ({2 * hc}x{2 * wc}), got "
            f"{ref.shape[-2]}x{ref.shape[-1]}"
        )


def build_model(
    variant: str = "sddusr", config: ModelConfig | None = None, **overrides
) -> DualLensSR:
    """The `variant` network; `config` (if given) replaces the preset, `overrides` edit fields."""
    cfg = replace(config, **overrides) if config is not None else get_config(variant, **overrides)
    return DualLensSR(cfg)
