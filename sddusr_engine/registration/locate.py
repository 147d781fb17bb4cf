"""Registration's entry points: `register` finds the telephoto's footprint in the wide image and
`align_reference` turns a raw pair into the engine's inputs (LR, LRC, Ref)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..io import as_rgb_array
from .common import (
    NOT_FOUND,
    AlignedPair,
    Footprint,
    FootprintNotFoundError,
    check_geometry,
    float_rgb,
    footprint_corners,
    footprint_from_homography,
    gray_u8,
    resize_to,
    zoom_rotation,
)
from .features import ecc_refine, sift_homography
from .prior import WINDOW_35MM, ZoomPrior
from .prior import zoom_prior as exif_zoom_prior
from .pyramid import downscale, grey01, pyramid
from .resample import center_crop_box, resample_reference
from .search import search_hypotheses
from .verify import HIGH_CONFIDENCE, Verdict, verify


def _working_rgb(img: np.ndarray, scale: float, large: bool) -> tuple[np.ndarray, np.ndarray]:
    """Float RGB at `scale` and its full → working pixel map. A `large` photo is downscaled in its
    own 8/16 bits first: its float copy alone would be 145 MB at 12 MP."""
    if not large or img.dtype not in (np.uint8, np.uint16):
        return resize_to(float_rgb(img), scale)
    small, down = downscale(img, scale)
    return float_rgb(small), down


class _Candidates:
    """The hypotheses tried so far with their verdicts; the best one wins."""

    def __init__(self, wide_levels, tele_levels, tele_shape, wide_shape, geometry):
        self.wide_levels, self.tele_levels = wide_levels, tele_levels
        self.tele_shape, self.wide_shape, self.geometry = tele_shape, wide_shape, geometry
        self.best: tuple[Verdict, np.ndarray, dict] | None = None
        self.first_reason = ""

    def add(self, h: np.ndarray, **details) -> Verdict | None:
        try:
            check_geometry(h, self.tele_shape, self.wide_shape, *self.geometry)
        except FootprintNotFoundError as e:
            self.first_reason = self.first_reason or str(e)
            return None
        corners = footprint_corners(h, self.tele_shape)
        zoom, _ = zoom_rotation(corners, self.tele_shape)
        v = verify(self.wide_levels, self.tele_levels, h, corners, zoom, self.wide_shape)
        if self.best is None or v.confidence > self.best[0].confidence:
            self.best = (v, h, details)
        return v


def register(
    wide: np.ndarray,
    tele: np.ndarray,
    *,
    min_inliers: int = 20,
    zoom_range: tuple[float, float] = (1.4, 2.8),
    max_rotation_deg: float = 10.0,
    refine: bool = True,
    ratio: float = 0.8,
    max_side: int = 1200,
    zoom_prior: float | ZoomPrior | None = None,
) -> Footprint:
    """Locate the telephoto in the wide image (arrays H×W×3, uint8/uint16/float in [0, 1], or
    PIL images, whose EXIF focal lengths then give the zoom prior).

    SIFT + MAGSAC + ECC first, at the wide image downscaled to at most `max_side` pixels on its
    long side (the telephoto to half that density); where that fails or its answer does not pass
    the photometric verification, the intensity search (zoom and roll sweep, then ECC). Every
    answer is verified (`registration.verify`) and only one with a confidence of at least 0.5 is
    returned, its homography at full resolution. `zoom_prior` (telephoto pixels per wide pixel,
    e.g. from `prior.zoom_prior`) narrows the search to ±8 % around it.

    Raises `FootprintNotFoundError` with the reason when the telephoto cannot be placed and
    verified.
    """
    prior = None
    if zoom_prior is None and isinstance(wide, Image.Image) and isinstance(tele, Image.Image):
        prior = exif_zoom_prior(wide, tele, wide.width, tele.width)
    elif isinstance(zoom_prior, ZoomPrior):  # from the files' EXIF (`prior.exif_zoom`)
        prior = zoom_prior
    elif zoom_prior is not None:
        z = float(zoom_prior)
        prior = ZoomPrior(z, (z * (1 - WINDOW_35MM), z * (1 + WINDOW_35MM)), f"zoom prior x{z:.2f}")
    wide_a, tele_a = as_rgb_array(wide), as_rgb_array(tele)
    tele_shape, wide_shape = tele_a.shape[:2], wide_a.shape[:2]
    # Working resolution: the wide capped at `max_side`, the telephoto at half that density
    # (about the wide's, since the zoom is about 2).
    s_w = min(1.0, max_side / max(wide_shape))
    wide_w, down_w = _working_rgb(wide_a, s_w, s_w < 1.0)
    tele_w, down_t = _working_rgb(tele_a, 0.5 * s_w, s_w < 1.0)
    up_w = np.linalg.inv(down_w)
    search_range = zoom_range
    if prior is not None:
        search_range = (max(zoom_range[0], prior.window[0]), min(zoom_range[1], prior.window[1]))
    # verification and the intensity search read grey pyramids of the full images
    wide_levels = pyramid(grey01(wide_a), 24)
    tele_levels = pyramid(grey01(tele_a), 24)
    cands = _Candidates(
        wide_levels, tele_levels, tele_shape, wide_shape, (zoom_range, max_rotation_deg)
    )

    h_w, n_in, n_match, n_kp = sift_homography(gray_u8(wide_w), gray_u8(tele_w), ratio, 2.0)
    if n_kp < min_inliers:
        feature_reason = (
            f"the telephoto image has only {n_kp} distinctive features; it may be blank, out "
            "of focus or too dark to register"
        )
    elif h_w is None or n_in < min_inliers:
        feature_reason = (
            f"only {n_in} consistent feature matches (at least {min_inliers} needed); check "
            "that the two photos show the same scene"
        )
    else:
        feature_reason = ""
        h = up_w @ h_w @ down_t
        refined = False
        if refine and _plausible(h, tele_shape, wide_shape, zoom_range, max_rotation_deg):
            res = ecc_refine(wide_w, tele_w, h_w)
            if res is not None:
                h, refined = up_w @ res[0] @ down_t, True
        v = cands.add(h, method="features", inliers=n_in, matches=n_match, refined=refined)
        if v is None:  # strong matches with an implausible geometry: say so if nothing else fits
            feature_reason = cands.first_reason.removeprefix(NOT_FOUND + ": ").rstrip(".")

    if cands.best is None or cands.best[0].confidence < HIGH_CONFIDENCE:
        for h0 in search_hypotheses(
            wide_levels, tele_levels, tele_shape, search_range, max_rotation_deg, s_w
        ):
            h, refined = h0, False
            if refine:
                res = ecc_refine(wide_w, tele_w, down_w @ h0 @ np.linalg.inv(down_t))
                if res is not None:
                    h, refined = up_w @ res[0] @ down_t, True
            cands.add(h, method="intensity search", refined=refined)
            if cands.best is not None and cands.best[0].confidence >= 0.9:
                break

    if cands.best is None or cands.best[0].confidence < HIGH_CONFIDENCE:
        raise FootprintNotFoundError(_refusal(cands, feature_reason))
    v, h, details = cands.best
    notes = [prior.note] if prior is not None else []
    if details["method"] != "features":
        notes.append(
            "Found by the intensity search"
            + (f" (features: {feature_reason})." if feature_reason else ".")
        )
    return footprint_from_homography(
        h, tele_shape, confidence=round(v.confidence, 4), corner_error_px=v.corner_error_px,
        zoom_prior=None if prior is None else prior.zoom, notes=" ".join(notes), **details,
    )  # fmt: skip


def _plausible(h, tele_shape, wide_shape, zoom_range, max_rotation_deg) -> bool:
    try:
        check_geometry(h, tele_shape, wide_shape, zoom_range, max_rotation_deg)
    except FootprintNotFoundError:
        return False
    return True


def _refusal(cands: _Candidates, feature_reason: str) -> str:
    """One sentence: why no placement of the telephoto could be trusted."""
    if cands.best is None:
        why = feature_reason or cands.first_reason.removeprefix(NOT_FOUND + ": ").rstrip(".")
        why = why or "neither features nor the intensity search found a plausible placement"
        return f"{NOT_FOUND}: {why}."
    v = cands.best[0]
    if feature_reason and v.ncc < 0.5:
        return f"{NOT_FOUND}: {feature_reason}, and {v.reason or 'no placement was verified'}."
    return (
        f"{NOT_FOUND}: the best placement could not be verified: {v.reason or 'too uncertain'} "
        f"(confidence {v.confidence:.2f})."
    )


def estimate_footprint(wide: np.ndarray, tele: np.ndarray) -> np.ndarray:
    """The 3×3 homography mapping telephoto pixel coordinates (x, y, 1) to wide pixel coordinates."""
    return register(wide, tele).homography


def align_reference(
    wide: np.ndarray, tele: np.ndarray, footprint: Footprint | None = None, tick=None
) -> AlignedPair:
    """Register (unless `footprint` is given), cut LRC and resample the colour-matched Ref.

    lr and lrc keep the wide image's dtype; ref gets the wide's dtype too (its colours are the
    wide's after the match). `tick` as in `resample_reference`.
    """
    lr = as_rgb_array(wide)
    fp = register(lr, tele) if footprint is None else footprint
    box = center_crop_box(fp, lr.shape)
    ref, colour = resample_reference(lr, tele, fp, box, tick=tick)
    y0, y1, x0, x1 = box
    return AlignedPair(
        lr=lr, lrc=lr[y0:y1, x0:x1], ref=ref, box_lr=box, footprint=fp, colour=colour
    )
