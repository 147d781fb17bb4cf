"""Feature-based hypotheses: SIFT + Lowe's ratio test + MAGSAC homography, and the ECC
(MOTION_HOMOGRAPHY) refinement of a homography from a coarse alignment to sub-pixel."""

from __future__ import annotations

import cv2
import numpy as np

from .colour import apply_colour, fit_colour_transform
from .common import footprint_corners


def sift_homography(
    wide_g: np.ndarray, tele_g: np.ndarray, ratio: float, ransac_px: float
) -> tuple[np.ndarray | None, int, int, int]:
    """(H tele_g → wide_g or None, inliers, matches, tele keypoints)."""
    sift = cv2.SIFT_create(nfeatures=6000, contrastThreshold=0.02)
    kw, dw = sift.detectAndCompute(wide_g, None)
    kt, dt = sift.detectAndCompute(tele_g, None)
    if dw is None or dt is None or len(kw) < 4 or len(kt) < 4:
        return None, 0, 0, len(kt) if kt is not None else 0
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(dt, dw, k=2)
    good = [p[0] for p in knn if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    if len(good) < 8:
        return None, 0, len(good), len(kt)
    src = np.float64([kt[m.queryIdx].pt for m in good])
    dst = np.float64([kw[m.trainIdx].pt for m in good])
    h, inl = cv2.findHomography(
        src, dst, cv2.USAC_MAGSAC, ransac_px, maxIters=20000, confidence=0.9999
    )
    if h is None:
        return None, 0, len(good), len(kt)
    inl = inl.ravel().astype(bool)
    if inl.sum() >= 8:  # least-squares polish on the inliers
        h2, _ = cv2.findHomography(src[inl], dst[inl], 0)
        if h2 is not None:
            h = h2
    return h, int(inl.sum()), len(good), len(kt)


def ecc_refine(
    wide_rgb: np.ndarray, tele_half_rgb: np.ndarray, h_half: np.ndarray
) -> tuple[np.ndarray, float] | None:
    """Refine H (half-size telephoto → wide) by ECC; None when ECC fails or drifts."""
    # Colour-match the telephoto to the wide on the coarse alignment first, so that gray levels agree.
    th, tw = tele_half_rgb.shape[:2]
    warped = cv2.warpPerspective(
        wide_rgb,
        h_half,
        (tw, th),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderValue=(-1.0, -1.0, -1.0),
    )
    valid = warped.min(-1) >= 0
    if valid.mean() < 0.5:
        return None
    m = fit_colour_transform(
        cv2.GaussianBlur(tele_half_rgb, (0, 0), 1.0), cv2.GaussianBlur(warped, (0, 0), 1.0), valid
    )
    tmpl = cv2.cvtColor(apply_colour(tele_half_rgb, m), cv2.COLOR_RGB2GRAY)
    inp = cv2.cvtColor(wide_rgb, cv2.COLOR_RGB2GRAY)
    # ECC warps the input (wide) onto the template (telephoto) grid: warp maps template -> input.
    mb = max(2, int(0.03 * min(th, tw)))
    tmask = np.zeros((th, tw), np.uint8)
    tmask[mb:-mb, mb:-mb] = 1
    tmask &= valid.astype(np.uint8)
    warp = (h_half / h_half[2, 2]).astype(np.float32)
    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-6)
    try:
        cc, warp = cv2.findTransformECCWithMask(
            tmpl, inp, tmask, None, warp, cv2.MOTION_HOMOGRAPHY, crit, 3
        )
    except (cv2.error, AttributeError):
        try:
            cc, warp = cv2.findTransformECC(tmpl, inp, warp, cv2.MOTION_HOMOGRAPHY, crit, None, 3)
        except cv2.error:
            return None
    warp = warp.astype(np.float64)
    shift = np.abs(footprint_corners(warp, (th, tw)) - footprint_corners(h_half, (th, tw))).max()
    if not np.isfinite(shift) or shift > 4.0:
        return None
    return warp, float(cc)
