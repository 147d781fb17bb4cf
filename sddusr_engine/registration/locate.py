"""Registration's entry points: `register` finds the telephoto's footprint in the wide image and
`align_reference` turns a raw pair into the engine's inputs (LR, LRC, Ref)."""

from __future__ import annotations

import numpy as np

from ..io import as_rgb_array
from .common import (
    NOT_FOUND,
    AlignedPair,
    Footprint,
    FootprintNotFoundError,
    check_geometry,
    float_rgb,
    footprint_from_homography,
    gray_u8,
    resize_to,
)
from .features import ecc_refine, sift_homography
from .resample import center_crop_box, resample_reference


def register(
    wide: np.ndarray,
    tele: np.ndarray,
    *,
    min_inliers: int = 20,
    zoom_range: tuple[float, float] = (1.4, 2.8),
    max_rotation_deg: float = 10.0,
    refine: bool = True,
    ratio: float = 0.8,
    max_side: int = 1600,
) -> Footprint:
    """Locate the telephoto in the wide image (arrays H×W×3, uint8/uint16/float in [0, 1]).

    Matching and refinement run with the wide image downscaled to at most `max_side` pixels on its
    long side (the telephoto to half that density); the homography is returned at full resolution.

    Raises `FootprintNotFoundError` with the reason when the pair does not match.
    """
    wide_rgb = float_rgb(wide)
    tele_rgb = float_rgb(tele)
    tele_shape = tele_rgb.shape[:2]
    # Working resolution: the wide capped at `max_side`, the telephoto at half that density
    # (about the wide's, since the zoom is about 2).
    s_w = min(1.0, max_side / max(wide_rgb.shape[:2]))
    wide_w, down_w = resize_to(wide_rgb, s_w)
    tele_w, down_t = resize_to(tele_rgb, 0.5 * s_w)
    up_w = np.linalg.inv(down_w)

    h_w, n_in, n_match, n_kp = sift_homography(gray_u8(wide_w), gray_u8(tele_w), ratio, 2.0)
    if n_kp < min_inliers:
        raise FootprintNotFoundError(
            f"{NOT_FOUND}: the telephoto image has only {n_kp} distinctive features; it may be "
            "blank, out of focus or too dark to register."
        )
    if h_w is None or n_in < min_inliers:
        raise FootprintNotFoundError(
            f"{NOT_FOUND}: only {n_in} consistent feature matches (at least {min_inliers} needed); "
            "check that the two photos show the same scene."
        )
    h = up_w @ h_w @ down_t
    check_geometry(h, tele_shape, wide_rgb.shape[:2], zoom_range, max_rotation_deg)

    refined, cc = False, 1.0
    if refine:
        res = ecc_refine(wide_w, tele_w, h_w)
        if res is not None:
            h, cc, refined = up_w @ res[0] @ down_t, res[1], True
    inlier_ratio = n_in / max(n_match, 1)
    conf = (inlier_ratio * (1 - np.exp(-n_in / 40.0)) * max(cc, 0.0)) ** (1 / 3)
    return footprint_from_homography(
        h, tele_shape, confidence=float(np.clip(conf, 0.0, 1.0)), inliers=n_in, matches=n_match,
        refined=refined,
    )  # fmt: skip


def estimate_footprint(wide: np.ndarray, tele: np.ndarray) -> np.ndarray:
    """The 3×3 homography mapping telephoto pixel coordinates (x, y, 1) to wide pixel coordinates."""
    return register(wide, tele).homography


def align_reference(
    wide: np.ndarray, tele: np.ndarray, footprint: Footprint | None = None
) -> AlignedPair:
    """Register (unless `footprint` is given), cut LRC and resample the colour-matched Ref.

    lr and lrc keep the wide image's dtype; ref gets the wide's dtype too (its colours are the
    wide's after the match).
    """
    lr = as_rgb_array(wide)
    fp = register(lr, tele) if footprint is None else footprint
    box = center_crop_box(fp, lr.shape)
    ref, colour = resample_reference(lr, tele, fp, box)
    y0, y1, x0, x1 = box
    return AlignedPair(
        lr=lr, lrc=lr[y0:y1, x0:x1], ref=ref, box_lr=box, footprint=fp, colour=colour
    )
