"""The engine: weights in, wide/tele pairs in, x2 images out, streamed through the device in tiles.

Per pair, once: the reference context (LRC and Ref encoders, flow, alignment, LRC matching map and
mask, dictionary update). Then the LR image goes through in stages:

1. trunk at LR resolution: in tiles with a halo of its receptive field (kedusr), or whole when
   the trunk has channel attention (sddusr: each block pools over the whole image);
2. matching features and SFM masks at 1/2 LR, in tiles with a halo; then one sparse top-1 match
   of every active LR position against the active LRC positions (memory O(queries + keys));
3. the 2x stage (upsampler, warp, high-pass, gate, dictionary attention, fusion, decoder) in
   output tiles with a halo. The fusion block's channel attention pools over the whole image, so
   a first pass over the tiles sums the pooled map (only up to the fusion block's first conv) and
   the second pass uses that whole-image mean. The stitched output equals a whole-image pass.

With `ensemble=N` (2, 4 or 8) every pair goes through N times, flipped and transposed (LR, LRC
and Ref alike), and the N outputs, mapped back, are averaged: geometric self-ensemble, N times
the work for a sharper, less noisy estimate (weights/MODEL_CARD.md has the measured gain).

The engine is stateless per call: `run` and `super_resolve` are pure functions of their inputs.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import io as imageio
from .adapt import AdaptSettings, adapt_single_image_path, blend_outside, crop_size
from .errors import EngineError
from .kernels import HAS_TRITON
from .low_band import locate_crop
from .model.matching import MaskGenerator, sparse_match, warp_by_index
from .model.network import (
    DualLensSR,
    MatchResult,
    ReferenceContext,
    pad_to_even,
    upsample_bicubic,
)
from .weights import load_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Progress = Callable[[int, int], None]

# The eight symmetries of the square, as (transpose, flip width, flip height), ordered so that
# the first 2 and the first 4 are the most useful subsets: {identity, 180-degree turn} pairs
# opposite corners of every filter, the 4 flips keep the image's orientation, and the last 4
# add the transpose (a portrait image goes through the network as a landscape one).
SYMMETRIES = (
    (False, False, False),
    (False, True, True),
    (False, True, False),
    (False, False, True),
    (True, False, False),
    (True, True, True),
    (True, True, False),
    (True, False, True),
)
ENSEMBLE_SIZES = (1, 2, 4, 8)
MAX_ADAPT_STEPS = 10_000  # self-adaptation steps per pair (a typo guard, not a tuned limit)


def apply_symmetry(x: torch.Tensor, sym: tuple[bool, bool, bool]) -> torch.Tensor:
    transpose, flip_w, flip_h = sym
    x = x.transpose(-1, -2) if transpose else x
    dims = [d for d, f in ((-1, flip_w), (-2, flip_h)) if f]
    return x.flip(dims) if dims else x


def undo_symmetry(x: torch.Tensor, sym: tuple[bool, bool, bool]) -> torch.Tensor:
    transpose, flip_w, flip_h = sym
    dims = [d for d, f in ((-1, flip_w), (-2, flip_h)) if f]
    x = x.flip(dims) if dims else x
    return x.transpose(-1, -2) if transpose else x


def symmetric_passes(forward, lr, lrc, ref, n: int):
    """Yield, for each of the first n SYMMETRIES, `forward(k, lr, lrc, ref)` on the transformed
    pair (lrc = ref = None allowed), mapped back, cropped to 2x LR's size and clamped to [0, 1],
    in fp32. Their mean is the self-ensemble's output (an average of images, as eval scores them).

    LR is padded to even sides before the flips: a flipped LR then keeps its matching cells on
    the same 2-pixel grid as the LRC's (an even box origin stays even).
    """
    h, w = lr.shape[-2:]
    lr = pad_to_even(lr)
    for k, sym in enumerate(SYMMETRIES[:n]):
        out = forward(k, *(None if t is None else apply_symmetry(t, sym) for t in (lr, lrc, ref)))
        yield undo_symmetry(out, sym)[..., : 2 * h, : 2 * w].float().clamp(0, 1)


@dataclass
class RunInfo:
    """What one call did: stage timings (ms), registration, SFM statistics, optional maps."""

    timings: dict[str, float] = field(default_factory=dict)
    tile: int = 0
    footprint: Any = None  # registration.Footprint for raw pairs
    box: tuple[int, int, int, int] | None = None  # LRC rectangle in LR pixels (y0, y1, x0, x1)
    mask_fraction_lr: float | None = None
    mask_fraction_lrc: float | None = None
    matching: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ensemble: int = 1  # passes averaged (geometric self-ensemble); timings are their sums
    adapt_steps: int = 0  # self-adaptation steps run (0: none)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("footprint", "maps")}
        fp = self.footprint
        if fp is not None:
            d["footprint"] = {
                "homography": np.asarray(fp.homography).tolist(),
                "corners": np.asarray(fp.corners).tolist(),
                "confidence": float(fp.confidence),
                "inliers": int(fp.inliers),
                "zoom": float(fp.zoom),
                "rotation_deg": float(fp.rotation_deg),
            }
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return d


StageHook = Callable[[str], AbstractContextManager]


class _StageTimer:
    """Times each stage (synchronising the device); `hook(stage)`, if given, wraps the stage too
    (the profiler counts FLOPs and peak memory per stage with it)."""

    def __init__(self, device: torch.device, timings: dict[str, float], hook: StageHook | None):
        self.device, self.timings, self.hook = device, timings, hook

    @contextmanager
    def __call__(self, stage: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with self.hook(stage) if self.hook is not None else nullcontext():
            yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + 1e3 * (time.perf_counter() - t0)


def _spans(size: int, tile: int) -> list[tuple[int, int]]:
    """Cover [0, size) with spans of `tile` (the last one shorter)."""
    return [(s, min(s + tile, size)) for s in range(0, size, tile)]


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("CUDA was asked for, but no CUDA GPU is available; use --device cpu.")
    return dev


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EngineError(f"unknown precision {dtype!r}; expected auto, fp32, fp16 or bf16.")
    if device.type == "cpu" and dtype != "fp32":
        raise EngineError(f"{dtype} runs on a GPU only; use fp32 on the CPU.")
    return DTYPES[dtype]


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend not in ("triton", "torch"):
        raise EngineError(f"unknown backend {backend!r}; expected auto, triton or torch.")
    if backend == "triton" and not HAS_TRITON:
        raise EngineError("the triton backend needs the triton package, which is not installed.")
    return backend


class Engine:
    """A loaded network on one device, ready to super-resolve pairs."""

    MIN_TILE = 32

    def __init__(
        self,
        model: DualLensSR,
        device,
        dtype,
        backend: str = "auto",
        tile: int = 256,
        channels_last: bool = False,
        ensemble: int = 1,
        adapt: int = 0,
    ):
        if ensemble not in ENSEMBLE_SIZES:
            raise EngineError(f"ensemble must be one of {ENSEMBLE_SIZES}, got {ensemble}.")
        self.ensemble = int(ensemble)
        if not 0 <= int(adapt) <= MAX_ADAPT_STEPS:
            raise EngineError(f"adapt must be 0 (off) to {MAX_ADAPT_STEPS} steps, got {adapt}.")
        self.adapt = AdaptSettings(steps=int(adapt))
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.backend = _resolve_backend(backend, self.device)
        if tile and tile < self.MIN_TILE:
            raise EngineError(f"tile must be 0 (whole image) or at least {self.MIN_TILE} pixels.")
        self.tile = int(tile) // 4 * 4
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile shapes: pick the fastest conv once
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        # channels_last (NHWC) spares cuDNN the two layout transposes it adds around each fp16
        # convolution of an NCHW tensor, but the element-wise work between the convolutions then
        # mixes layouts. Measured on an H200 (bench/RESULTS.md, 2026-11-26): sddusr 642 ms NHWC
        # against 614 ms NCHW, kedusr 576 against 600, and NHWC peaks 15 % higher. So NCHW by
        # default; channels_last=True is there for networks like kedusr's.
        self.channels_last = bool(channels_last)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=layout)
        if model.config.low_band_taps:  # the projection runs in fp32: keep its taps exact
            self.model.low_band_upsampler.float()
        self.model.use_kernels(self.backend)
        self.config = model.config
        self._pinned: torch.Tensor | None = None  # host staging buffer of `_to_host` (CUDA)

    @classmethod
    def from_pretrained(
        cls,
        path=None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        backend: str = "auto",
        tile: int = 256,
        variant: str | None = None,
        ensemble: int = 1,
        adapt: int = 0,
    ) -> Engine:
        """Load weights (`path=None`: the shipped default) onto `device` in `dtype`.

        `tile` is the LR tile side in pixels (0 = the whole image at once); `ensemble` (1, 2, 4
        or 8) averages that many flipped/transposed passes (N times the time); `adapt` > 0 runs
        that many steps of self-adaptation per pair with a reference (`sddusr_engine.adapt`).
        """
        dev = _resolve_device(device)
        model = load_model(path, variant=variant, device="cpu", dtype=torch.float32)
        return cls(model, dev, dtype, backend, tile, ensemble=ensemble, adapt=adapt)

    # -- public API -----------------------------------------------------------------------------
    def run(
        self,
        lr,
        lrc=None,
        ref=None,
        *,
        progress: Progress | None = None,
        return_info: bool = False,
        keep_maps: bool = False,
        stage_hook: StageHook | None = None,
        box: tuple[int, int, int, int] | None = None,
    ):
        """Super-resolve a pre-aligned triplet (LR, its centre crop LRC, Ref at 2x LRC's size).

        Images as PIL images or RGB uint8/uint16 arrays give an array of LR's bit depth; RGB
        float tensors [1,3,H,W] in [0,1] give a tensor. lrc = ref = None switches the reference off.
        `stage_hook(stage)` returns a context manager entered around each stage (for profilers).
        `box`: where LRC lies in LR, (y0, y1, x0, x1) in LR pixels, for the weights' low-band
        projection (outside it); when not given, LRC is looked up in LR as an exact crop, and
        if it is not one the projection is skipped (with a warning in the info).
        """
        if (lrc is None) != (ref is None):
            raise EngineError("give both LRC and Ref, or neither (to run without the reference).")
        as_tensor = isinstance(lr, torch.Tensor)
        if as_tensor:
            tensors = [lr, lrc, ref]
            bit_depth = 8
        else:
            arrays = [None if x is None else imageio.as_rgb_array(x) for x in (lr, lrc, ref)]
            bit_depth = 16 if arrays[0].dtype == np.uint16 else 8
            tensors = [None if a is None else imageio.to_tensor(a) for a in arrays]
        for name, t in zip(("LR", "LRC", "Ref"), tensors, strict=True):
            if t is not None and (t.dim() != 4 or t.shape[:2] != (1, 3)):
                raise EngineError(f"{name} must be one RGB image [1,3,H,W], got {tuple(t.shape)}.")
        if tensors[1] is not None:
            hc, wc = tensors[1].shape[-2:]
            if hc % 2 or wc % 2 or tuple(tensors[2].shape[-2:]) != (2 * hc, 2 * wc):
                raise EngineError(
                    f"Ref must be exactly twice the size of LRC and LRC's sides even: LRC is "
                    f"{hc}x{wc}, Ref is {tensors[2].shape[-2]}x{tensors[2].shape[-1]}."
                )
        if box is not None:
            y0, y1, x0, x1 = (int(v) for v in box)
            h, w = tensors[0].shape[-2:]
            lrc_hw = None if tensors[1] is None else tuple(tensors[1].shape[-2:])
            if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w) or (
                lrc_hw is not None and lrc_hw != (y1 - y0, x1 - x0)
            ):
                raise EngineError(
                    f"box {tuple(box)} must be LRC's rectangle (y0, y1, x0, x1) inside the "
                    f"{h}x{w} LR" + (f", {lrc_hw[0]}x{lrc_hw[1]} like LRC." if lrc_hw else ".")
                )
        sr, info = self._run_tensors(*tensors, progress, keep_maps, stage_hook, box)
        out = sr if as_tensor else imageio.from_tensor(sr, bit_depth)
        return (out, info) if return_info else out

    def run_without_reference(self, lr, **kwargs):
        """The same network with the reference switched off (no match, learned dictionaries)."""
        return self.run(lr, None, None, **kwargs)

    def super_resolve(
        self,
        wide,
        tele,
        *,
        missing_reference: str = "error",
        progress: Progress | None = None,
        return_info: bool = False,
        keep_maps: bool = False,
    ):
        """Super-resolve a raw wide/telephoto pair: find the telephoto's footprint, resample it
        onto the 2x centre grid with the wide image's colours, and run the network.

        If the telephoto is not found: `missing_reference="error"` raises FootprintNotFoundError;
        "skip" warns and returns the reference-free result.
        """
        from .registration import FootprintNotFoundError, align_reference

        if missing_reference not in ("error", "skip"):
            raise EngineError("missing_reference must be 'error' or 'skip'.")
        wide_a, tele_a = imageio.as_rgb_array(wide), imageio.as_rgb_array(tele)
        t0 = time.perf_counter()
        try:
            pair = align_reference(wide_a, tele_a)
        except FootprintNotFoundError as e:
            if missing_reference == "error":
                raise
            msg = f"{e} Continuing without the reference."
            warnings.warn(msg, stacklevel=2)
            out, info = self.run(
                wide_a, None, None, progress=progress, return_info=True, keep_maps=keep_maps
            )
            info.warnings.append(msg)
            return (out, info) if return_info else out
        reg_ms = 1e3 * (time.perf_counter() - t0)
        out, info = self.run(
            pair.lr,
            pair.lrc,
            pair.ref,
            progress=progress,
            return_info=True,
            keep_maps=keep_maps,
            box=tuple(int(v) for v in pair.box),
        )
        info.timings = {"registration": reg_ms, **info.timings}
        info.footprint, info.box = pair.footprint, tuple(int(v) for v in pair.box)
        return (out, info) if return_info else out

    # -- internals ------------------------------------------------------------------------------
    def _run_tensors(self, lr, lrc, ref, progress, keep_maps, stage_hook, box=None):
        flip = self.config.channel_order == "bgr"  # KeDuSR's release was trained on BGR images

        def prep(t):
            if t is None:
                return None
            t = t.to(device=self.device, dtype=self.dtype)
            t = t.flip(1) if flip else t
            return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

        # once: the retries and the stages after the network share the same device copies
        lr_d, lrc_d, ref_d = prep(lr), prep(lrc), prep(ref)
        tile = self.tile
        while True:
            info = RunInfo(tile=tile, ensemble=self.ensemble)
            try:
                sr = self._ensemble_forward(
                    lr_d, lrc_d, ref_d, tile, progress, keep_maps, stage_hook, info
                )
                break
            except torch.cuda.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                smaller = (tile or max(lr.shape[-2:])) // 2 // 4 * 4
                if smaller < self.MIN_TILE:
                    raise EngineError(
                        f"the GPU ran out of memory even with {tile}-pixel tiles; free GPU memory, "
                        "use --precision fp16, or run on the CPU."
                    ) from None
                tile = smaller
        if tile != self.tile:
            info.warnings.append(f"GPU out of memory: retried with {tile}-pixel tiles.")
        if lrc is not None and box is None and (self.adapt.steps or self.config.low_band_taps):
            box = locate_crop(lr_d, lrc_d)  # None when LRC is not an exact crop of LR
        if self.adapt.steps and lrc is not None:
            sr = self._adapted(sr, lr_d, box, tile, progress, stage_hook, info)
        if self.config.low_band_taps:
            sr = self._project_low_band(sr, lr_d, lrc_d, box, info, stage_hook)
        sr = (sr.flip(1) if flip else sr).clamp(0, 1)
        return self._to_host(sr), info

    def _adapted(self, sr, lr, box, tile, progress, stage_hook, info: RunInfo) -> torch.Tensor:
        """Self-adaptation (`sddusr_engine.adapt`): a copy of the network fine-tuned on this pair,
        with `sr`'s footprint as its target, then run without the reference; its output outside
        the box, `sr` inside. `sr` unchanged (and a warning) when there is no box to learn from."""
        if box is None or crop_size(box, self.adapt.crop) == 0:
            info.warnings.append(
                "self-adaptation was skipped: "
                + (
                    "LRC is not a crop of LR and no box was given."
                    if box is None
                    else f"the telephoto's box {tuple(box)} is too small to learn from."
                )
            )
            return sr
        y0, y1, x0, x1 = box
        timer = _StageTimer(self.device, info.timings, stage_hook)
        with timer("adapt"):
            try:
                student = adapt_single_image_path(
                    self.model, lr, sr[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1], box, self.adapt
                )
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                info.warnings.append("GPU out of memory: self-adaptation was skipped.")
                return sr
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        student = student.to(dtype=self.dtype, memory_format=layout).use_kernels(self.backend)
        main, self.model = self.model, student
        try:
            part = RunInfo(tile=tile, timings={})
            outside = self._ensemble_forward(
                lr, None, None, tile, progress, False, stage_hook, part
            )
        finally:
            self.model = main
        info.timings["adapted_pass"] = sum(part.timings.values())
        info.adapt_steps = self.adapt.steps
        return blend_outside(sr, outside, box)

    @torch.inference_mode()
    def _project_low_band(self, sr, lr, lrc, box, info: RunInfo, stage_hook) -> torch.Tensor:
        """The weights' low-band projection outside the telephoto (everywhere without one).
        `lr` and `lrc` as the network sees them (device, dtype, channel order)."""
        with _StageTimer(self.device, info.timings, stage_hook)("low_band"):
            if lrc is not None and box is None:
                info.warnings.append(
                    "LRC is not a crop of LR and no box was given: the low-band projection "
                    "was skipped."
                )
                return sr
            region = None if lrc is None else box
            try:
                return self.model.project_low_band(sr, lr, region)
            except torch.cuda.OutOfMemoryError:  # a few full-size images: finish on the CPU
                torch.cuda.empty_cache()
                out = self.model.project_low_band(sr.cpu(), lr.cpu(), region)
                info.warnings.append("GPU out of memory: the low-band projection ran on the CPU.")
                return out.to(self.device)

    def _to_host(self, sr: torch.Tensor) -> torch.Tensor:
        """The result as a new fp32 CPU tensor. From a GPU it travels in the engine's dtype into
        a page-locked buffer kept between runs (a pageable copy of the fp32 result took 60 ms of
        a 650 ms run on an H200), and is widened on the CPU into fresh memory."""
        if self.device.type != "cuda":
            return sr.float().cpu()
        buf = self._pinned
        if buf is None or buf.shape != sr.shape or buf.dtype != sr.dtype:
            buf = self._pinned = None  # free the old buffer before taking a new one
            buf = self._pinned = torch.empty(sr.shape, dtype=sr.dtype, pin_memory=True)
        buf.copy_(sr)
        return buf.to(torch.float32, copy=True)

    @torch.inference_mode()
    def _ensemble_forward(
        self, lr, lrc, ref, tile, progress, keep_maps, stage_hook, info: RunInfo
    ) -> torch.Tensor:
        """`_forward` once, or averaged over the first `self.ensemble` SYMMETRIES.

        The info (statistics, maps) is the identity pass's; the timings sum all passes.
        """
        n = self.ensemble
        if n == 1:
            return self._forward(lr, lrc, ref, tile, progress, keep_maps, stage_hook, info)

        def one_pass(k, lr, lrc, ref):
            part = info if k == 0 else RunInfo(tile=tile, timings=info.timings)

            def step(done, total):
                if progress is not None:
                    progress(k * total + done, n * total)

            out = self._forward(lr, lrc, ref, tile, step, keep_maps and k == 0, stage_hook, part)
            info.warnings.extend(w for w in part.warnings if w not in info.warnings)
            return out

        acc = None
        for out in symmetric_passes(one_pass, lr, lrc, ref, n):
            acc = out if acc is None else acc.add_(out)
        return acc.div_(n).to(self.dtype)

    def _halo_2x(self) -> int:
        """Output-pixel halo of the 2x stage: fringe of the warp/high-pass/gate inputs (16) plus
        the receptive radius of fusion block (5), fusion tail (1), decoder, decoder tail (2)."""
        radius = 16 + 5 + 1 + (2 * self.config.decoder_blocks + 1) + 2
        return math.ceil(radius / 8) * 8

    def _trunk_halo(self) -> int:
        c = self.config
        return 2 + c.trunk_groups * (2 * c.trunk_blocks + 1)

    @torch.inference_mode()
    def _forward(
        self, lr, lrc, ref, tile, progress, keep_maps, stage_hook, info: RunInfo
    ) -> torch.Tensor:
        m = self.model
        h, w = lr.shape[-2:]
        lr = pad_to_even(lr)
        hp, wp = lr.shape[-2:]
        timer = _StageTimer(self.device, info.timings, stage_hook)
        whole = tile == 0 or (hp <= tile and wp <= tile)
        lr_tile = max(hp, wp) if whole else tile

        trunk_spans = [(y, x) for y in _spans(hp, lr_tile) for x in _spans(wp, lr_tile)]
        out_tile = 2 * lr_tile
        out_spans = [(y, x) for y in _spans(2 * hp, out_tile) for x in _spans(2 * wp, out_tile)]
        tiled_trunk = not self.config.trunk_channel_attention
        total = (len(trunk_spans) if tiled_trunk else 1) + len(trunk_spans)
        total += len(out_spans) * (1 if whole else 2)
        done = 0

        def tick():
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        with timer("reference"):
            ctx = m.empty_context(lr) if lrc is None else m.reference_context(lrc, ref)

        with timer("trunk"):
            if tiled_trunk:
                feat = _tiled(m.lr_trunk, lr, trunk_spans, self._trunk_halo(), 1, 1, tick)
            else:  # channel attention pools each block over the whole image
                feat = m.lr_trunk(lr)
                tick()

        with timer("match_features"):

            def features(x):
                f_m, q_map = m.feature_match(x)
                logits = m.mask_generator(f_m) if self.config.use_sfm else q_map[:, :0]
                return torch.cat([q_map, logits], dim=1)

            qf = _tiled(features, lr, trunk_spans, 16, 1, 2, tick)
            q_map, logits = qf[:, : self.config.match_channels], qf[:, self.config.match_channels :]
            q_mask = MaskGenerator.hard_mask(logits) if self.config.use_sfm else None

        with timer("matching"):
            conf, index, stats = sparse_match(
                q_map, ctx.key_map, q_mask, ctx.key_mask, m.ops.patch_match
            )
            conf = conf.to(self.dtype)

        halo = 0 if whole else self._halo_2x()
        pooled = None
        if not whole:
            with timer("fusion_statistics"):
                acc = torch.zeros(m.config.fusion_channels, device=self.device, dtype=torch.float32)
                for ys, xs in out_spans:
                    fused, _, _, inner = self._fusion_input(
                        lr, feat, ctx, conf, index, ys, xs, halo
                    )
                    gated = m.AdaFuison.gated(fused)[inner]
                    acc += gated.float().sum(dim=(0, 2, 3))
                    tick()
                pooled = (acc / (4 * hp * wp)).to(self.dtype).view(1, -1, 1, 1)

        with timer("decode"):
            sr = torch.empty(1, 3, 2 * hp, 2 * wp, dtype=self.dtype, device=self.device)
            for ys, xs in out_spans:
                fused, f_lr, lr_up, inner = self._fusion_input(
                    lr, feat, ctx, conf, index, ys, xs, halo
                )
                out = m.decode(m.AdaFuison(fused, pooled), f_lr, lr_up)
                sr[..., ys[0] : ys[1], xs[0] : xs[1]] = out[inner]
                tick()

        self._record(info, stats, q_mask, ctx, conf, index, keep_maps)
        return sr[..., : 2 * h, : 2 * w]

    def _fusion_input(self, lr, feat, ctx: ReferenceContext, conf, index, ys, xs, halo):
        """The fusion block's input for output rows ys, cols xs (+ halo, clipped to the image).

        Returns (fused, f_lr, lr_up, inner): `lr_up` is the bicubic x2 of LR for `global_skip`
        (else None) and `inner` slices the requested span out of the region.
        """
        m = self.model
        hp, wp = feat.shape[-2:]
        # region in output pixels, aligned to 4 (one matching cell = 4 output pixels)
        y0, y1 = max(ys[0] - halo, 0), min(ys[1] + halo, 2 * hp)
        x0, x1 = max(xs[0] - halo, 0), min(xs[1] + halo, 2 * wp)
        # the upsampler's 3x3 conv needs one LR pixel of context, bicubic x2 two
        a0, a1 = max(y0 // 2 - 2, 0), min(y1 // 2 + 2, hp)
        b0, b1 = max(x0 // 2 - 2, 0), min(x1 // 2 + 2, wp)
        crop = (..., slice(y0 - 2 * a0, y1 - 2 * a0), slice(x0 - 2 * b0, x1 - 2 * b0))
        f_lr = m.upsample(feat[..., a0:a1, b0:b1])[crop]
        lr_up = upsample_bicubic(lr[..., a0:a1, b0:b1])[crop] if m.config.global_skip else None
        cells = (slice(y0 // 4, y1 // 4), slice(x0 // 4, x1 // 4))
        idx = index[:, cells[0], cells[1]]
        warp_sum = warp_by_index(ctx.f_ref_align, idx, m.ops.patch_warp)
        match = MatchResult(warp_sum, conf[:, :, cells[0], cells[1]], idx, None, None)
        fused = m.fusion_input(f_lr, match, ctx)
        inner = (..., slice(ys[0] - y0, ys[1] - y0), slice(xs[0] - x0, xs[1] - x0))
        return fused, f_lr, lr_up, inner

    def _record(self, info: RunInfo, stats, q_mask, ctx, conf, index, keep_maps) -> None:
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


def _tiled(fn, x, spans, halo: int, scale_num: int, scale_den: int, tick) -> torch.Tensor:
    """Apply a translation-equivariant `fn` to x in tiles with `halo` LR pixels of context.

    The output grid is x's scaled by scale_num/scale_den; tile origins are multiples of
    scale_den so every tile maps onto whole output pixels.
    """
    h, w = x.shape[-2:]
    out = None
    for (y0, y1), (x0, x1) in spans:
        a0, a1 = max(y0 - halo, 0) // scale_den * scale_den, min(y1 + halo, h)
        b0, b1 = max(x0 - halo, 0) // scale_den * scale_den, min(x1 + halo, w)
        y = fn(x[..., a0:a1, b0:b1])
        if out is None:
            out = y.new_empty(*y.shape[:2], h * scale_num // scale_den, w * scale_num // scale_den)

        def o(v):
            return v * scale_num // scale_den

        out[..., o(y0) : o(y1), o(x0) : o(x1)] = y[
            ..., o(y0 - a0) : o(y1 - a0), o(x0 - b0) : o(x1 - b0)
        ]
        tick()
    return out
