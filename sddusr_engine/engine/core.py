"""The engine: a loaded network on one device; wide/tele pairs in, x2 images out.

One call, in order: coerce and check the inputs, move them to the device once, run the network
(tiled, `tiling.py`; averaged over flips with `ensemble`, `ensemble.py`) with out-of-memory retries
at smaller tiles, optionally self-adapt (`adapt.py`), post-process in fp32 (`postprocess.py`),
copy the result to the host. A raw pair is first registered on the CPU (`register_pair`, which
touches neither the device nor the network, so a batch registers the next pair while this one
computes), then run (`run_registered`); `super_resolve` is the two. The engine is stateless per
call: `run` and `super_resolve` are pure functions of their inputs and the engine's fixed settings
(`settings.py`); the network is passed explicitly to every stage and never swapped.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import io as imageio
from ..errors import EngineError, FootprintNotFoundError, OutOfMemoryError
from ..geometry import Box, locate_crop
from ..model.network import DualLensSR
from ..registration import Footprint, align_reference, register
from ..registration.prior import zoom_prior as exif_prior
from ..registration.resample import RESAMPLE_STEPS
from ..timing import StageHook, StageStart, StageTimer, announcing
from ..weights import load_model
from .adapt import adapt_single_image_path, crop_size
from .ensemble import ensemble_mean
from .info import RunInfo
from .memory import TilePlan, auto_plan, bounded_plan
from .postprocess import blend_outside, project_low_band
from .settings import MIN_TILE, RunSettings, device_flags
from .tiling import tiled_forward

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RegisteredPair:
    """A raw pair after `Engine.register_pair`: LR (the wide image), its centre crop LRC and the
    telephoto resampled onto LRC's 2x grid, where LRC lies in LR (LR pixels), the footprint and
    the registration's time. A telephoto that was not found (`missing_reference="skip"`) leaves
    lrc, ref, box_lr and footprint None, and `warning` says why."""

    lr: np.ndarray
    lrc: np.ndarray | None
    ref: np.ndarray | None
    box_lr: Box | None
    footprint: Footprint | None
    registration_ms: float
    warning: str | None = None


class Engine:
    """A loaded network on one device, ready to super-resolve pairs."""

    MIN_TILE = MIN_TILE

    def __init__(
        self,
        model: DualLensSR,
        device="auto",
        dtype="auto",
        backend: str = "auto",
        tile: int | None = None,
        channels_last: bool | None = None,
        ensemble: int = 1,
        adapt: int = 0,
        keep_fusion_maps: bool | None = None,
        host_maps: bool | None = None,
    ):
        s = RunSettings.resolve(
            device, dtype, backend, tile, channels_last, ensemble, adapt, keep_fusion_maps,
            host_maps,
        )  # fmt: skip
        self.settings = s
        # channels_last (NHWC) spares cuDNN the two layout transposes it adds around each fp16
        # convolution of an NCHW tensor, but the element-wise work between the convolutions then
        # mixes layouts. Measured on an H200 (bench/RESULTS.md, 2026-11-26): sddusr 642 ms NHWC
        # against 614 ms NCHW, kedusr 576 against 600, and NHWC peaks 15 % higher. So NCHW on a
        # GPU by default. On the CPU oneDNN's convolutions run twice as fast on NHWC (32
        # channels at 480x640: 127 against 254 ms, 2-core CPU, 2026-12-04), so NHWC there.
        self.model = _placed(model, s)
        self.config = model.config
        self._host = _HostStaging()

    # the settings, as attributes (read-only views)
    device = property(lambda self: self.settings.device)
    dtype = property(lambda self: self.settings.dtype)
    backend = property(lambda self: self.settings.backend)
    tile = property(lambda self: self.settings.tile)
    ensemble = property(lambda self: self.settings.ensemble)
    adapt = property(lambda self: self.settings.adapt)
    channels_last = property(lambda self: self.settings.channels_last)
    host_maps = property(lambda self: self.settings.host_maps)

    @classmethod
    def from_pretrained(
        cls,
        path=None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        backend: str = "auto",
        tile: int | None = None,
        variant: str | None = None,
        ensemble: int = 1,
        adapt: int = 0,
        channels_last: bool | None = None,
        keep_fusion_maps: bool | None = None,
        host_maps: bool | None = None,
    ) -> Engine:
        """Load weights (`path=None`: the shipped default) onto `device` in `dtype`.

        `tile` is the LR tile side in pixels (0 = the whole image at once; None = picked from
        the free memory, `engine.memory.auto_plan`: the fastest plan that fits); `ensemble` (1,
        2, 4 or 8) averages that many flipped/transposed passes (N times the time); `adapt` > 0
        runs that many steps of self-adaptation per pair with a reference (`engine.adapt`);
        `channels_last` (None: on the CPU only) runs the network in NHWC; `keep_fusion_maps`
        (tiled runs; None: as the plan says, off with a given tile) keeps the fusion block's
        input and gated map for the whole output so that the 2x stage runs once, not twice;
        `host_maps` (bounded tiles; None: on a GPU) keeps their whole-image maps in host memory,
        so that the device's peak follows the tile and not the photo (`engine.tiling`).
        """
        args = (channels_last, ensemble, adapt, keep_fusion_maps, host_maps)
        RunSettings.resolve(device, dtype, backend, tile, *args)
        model = load_model(path, variant=variant, device="cpu", dtype=torch.float32)
        return cls(model, device, dtype, backend, tile, *args)

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
        box_lr: Box | None = None,
        on_stage: StageStart | None = None,
    ):
        """Super-resolve a pre-aligned triplet (LR, its centre crop LRC, Ref at 2x LRC's size).

        Images as PIL images or RGB uint8/uint16 arrays give an array of LR's bit depth; RGB
        float tensors [1,3,H,W] in [0,1] give a tensor. lrc = ref = None switches the reference off.
        `stage_hook(stage)` returns a context manager entered around each stage (for profilers).
        `progress(done, total)` counts the network's tiles; `on_stage(name)` is told each stage's
        name as it starts (reference, trunk, match_features, matching, decode, low_band, ...).
        `box_lr`: where LRC lies in LR, (y0, y1, x0, x1) in LR pixels, for the weights' low-band
        projection (outside it) and self-adaptation (inside it); when not given, LRC is looked up
        in LR as an exact crop, and if it is not one both are skipped (with a warning in the info).
        """
        tensors, bit_depth = _as_tensors(lr, lrc, ref, box_lr)
        stage_hook = announcing(on_stage, stage_hook)
        with device_flags(self.settings):
            sr, info = self._run_tensors(*tensors, progress, keep_maps, stage_hook, box_lr)
        info.box_lr = info.box_lr if box_lr is None else tuple(int(v) for v in box_lr)
        out = sr if bit_depth is None else imageio.from_tensor(sr, bit_depth)
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
        zoom_prior=None,
        on_stage: StageStart | None = None,
    ):
        """Super-resolve a raw wide/telephoto pair: find the telephoto's footprint, resample it
        onto the 2x centre grid with the wide image's colours, and run the network
        (`register_pair`, then `run_registered`).

        If the telephoto is not found: `missing_reference="error"` raises FootprintNotFoundError;
        "skip" warns and returns the reference-free result. The registration's zoom search is
        narrowed by `zoom_prior` (telephoto pixels per wide pixel, or the `ZoomPrior` that
        `registration.prior.exif_zoom` reads from the two files) or, given two PIL images, by their EXIF
        focal lengths. `keep_maps` keeps the matching maps and the registered telephoto
        (`info.maps["ref"]`, on the 2x grid of `info.box_lr`) in the info.
        `progress` and `on_stage` as in `run`; registration is announced as "registration" and
        counts its own steps through `progress` (done, 4) before the network's start from 1.
        """
        pair = self.register_pair(
            wide,
            tele,
            missing_reference=missing_reference,
            zoom_prior=zoom_prior,
            progress=progress,
            on_stage=on_stage,
        )
        if pair.warning is not None:
            warnings.warn(pair.warning, stacklevel=2)
        return self.run_registered(
            pair, progress=progress, return_info=return_info, keep_maps=keep_maps, on_stage=on_stage
        )

    def register_pair(
        self,
        wide,
        tele,
        *,
        missing_reference: str = "error",
        zoom_prior=None,
        progress: Progress | None = None,
        on_stage: StageStart | None = None,
    ) -> RegisteredPair:
        """The first half of `super_resolve`: the telephoto's footprint in the wide image and the
        telephoto resampled onto the 2x centre grid, ready for `run_registered`.

        It uses neither the device nor the network (numpy and OpenCV only), so another thread may
        register the next pair while the engine computes this one. `missing_reference`,
        `zoom_prior` (EXIF of two PIL images included), `progress` and `on_stage` as in
        `super_resolve`; with "skip", a telephoto that is not found gives a pair without LRC and
        Ref whose `warning` says so (returned, not issued: `super_resolve` issues it).
        """
        if missing_reference not in ("error", "skip"):
            raise EngineError("missing_reference must be 'error' or 'skip'.")
        wide_a, tele_a = imageio.as_rgb_array(wide), imageio.as_rgb_array(tele)
        t0 = time.perf_counter()
        if zoom_prior is None and isinstance(wide, Image.Image) and isinstance(tele, Image.Image):
            zoom_prior = exif_prior(wide, tele, wide.width, tele.width)  # None without EXIF
        if on_stage is not None:
            on_stage("registration")
        # the registration's steps count as progress too: locating, then the resampling's
        steps, done = 1 + RESAMPLE_STEPS, [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], steps)

        try:
            fp = register(wide_a, tele_a, zoom_prior=zoom_prior)  # the arrays, converted once
            tick()
            aligned = align_reference(wide_a, tele_a, footprint=fp, tick=tick)
        except FootprintNotFoundError as e:
            if missing_reference == "error":
                raise
            ms = 1e3 * (time.perf_counter() - t0)
            return RegisteredPair(
                wide_a, None, None, None, None, ms, f"{e} Continuing without the reference."
            )
        box = tuple(int(v) for v in aligned.box_lr)
        ms = 1e3 * (time.perf_counter() - t0)
        return RegisteredPair(aligned.lr, aligned.lrc, aligned.ref, box, aligned.footprint, ms)

    def run_registered(
        self,
        pair: RegisteredPair,
        *,
        progress: Progress | None = None,
        return_info: bool = False,
        keep_maps: bool = False,
        on_stage: StageStart | None = None,
    ):
        """The second half of `super_resolve`: the network on a pair from `register_pair`, with
        the registration's time (`info.timings["registration"]`), footprint and box in the info
        and, with `keep_maps`, the registered telephoto as `info.maps["ref"]`. A pair without
        the telephoto runs reference-free and its warning is in `info.warnings`.
        """
        found = pair.ref is not None
        out, info = self.run(
            pair.lr,
            pair.lrc if found else None,
            pair.ref,
            progress=progress,
            return_info=True,
            keep_maps=keep_maps,
            box_lr=pair.box_lr if found else None,
            on_stage=on_stage,
        )
        if not found:
            if pair.warning is not None:
                info.warnings.append(pair.warning)
            return (out, info) if return_info else out
        info.timings = {"registration": pair.registration_ms, **info.timings}
        info.footprint, info.box_lr = pair.footprint, pair.box_lr
        if keep_maps:  # the registered telephoto, for comparisons (the array itself, no copy)
            info.maps["ref"] = pair.ref
        return (out, info) if return_info else out

    # -- one call, step by step -----------------------------------------------------------------
    def _run_tensors(self, lr, lrc, ref, progress, keep_maps, stage_hook, box_lr=None):
        s = self.settings
        flip = self.config.channel_order == "bgr"  # KeDuSR's release was trained on BGR images

        def prep(t):
            if t is None:
                return None
            t = t.to(device=s.device, dtype=s.dtype)
            t = t.flip(1) if flip else t
            return t.contiguous(memory_format=torch.channels_last) if s.channels_last else t

        # once: the retries and the stages after the network share the same device copies
        lr_d, lrc_d, ref_d = prep(lr), prep(lrc), prep(ref)
        sr, info = self._forward_with_retry(lr_d, lrc_d, ref_d, progress, keep_maps, stage_hook)
        if lrc is not None and box_lr is None and (s.adapt.steps or self.config.low_band_taps):
            box_lr = locate_crop(lr_d, lrc_d)  # None when LRC is not an exact crop of LR
            info.box_lr = box_lr
        if s.adapt.steps and lrc is not None:
            plan = TilePlan(info.tile, info.fusion_maps, info.host_maps)
            sr = self._adapted(sr, lr_d, box_lr, plan, progress, stage_hook, info)
        if self.config.low_band_taps:
            sr = self._project_low_band(sr, lr_d, lrc_d, box_lr, info, stage_hook)
        sr = (sr.flip(1) if flip else sr).clamp(0, 1)
        return self._host.copy(sr), info

    def _forward_with_retry(self, lr, lrc, ref, progress, keep_maps, stage_hook):
        """The network pass at the engine's tile (None: `memory.auto_plan`); on a GPU out of
        memory, again without kept fusion maps, then at half the tile, down to MIN_TILE, then
        OutOfMemoryError."""
        keep, dev, host = self.settings.keep_fusion_maps, self.device, self.settings.host_maps
        if self.tile is None:
            plan = auto_plan(lr.shape[-2:], self.config.channels, self.dtype, dev)
            if keep is not None and plan.tile:
                plan = TilePlan(plan.tile, True) if keep else bounded_plan(plan.tile, dev, host)
            elif plan.tile and not plan.keep_fusion_maps:  # bounded: host maps as asked
                plan = bounded_plan(plan.tile, dev, host)
        elif keep and self.tile > 0:
            plan = TilePlan(self.tile, True)
        else:  # a tile given bounds the memory: no whole-output maps unless asked for
            plan = bounded_plan(self.tile, dev, host)
        first = plan
        while True:
            info = RunInfo(tile=plan.tile, ensemble=self.ensemble)
            try:
                sr = self._passes(
                    self.model, lr, lrc, ref, plan, progress, keep_maps, stage_hook, info
                )
                break
            except torch.cuda.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                tile = plan.tile
                if plan.keep_fusion_maps:
                    plan = bounded_plan(tile, dev, host)
                    continue
                smaller = (tile or max(lr.shape[-2:])) // 2 // 4 * 4
                if smaller < MIN_TILE:
                    raise OutOfMemoryError(
                        f"the GPU ran out of memory even with {tile}-pixel tiles; free GPU memory, "
                        "use --precision fp16, or run on the CPU."
                    ) from None
                plan = bounded_plan(smaller, dev, host)
        if plan.tile != first.tile:
            info.warnings.append(f"GPU out of memory: retried with {plan.tile}-pixel tiles.")
        elif plan != first:
            info.warnings.append("GPU out of memory: retried without keeping the fusion maps.")
        return sr, info

    def _passes(
        self, model, lr, lrc, ref, plan: TilePlan, progress, keep_maps, stage_hook, info: RunInfo
    ):
        """`model`'s pass once, or averaged over the first `ensemble` symmetries. The info
        (statistics, maps) is the identity pass's; the timings sum all passes."""
        n = self.ensemble
        timer = StageTimer(self.device, info.timings, stage_hook)
        tile, kept, host = plan.tile, plan.keep_fusion_maps, plan.host_maps
        if n == 1:
            return tiled_forward(
                model, lr, lrc, ref, tile, timer, info, progress, keep_maps, kept, host
            )

        def one_pass(k, lr, lrc, ref):
            part = info if k == 0 else RunInfo(tile=tile, timings=info.timings)

            def step(done, total):
                if progress is not None:
                    progress(k * total + done, n * total)

            out = tiled_forward(
                model, lr, lrc, ref, tile, timer, part, step, keep_maps and k == 0, kept, host
            )
            info.warnings.extend(w for w in part.warnings if w not in info.warnings)
            return out

        with torch.inference_mode():
            return ensemble_mean(one_pass, lr, lrc, ref, n, self.dtype)

    def _adapted(self, sr, lr, box_lr, plan, progress, stage_hook, info: RunInfo) -> torch.Tensor:
        """Self-adaptation: a copy of the network fine-tuned on this pair, with `sr`'s footprint
        as its target, then run without the reference; its output outside the box, `sr` inside.
        `sr` unchanged (and a warning) when there is no box to learn from."""
        s = self.settings
        if box_lr is None or crop_size(box_lr, s.adapt.crop) == 0:
            info.warnings.append(
                "self-adaptation was skipped: "
                + (
                    "LRC is not a crop of LR and no box was given."
                    if box_lr is None
                    else f"the telephoto's box {tuple(box_lr)} is too small to learn from."
                )
            )
            return sr
        y0, y1, x0, x1 = box_lr
        with StageTimer(self.device, info.timings, stage_hook)("adapt"):
            try:
                teacher = sr[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1].to(lr.device)
                student = adapt_single_image_path(self.model, lr, teacher, box_lr, s.adapt)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                info.warnings.append("GPU out of memory: self-adaptation was skipped.")
                return sr
        student = _placed(student, s)
        part = RunInfo(tile=plan.tile, timings={})
        outside = self._passes(student, lr, None, None, plan, progress, False, stage_hook, part)
        info.timings["adapted_pass"] = sum(part.timings.values())
        info.adapt_steps = s.adapt.steps
        return blend_outside(sr, outside, box_lr)

    @torch.inference_mode()
    def _project_low_band(self, sr, lr, lrc, box_lr, info: RunInfo, stage_hook) -> torch.Tensor:
        """The weights' low-band projection outside the telephoto (everywhere without one).
        `lr` and `lrc` as the network sees them (device, dtype, channel order)."""
        upsampler, sigma = self.model.low_band_upsampler, self.config.low_band_sigma
        with StageTimer(self.device, info.timings, stage_hook)("low_band"):
            if lrc is not None and box_lr is None:
                info.warnings.append(
                    "LRC is not a crop of LR and no box was given: the low-band projection "
                    "was skipped."
                )
                return sr
            region = None if lrc is None else box_lr
            try:
                return project_low_band(sr, lr, upsampler, sigma, region)
            except torch.cuda.OutOfMemoryError:  # a few full-size images: finish on the CPU
                torch.cuda.empty_cache()
                out = project_low_band(sr.cpu(), lr.cpu(), upsampler.cpu(), sigma, region)
                upsampler.to(self.device)
                info.warnings.append("GPU out of memory: the low-band projection ran on the CPU.")
                return out.to(self.device)


def _placed(model: DualLensSR, s: RunSettings) -> DualLensSR:
    """`model` on the settings' device, dtype, layout and kernel backend, in eval mode."""
    model = model.to(device=s.device, dtype=s.dtype, memory_format=s.memory_format).eval()
    if model.config.low_band_taps:  # the projection runs in fp32: keep its taps exact
        model.low_band_upsampler.float()
    return model.use_kernels(s.backend)


def _as_tensors(lr, lrc, ref, box_lr) -> tuple[list, int | None]:
    """The three inputs as [1,3,H,W] float tensors (None kept), checked, and the bit depth to
    give the output back in (None: the caller passed tensors and gets a tensor)."""
    if (lrc is None) != (ref is None):
        raise EngineError("give both LRC and Ref, or neither (to run without the reference).")
    if isinstance(lr, torch.Tensor):
        tensors, bit_depth = [lr, lrc, ref], None
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
    if box_lr is not None:
        y0, y1, x0, x1 = (int(v) for v in box_lr)
        h, w = tensors[0].shape[-2:]
        lrc_hw = None if tensors[1] is None else tuple(tensors[1].shape[-2:])
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w) or (
            lrc_hw is not None and lrc_hw != (y1 - y0, x1 - x0)
        ):
            raise EngineError(
                f"box {tuple(box_lr)} must be LRC's rectangle (y0, y1, x0, x1) inside the "
                f"{h}x{w} LR" + (f", {lrc_hw[0]}x{lrc_hw[1]} like LRC." if lrc_hw else ".")
            )
    return tensors, bit_depth


class _HostStaging:
    """Copies results to the host. From a GPU a result travels in the engine's dtype into a
    page-locked buffer kept between calls (a pageable copy of the fp32 result took 60 ms of a
    650 ms run on an H200), and is widened on the CPU into fresh memory, so no call's result
    shares memory with another's."""

    def __init__(self):
        self._pinned: torch.Tensor | None = None

    def copy(self, sr: torch.Tensor) -> torch.Tensor:
        if sr.device.type != "cuda":  # a CPU run, or a GPU run whose output was kept on the host
            return sr.float().cpu()
        buf = self._pinned
        if buf is None or buf.shape != sr.shape or buf.dtype != sr.dtype:
            buf = self._pinned = None  # free the old buffer before taking a new one
            buf = self._pinned = torch.empty(sr.shape, dtype=sr.dtype, pin_memory=True)
        buf.copy_(sr)
        return buf.to(torch.float32, copy=True)
