"""Photometric verification of a telephoto → wide homography, and the confidence it earns.

Two checks, both on zero-mean normalised cross-correlation (NCC) of the telephoto warped by the
candidate against the wide image, so that exposure, white balance and gamma do not matter:

- **Local residuals.** A 3×3 grid of patches over the footprint, at every pyramid scale where a
  patch still has 24 pixels (8 on a 2×2 grid on a tiny image): each patch is correlated at the candidate and at every shift up to
  ±3 pixels of its level (so ±3, ±6, ±12 ... wide pixels), which gives the patch's residual shift
  (sub-pixel, from a parabola through the peak), the peak's sharpness, and any second peak
  almost as high (a repeated texture at that scale: the patch says nothing there). A weighted
  least-squares affine fit of the residuals predicts the error at the footprint's corners, and
  its covariance bounds it: `corner_error_px` = worst corner of |residual| + 2σ, in wide pixels
  of the full image. A weak prior on the affine part keeps a scene with one small object from
  being called precise in zoom and roll.
- **Uniqueness.** On a coarse level the footprint's inner part is correlated over shifts of 35 %
  of its size across the wide image: the candidate must be the highest point, and the best other
  peak separated from it by a dip (a neighbour one period away in a repeated texture, or another
  place in the scene; not the shoulder of one broad hill) sets the margin.

The confidence is 2^−(e/0.6)² for the corner bound e (0.5 at 0.6 px, 0.15 at 1 px), times the
lead term min(1, lead / 2), the lead being the margin divided by the candidate's own mismatch
1 − NCC (at least 0.005); a candidate that is not the highest peak, or whose coarse NCC
is under 0.3 (another scene), gets 0. `HIGH_CONFIDENCE` is 0.5: an answer the engine uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .pyramid import Level

HIGH_CONFIDENCE = 0.5
SEARCH_PX = 3  # patch shifts examined, each way, in pixels of the patch's level
MIN_PATCH = 24  # a patch smaller than this at a level says too little to be used there...
SMALL_PATCH = 8  # ...unless the whole image is that small: then 8 pixels on a 2×2 grid
MAX_PATCH = 96
GRID = 3
MIN_PEAK_NCC = 0.25  # a patch peak below this is noise: no observation
AMBIGUOUS_DROP = 0.04  # a second peak within this of the first: a repeated texture
PRIOR_AFFINE = 2e-3  # prior σ of the affine residual's matrix entries (pixels per pixel)
PRIOR_SHIFT = 10.0  # prior σ of the residual translation (wide pixels)
NOISE_SCALE = 0.05  # converts a patch's NCC statistics into the σ of its shift (calibrated)
MIN_COARSE_NCC = 0.3
MIN_MISMATCH = 0.005
LEAD_FULL = 2.0  # a lead of twice the mismatch at the candidate is full confidence in its place


@dataclass(frozen=True)
class Verdict:
    """What the verification found: `confidence` in [0, 1]; `corner_error_px`, the predicted
    bound on the corner error (full-resolution wide pixels); `residual_px`, the predicted corner
    displacement itself; `ncc`, the coarse footprint correlation; `margin`, its lead over the best
    other peak; `observations`, the patches (scale × axis) that carried information; `reason`,
    a sentence when the confidence is low."""

    confidence: float
    corner_error_px: float
    residual_px: float
    ncc: float
    margin: float
    observations: int
    reason: str


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0.05 else img


def _tele_source(tele_levels: list[Level], zoom: float, wide_scale: float):
    """The telephoto level with at least the wide level's density, pre-blurred to it."""
    best = tele_levels[0]
    for lv in tele_levels:
        if zoom * lv.scale / wide_scale >= 1.0:
            best = lv
    r = zoom * best.scale / wide_scale
    return _blur(best.image, 0.5 * np.sqrt(max(r * r - 1.0, 0.0))), best.down


def _peak(c: np.ndarray) -> tuple[float, float, float, float, float, bool, bool]:
    """(dx, dy, curvature x, curvature y, peak, ambiguous, at the border) of an NCC map whose
    centre is zero shift."""
    r = c.shape[0] // 2
    iy, ix = np.unravel_index(int(np.argmax(c)), c.shape)
    c0 = float(c[iy, ix])
    border = ix in (0, c.shape[1] - 1) or iy in (0, c.shape[0] - 1)

    def sub(m, p, q):
        den = m - 2 * p + q
        return (0.5 * (m - q) / den if den < -1e-9 else 0.0), max(-den, 0.0)

    dx, kx = sub(c[iy, ix - 1], c0, c[iy, ix + 1]) if 0 < ix < c.shape[1] - 1 else (0.0, 0.0)
    dy, ky = sub(c[iy - 1, ix], c0, c[iy + 1, ix]) if 0 < iy < c.shape[0] - 1 else (0.0, 0.0)
    # a second local maximum (outside the first peak's 3×3) nearly as high: ambiguous
    dil = cv2.dilate(c, np.ones((3, 3), np.uint8))
    loc = (c >= dil - 1e-7) & (c > c0 - AMBIGUOUS_DROP)
    loc[max(iy - 1, 0) : iy + 2, max(ix - 1, 0) : ix + 2] = False
    return ix - r + dx, iy - r + dy, kx, ky, c0, bool(loc.any()), border


def _local_observations(wide_levels, tele_levels, h_full, zoom, inner, min_patch, grid):
    """Rows (x, y, axis, shift, weight) in full-resolution wide pixels, one per informative patch
    axis and scale; `inner` is the footprint's inner box (x0, y0, x1, y1) in wide pixels."""
    x0, y0, x1, y1 = inner
    rows = []
    for lv in wide_levels:
        s = lv.scale
        rw, rh = (x1 - x0) * s / grid, (y1 - y0) * s / grid
        p = int(min(rw, rh, MAX_PATCH))
        if p < min_patch:
            continue
        src, t_down = _tele_source(tele_levels, zoom, s)
        h_lv = lv.down @ h_full @ np.linalg.inv(t_down)  # tele level → wide level
        h_inv = np.linalg.inv(h_lv)
        wide_b = _blur(lv.image, 0.8)
        hh, ww = wide_b.shape
        for gy in range(grid):
            for gx in range(grid):
                cx = (x0 + 0.5) * s - 0.5 + (gx + 0.5) * rw
                cy = (y0 + 0.5) * s - 0.5 + (gy + 0.5) * rh
                ax, ay = int(round(cx - p / 2)), int(round(cy - p / 2))
                r = SEARCH_PX
                if ax - r < 0 or ay - r < 0 or ax + p + r > ww or ay + p + r > hh:
                    continue
                # the telephoto warped onto the patch's wide pixels
                shift = np.array([[1.0, 0, ax], [0, 1, ay], [0, 0, 1]])
                tmpl = cv2.warpPerspective(
                    src, h_inv @ shift, (p, p), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderValue=-1.0,
                )  # fmt: skip
                if tmpl.min() < 0:
                    continue
                tmpl = _blur(tmpl, 0.8)
                if tmpl.std() < 1e-4:
                    continue
                img = wide_b[ay - r : ay + p + r, ax - r : ax + p + r]
                c = cv2.matchTemplate(img, tmpl, cv2.TM_CCOEFF_NORMED)
                dx, dy, kx, ky, c0, amb, _ = _peak(c)
                if c0 < MIN_PEAK_NCC or amb:
                    continue
                # σ² of a peak's position ∝ (1 − c0) / (curvature · independent samples)
                n_eff = p * p / 4.0
                noise = max(1.0 - c0, 0.01)
                xf, yf = (cx + 0.5) / s - 0.5, (cy + 0.5) / s - 0.5
                for axis, d, k in ((0, dx, kx), (1, dy, ky)):
                    if k <= 1e-4:
                        continue
                    var_lv = NOISE_SCALE**2 * noise / (k * n_eff) + 0.02**2
                    rows.append((xf, yf, axis, d / s, 1.0 / (var_lv / s**2)))
    return rows


def _fit_corners(rows, corners, centre):
    """(predicted corner displacement, its 2σ bound) from the affine fit of the residuals."""
    prior = np.diag([PRIOR_SHIFT**-2] * 2 + [PRIOR_AFFINE**-2] * 4)
    data = []
    for x, y, axis, d, w in rows:
        j = np.zeros(6)
        j[axis] = 1.0
        j[2 + 2 * axis] = x - centre[0]
        j[3 + 2 * axis] = y - centre[1]
        data.append((j, d, w))
    theta = np.zeros(6)
    ata = prior
    for round_ in range(3):  # re-weighted: a moving object or parallax must not rule the fit
        ata, atb = prior.copy(), np.zeros(6)
        for j, d, w in data:
            res = d - j @ theta
            w_eff = w / max(1.0, res * res * w / 9.0) if round_ else w  # Cauchy-like beyond 3σ
            ata += w_eff * np.outer(j, j)
            atb += w_eff * j * d
        theta = np.linalg.solve(ata, atb)
    cov = np.linalg.inv(ata)
    worst_bound, worst_res = 0.0, 0.0
    for cx, cy in corners:
        jx = np.array([1, 0, cx - centre[0], cy - centre[1], 0, 0])
        jy = np.array([0, 1, 0, 0, cx - centre[0], cy - centre[1]])
        e = np.hypot(jx @ theta, jy @ theta)
        sd = np.sqrt(jx @ cov @ jx + jy @ cov @ jy)
        worst_bound = max(worst_bound, e + 2.0 * sd)
        worst_res = max(worst_res, e)
    return worst_res, worst_bound


def _separate(c: np.ndarray, a: tuple[int, int], b: tuple[int, int], drop: float) -> bool:
    """Whether the NCC map dips by more than `drop` on the way from peak `a` to peak `b`: two
    hills (a neighbour one period away), not one broad hill (a smooth scene)."""
    n = int(max(abs(a[0] - b[0]), abs(a[1] - b[1]))) + 1
    ys = np.rint(np.linspace(a[0], b[0], n)).astype(int)
    xs = np.rint(np.linspace(a[1], b[1], n)).astype(int)
    return float(c[ys, xs].min()) < min(float(c[a]), float(c[b])) - drop


def _uniqueness(wide_levels, tele_levels, h_full, zoom, inner) -> tuple[float, float, bool]:
    """(coarse NCC at the candidate, its lead over the best separate peak, the candidate is the
    highest point) for the footprint's inner part shifted by up to 35 % of its size over the wide
    image, on the level where the footprint is about 140 pixels wide."""
    x0, y0, x1, y1 = inner
    lv = wide_levels[-1]
    for cand in wide_levels:
        if (x1 - x0) * cand.scale <= 140:
            lv = cand
            break
    s = lv.scale
    src, t_down = _tele_source(tele_levels, zoom, s)
    h_inv = np.linalg.inv(lv.down @ h_full @ np.linalg.inv(t_down))
    ax, ay = int(np.ceil((x0 + 0.5) * s - 0.5)), int(np.ceil((y0 + 0.5) * s - 0.5))
    pw, ph = int((x1 - x0) * s), int((y1 - y0) * s)
    m = int(max(3, round(0.35 * min(pw, ph))))
    hh, ww = lv.image.shape
    ax0, ay0 = max(ax - m, 0), max(ay - m, 0)
    ax1, ay1 = min(ax + pw + m, ww), min(ay + ph + m, hh)
    if pw < 8 or ph < 8 or ax1 - ax0 < pw + 2 or ay1 - ay0 < ph + 2:
        return 0.0, 0.0, False
    shift = np.array([[1.0, 0, ax], [0, 1, ay], [0, 0, 1]])
    tmpl = cv2.warpPerspective(
        src, h_inv @ shift, (pw, ph), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    if tmpl.std() < 1e-4:
        return 0.0, 0.0, False
    c = cv2.matchTemplate(lv.image[ay0:ay1, ax0:ax1], tmpl, cv2.TM_CCOEFF_NORMED)
    oy, ox = ay - ay0, ax - ax0  # where zero shift is in the map
    c_here = float(c[oy, ox])
    near = np.zeros(c.shape, bool)
    near[max(oy - 2, 0) : oy + 3, max(ox - 2, 0) : ox + 3] = True
    best_elsewhere = float(c[~near].max()) if (~near).any() else -1.0
    dil = cv2.dilate(c, np.ones((3, 3), np.uint8))
    peaks = (c >= dil - 1e-7) & ~near
    # a peak on the map's edge is a slope leaving it, not a neighbour
    peaks[0, :] = peaks[-1, :] = peaks[:, 0] = peaks[:, -1] = False
    drop = 0.3 * (c_here - float(c.min()))
    other = float(c.min())
    for py, px in zip(*np.nonzero(peaks), strict=True):
        if c[py, px] > other and _separate(c, (oy, ox), (int(py), int(px)), drop):
            other = float(c[py, px])
    return c_here, c_here - other, c_here >= best_elsewhere - 0.005


def verify(
    wide_levels: list[Level],
    tele_levels: list[Level],
    h_full: np.ndarray,
    corners: np.ndarray,
    zoom: float,
    wide_shape: tuple[int, int],
) -> Verdict:
    """The `Verdict` on homography `h_full` (full-resolution telephoto → wide pixels) whose
    footprint corners (wide pixels) are `corners`, from grey pyramids of both images."""
    wh, ww = wide_shape
    xs, ys = corners[:, 0], corners[:, 1]
    # inner box of the footprint (the rotation and the frame edge trimmed)
    x0, x1 = max(np.sort(xs)[1], 0.0), min(np.sort(xs)[2], ww - 1.0)
    y0, y1 = max(np.sort(ys)[1], 0.0), min(np.sort(ys)[2], wh - 1.0)
    pad_x, pad_y = 0.04 * (x1 - x0), 0.04 * (y1 - y0)
    inner = (x0 + pad_x, y0 + pad_y, x1 - pad_x, y1 - pad_y)
    if inner[2] - inner[0] < 16 or inner[3] - inner[1] < 16:
        return Verdict(0.0, np.inf, np.inf, 0.0, 0.0, 0, "the footprint is too small to check")
    ncc, margin, is_top = _uniqueness(wide_levels, tele_levels, h_full, zoom, inner)
    rows = _local_observations(wide_levels, tele_levels, h_full, zoom, inner, MIN_PATCH, GRID)
    if not rows:  # a tiny image: smaller patches, noisier but better than none
        rows = _local_observations(wide_levels, tele_levels, h_full, zoom, inner, SMALL_PATCH, 2)
    centre = ((inner[0] + inner[2]) / 2, (inner[1] + inner[3]) / 2)
    residual, bound = _fit_corners(rows, corners, centre)
    acc = 2.0 ** (-((bound / 0.6) ** 2))
    # the lead over the neighbour, measured against the mismatch at the candidate itself: a
    # clean picture can tell apart peaks that differ by little
    lead = max(margin, 0.0) / max(1.0 - ncc, MIN_MISMATCH)
    conf = acc * min(1.0, lead / LEAD_FULL)
    reason = ""
    if ncc < MIN_COARSE_NCC:
        conf, reason = 0.0, f"the telephoto does not look like the wide image there (NCC {ncc:.2f})"
    elif not is_top:
        conf, reason = 0.0, "a shifted placement of the telephoto fits the wide image better"
    elif lead < LEAD_FULL * HIGH_CONFIDENCE:
        reason = (
            "the scene repeats: the telephoto fits one period away almost as well "
            f"(NCC {ncc:.3f} against {ncc - margin:.3f})"
        )
    elif bound > 0.6:
        reason = (
            f"the placement could be checked only to {bound:.1f} wide pixels (the scene has "
            "too little detail to lock onto)"
        )
    return Verdict(
        confidence=float(np.clip(conf, 0.0, 1.0)),
        corner_error_px=float(bound),
        residual_px=float(residual),
        ncc=float(ncc),
        margin=float(margin),
        observations=len(rows),
        reason=reason,
    )
