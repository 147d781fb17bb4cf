"""Finding the telephoto's footprint in the wide image, and resampling it onto the 2×LRC grid.

Conventions (DESIGN section 1):

- A homography H maps telephoto pixel coordinates (x, y, 1) to wide pixel coordinates; pixel
  centres are integers. The footprint polygon is the telephoto's outer edge, the image of its
  corners (−0.5, −0.5), (w − 0.5, −0.5), (w − 0.5, h − 0.5), (−0.5, h − 0.5) (TL, TR, BR, BL).
- The centre box `(y0, y1, x0, x1)` is in wide (LR) pixels, half-open, with even y0, x0 and even
  height and width, and lies inside the footprint: LRC = wide[y0:y1, x0:x1].
- Ref has shape (2·(y1−y0), 2·(x1−x0)); its pixel (u, v) sits at wide pixel
  (x0 + (u + 0.5)/2 − 0.5, y0 + (v + 0.5)/2 − 0.5), so a 2×2 block of Ref covers one LRC pixel.

Method: grayscale, percentile contrast stretch, the telephoto downscaled ×2 so both sides have
about the same density; SIFT + Lowe's ratio test + MAGSAC homography; a colour match of the
telephoto to the wide on the coarse alignment; then ECC (MOTION_HOMOGRAPHY) on the half-size
telephoto against the wide image refines to sub-pixel. A homography cannot follow parallax, so
the resampled Ref is finally refined by a smooth dense flow (`dense_refinement`). The result is checked (inlier count, zoom,
rotation, footprint inside the frame) and `FootprintNotFoundError` explains a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .errors import FootprintNotFoundError
from .io import as_rgb_array

__all__ = [
    "AlignedPair",
    "Footprint",
    "FootprintNotFoundError",
    "align_reference",
    "dense_refinement",
    "center_crop_box",
    "colour_match",
    "estimate_footprint",
    "fit_colour_transform",
    "footprint_from_homography",
    "ref_to_tele_matrix",
    "register",
    "resample_reference",
]

_NOT_FOUND = "the telephoto image could not be found in the wide image"
# Ridge of the colour map's 3×3 toward the identity, as a variance per pixel: a colour direction
# whose spread in the picture is under about sqrt(3e-5) ≈ 0.005 (1.4 grey levels) keeps gain 1.
COLOUR_RIDGE = 3e-5


@dataclass(frozen=True)
class Footprint:
    """Where the telephoto lies in the wide image.

    homography: 3×3 float64, telephoto pixel → wide pixel.
    confidence: in [0, 1]: geometric mean of the inlier ratio, a count term 1 − exp(−inliers/40)
        and the ECC correlation (1 when ECC was skipped).
    inliers / matches: RANSAC inliers among the ratio-test matches.
    corners: 4×2 float64, the telephoto's outer corners TL, TR, BR, BL in wide pixels.
    zoom: sqrt(telephoto area / footprint area). rotation_deg: angle of the footprint's top edge
        in the wide image, in degrees; positive turns clockwise on screen (y points down).
    tele_shape: (H, W) of the telephoto the homography refers to. refined: ECC succeeded.
    """

    homography: np.ndarray
    confidence: float
    inliers: int
    matches: int
    corners: np.ndarray
    zoom: float
    rotation_deg: float
    tele_shape: tuple[int, int]
    refined: bool


@dataclass(frozen=True)
class AlignedPair:
    """The engine's inputs from a raw pair.

    lr: the wide image. lrc: lr[y0:y1, x0:x1]. ref: the telephoto resampled onto the 2×LRC grid and
    colour-matched to the wide image. box_lr: (y0, y1, x0, x1) in wide (LR) pixels.
    footprint: the registration used.
    colour: 3×4 float64 matrix M applied as ref_rgb ← M[:, :3] @ tele_rgb + M[:, 3] (values in
    [0, 1]).
    """

    lr: np.ndarray
    lrc: np.ndarray
    ref: np.ndarray
    box_lr: tuple[int, int, int, int]
    footprint: Footprint
    colour: np.ndarray


# ----------------------------------------------------------------------------- helpers


def _float_rgb(img: np.ndarray) -> np.ndarray:
    a = as_rgb_array(img)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return a.astype(np.float32)


def _gray_u8(rgb01: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(rgb01, cv2.COLOR_RGB2GRAY)
    lo, hi = np.percentile(g, (0.5, 99.5))
    g = (g - lo) / max(hi - lo, 1e-6)
    return np.clip(g * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _half(img: np.ndarray) -> np.ndarray:
    # Exact 2×2 block means on even sizes (Ref → LRC grid).
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)


def _scale_matrix(sx: float, sy: float | None = None) -> np.ndarray:
    # Pixel-centre convention of cv2.resize: x_small = (x + 0.5)·s − 0.5.
    sy = sx if sy is None else sy
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def _resize_to(img: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(resized image, its full→small pixel map) for a downscale by `scale` (≤ 1)."""
    h, w = img.shape[:2]
    if scale >= 1.0:
        return img, np.eye(3)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out, _scale_matrix(nw / w, nh / h)


def _corners(h: np.ndarray, tele_shape: tuple[int, int]) -> np.ndarray:
    th, tw = tele_shape
    c = np.array([[-0.5, -0.5], [tw - 0.5, -0.5], [tw - 0.5, th - 0.5], [-0.5, th - 0.5]])
    return cv2.perspectiveTransform(c[None].astype(np.float64), h)[0]


def _zoom_rotation(corners: np.ndarray, tele_shape: tuple[int, int]) -> tuple[float, float]:
    area = abs(cv2.contourArea(corners.astype(np.float32)))
    zoom = float(np.sqrt(tele_shape[0] * tele_shape[1] / max(area, 1e-9)))
    top = corners[1] - corners[0]
    return zoom, float(np.degrees(np.arctan2(top[1], top[0])))


def fit_colour_transform(
    src: np.ndarray, dst: np.ndarray, mask: np.ndarray | None = None, ridge: float = COLOUR_RIDGE
) -> np.ndarray:
    """Robust least-squares 3×4 colour map M with dst ≈ M[:, :3] @ src + M[:, 3] (float RGB arrays).

    Trimmed least squares: fit, drop the 20% largest residuals, refit (three rounds). Pixels
    clipped in either image (any channel at ≤0.002 or ≥0.998) are left out. The 3×3 part is
    pulled toward the identity by `ridge` (a variance per pixel): colours that the picture spans
    decide the map, and a direction it barely spans keeps the identity's gain. Without it a scene
    of nearly one hue (collinear channels) gets any 3×3 that maps that hue right and flattens
    everything else in the Ref (a sky crop went from 40 to 25 dB).
    """
    s = src.reshape(-1, 3).astype(np.float64)
    d = dst.reshape(-1, 3).astype(np.float64)
    keep = (s.max(1) < 0.998) & (d.max(1) < 0.998) & (s.min(1) > 0.002) & (d.min(1) > 0.002)
    if mask is not None:
        keep &= mask.reshape(-1)
    if keep.sum() < 64:  # nearly everything clipped: fall back to all pixels
        keep = np.ones(len(s), bool) if mask is None else mask.reshape(-1).copy()
    s, d = s[keep], d[keep]
    if len(s) > 200_000:  # enough for 12 unknowns; keeps it fast
        idx = np.random.default_rng(0).choice(len(s), 200_000, replace=False)
        s, d = s[idx], d[idx]
    sel = np.ones(len(s), bool)
    m = np.hstack([np.eye(3), np.zeros((3, 1))])
    for _ in range(3):
        if sel.sum() < 16:
            break
        # centred normal equations, offsets unpenalised: (SᵀS + λnI) Gᵀ = SᵀD + λnI
        s_mean, d_mean = s[sel].mean(0), d[sel].mean(0)
        sc, dc = s[sel] - s_mean, d[sel] - d_mean
        lam = ridge * len(sc) * np.eye(3)
        g = np.linalg.solve(sc.T @ sc + lam, sc.T @ dc + lam).T
        m = np.hstack([g, (d_mean - g @ s_mean)[:, None]])
        r = np.abs(s @ g.T + m[:, 3] - d).sum(1)
        sel = r <= np.quantile(r, 0.8)
    return m


def _apply_colour(rgb01: np.ndarray, m: np.ndarray) -> np.ndarray:
    out = rgb01.reshape(-1, 3) @ m[:, :3].T.astype(np.float32) + m[:, 3].astype(np.float32)
    return np.clip(out, 0, 1).reshape(rgb01.shape).astype(np.float32)


def colour_match(ref01: np.ndarray, lrc01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Ref on the 2×LRC grid (float RGB in [0, 1]) mapped to LRC's colours: (ref, 3×4 matrix).

    The fit runs on low-passed images: the telephoto's extra detail is noise in the regressor
    and would bias the gains toward zero (errors-in-variables).
    """
    colour = fit_colour_transform(
        cv2.GaussianBlur(_half(ref01), (0, 0), 1.5), cv2.GaussianBlur(lrc01, (0, 0), 1.5)
    )
    return _apply_colour(ref01, colour), colour


# ----------------------------------------------------------------------------- registration


def _sift_homography(
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


def _ecc_refine(
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
    tmpl = cv2.cvtColor(_apply_colour(tele_half_rgb, m), cv2.COLOR_RGB2GRAY)
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
    shift = np.abs(_corners(warp, (th, tw)) - _corners(h_half, (th, tw))).max()
    if not np.isfinite(shift) or shift > 4.0:
        return None
    return warp, float(cc)


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
    wide_rgb = _float_rgb(wide)
    tele_rgb = _float_rgb(tele)
    tele_shape = tele_rgb.shape[:2]
    # Working resolution: the wide capped at `max_side`, the telephoto at half that density
    # (about the wide's, since the zoom is about 2).
    s_w = min(1.0, max_side / max(wide_rgb.shape[:2]))
    wide_w, down_w = _resize_to(wide_rgb, s_w)
    tele_w, down_t = _resize_to(tele_rgb, 0.5 * s_w)
    up_w = np.linalg.inv(down_w)

    h_w, n_in, n_match, n_kp = _sift_homography(_gray_u8(wide_w), _gray_u8(tele_w), ratio, 2.0)
    if n_kp < min_inliers:
        raise FootprintNotFoundError(
            f"{_NOT_FOUND}: the telephoto image has only {n_kp} distinctive features; it may be "
            "blank, out of focus or too dark to register."
        )
    if h_w is None or n_in < min_inliers:
        raise FootprintNotFoundError(
            f"{_NOT_FOUND}: only {n_in} consistent feature matches (at least {min_inliers} needed); "
            "check that the two photos show the same scene."
        )
    h = up_w @ h_w @ down_t
    _check_geometry(h, tele_shape, wide_rgb.shape[:2], zoom_range, max_rotation_deg)

    refined, cc = False, 1.0
    if refine:
        res = _ecc_refine(wide_w, tele_w, h_w)
        if res is not None:
            h, cc, refined = up_w @ res[0] @ down_t, res[1], True
    inlier_ratio = n_in / max(n_match, 1)
    conf = (inlier_ratio * (1 - np.exp(-n_in / 40.0)) * max(cc, 0.0)) ** (1 / 3)
    return footprint_from_homography(
        h, tele_shape, confidence=float(np.clip(conf, 0.0, 1.0)), inliers=n_in, matches=n_match,
        refined=refined,
    )  # fmt: skip


def footprint_from_homography(
    h: np.ndarray,
    tele_shape: tuple[int, int],
    *,
    confidence: float = 0.0,
    inliers: int = 0,
    matches: int = 0,
    refined: bool = False,
) -> Footprint:
    """A `Footprint` for a known telephoto → wide homography (corners, zoom and roll derived)."""
    h = np.asarray(h, np.float64)
    h = h / h[2, 2]
    corners = _corners(h, tele_shape)
    zoom, rot = _zoom_rotation(corners, tele_shape)
    return Footprint(
        homography=h,
        confidence=confidence,
        inliers=inliers,
        matches=matches,
        corners=corners,
        zoom=zoom,
        rotation_deg=rot,
        tele_shape=(int(tele_shape[0]), int(tele_shape[1])),
        refined=refined,
    )


def _check_geometry(h, tele_shape, wide_shape, zoom_range, max_rotation_deg) -> None:
    corners = _corners(h, tele_shape)
    if not np.all(np.isfinite(corners)) or not cv2.isContourConvex(corners.astype(np.float32)):
        raise FootprintNotFoundError(
            f"{_NOT_FOUND}: the feature matches imply a twisted footprint; "
            "check that the two photos show the same scene."
        )
    zoom, rot = _zoom_rotation(corners, tele_shape)
    if not zoom_range[0] <= zoom <= zoom_range[1]:
        raise FootprintNotFoundError(
            f"{_NOT_FOUND}: the matches imply a zoom of x{zoom:.2f}, outside the plausible "
            f"x{zoom_range[0]:.2f}-x{zoom_range[1]:.2f}; check that the second photo is the "
            "telephoto of the same shot."
        )
    if abs(rot) > max_rotation_deg:
        raise FootprintNotFoundError(
            f"{_NOT_FOUND}: the matches imply a rotation of {rot:.1f} degrees (at most "
            f"{max_rotation_deg:g} expected); check that the two photos were taken together."
        )
    # Opposite edges of a real footprint are nearly parallel and of equal length.
    e = np.linalg.norm(np.roll(corners, -1, 0) - corners, axis=1)
    if max(e[0] / e[2], e[2] / e[0], e[1] / e[3], e[3] / e[1]) > 1.15:
        raise FootprintNotFoundError(
            f"{_NOT_FOUND}: the matches imply a strongly skewed footprint; "
            "check that the two photos show the same scene."
        )
    wh, ww = wide_shape
    margin = 0.1 * min(wh, ww)
    if (
        corners[:, 0].min() < -margin
        or corners[:, 1].min() < -margin
        or corners[:, 0].max() > ww + margin
        or corners[:, 1].max() > wh + margin
    ):
        raise FootprintNotFoundError(
            f"{_NOT_FOUND}: the matched footprint extends outside the wide frame; "
            "check that the telephoto was taken with this wide photo."
        )


def estimate_footprint(wide: np.ndarray, tele: np.ndarray) -> np.ndarray:
    """The 3×3 homography mapping telephoto pixel coordinates (x, y, 1) to wide pixel coordinates."""
    return register(wide, tele).homography


# ----------------------------------------------------------------------------- resampling


def _inside(poly: np.ndarray, x: float, y: float) -> bool:
    return cv2.pointPolygonTest(poly.astype(np.float32), (float(x), float(y)), False) >= 0


def center_crop_box(
    footprint: Footprint | np.ndarray, wide_shape: tuple[int, ...]
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the largest-ish axis-aligned rectangle of wide pixels inside the footprint.

    `footprint` is a `Footprint` or its 4×2 corner array. y0, x0, height and width are even; every
    pixel's outer edge lies inside the footprint polygon and the wide frame.
    """
    corners = (
        footprint.corners if isinstance(footprint, Footprint) else np.asarray(footprint, float)
    )
    wh, ww = int(wide_shape[0]), int(wide_shape[1])
    tl, tr, br, bl = corners
    # Rectangle edges (pixel-edge coordinates: pixel i spans [i - 0.5, i + 0.5]).
    x0 = int(np.ceil(max(tl[0], bl[0], -0.5) + 0.5))
    x1 = int(np.floor(min(tr[0], br[0], ww - 0.5) + 0.5))
    y0 = int(np.ceil(max(tl[1], tr[1], -0.5) + 0.5))
    y1 = int(np.floor(min(bl[1], br[1], wh - 0.5) + 0.5))
    x0 += x0 % 2
    y0 += y0 % 2
    x1 -= (x1 - x0) % 2
    y1 -= (y1 - y0) % 2
    for _ in range(max(wh, ww)):
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise FootprintNotFoundError(
                f"{_NOT_FOUND}: the footprint is too small for a centre box."
            )
        out = [
            not _inside(corners, x - 0.5, y - 0.5)
            for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))  # TL TR BR BL
        ]
        if not any(out):
            break
        if out[0] or out[3]:
            x0 += 2
        if out[1] or out[2]:
            x1 -= 2
        if out[0] or out[1]:
            y0 += 2
        if out[2] or out[3]:
            y1 -= 2
    return y0, y1, x0, x1


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
    return AlignedPair(lr=lr, lrc=lr[y0:y1, x0:x1], ref=ref, box_lr=box, footprint=fp, colour=colour)


def ref_to_tele_matrix(footprint: Footprint, box: tuple[int, int, int, int]) -> np.ndarray:
    """3×3: Ref pixel (u, v, 1) on the 2×LRC grid of `box` (wide pixels) → telephoto pixel."""
    y0, _, x0, _ = box
    # Ref pixel (u, v) sits at wide (x0 + (u + 0.5)/2 - 0.5, y0 + (v + 0.5)/2 - 0.5).
    ref_to_wide = np.array([[0.5, 0, x0 - 0.25], [0, 0.5, y0 - 0.25], [0, 0, 1.0]])
    return np.linalg.inv(footprint.homography) @ ref_to_wide


# Dense refinement: DIS optical flow between LRC (bicubic x2) and the resampled Ref, smoothed.
REFINE_SMOOTH_PX = 8.0  # Gaussian sigma (Ref pixels) of the refinement field: parallax is smooth
REFINE_MAX_PX = 6.0  # a larger correction is a failure of the flow, not parallax: clipped
REFINE_MIN_SIDE = 32  # DIS needs a few pyramid levels


def dense_refinement(lrc: np.ndarray, ref: np.ndarray) -> np.ndarray | None:
    """A smooth correction field f [H,W,2] (dx, dy; Ref pixels) such that Ref sampled at p + f(p)
    lines up with LRC: DIS optical flow from LRC upscaled x2 (bicubic) to the Ref (blurred to
    about LRC's sharpness), Gaussian-smoothed and clipped. None when the images are too small.

    A homography cannot remove the parallax of a second camera; this takes the remaining
    misalignment from pixels to about a tenth of a pixel on the synthetic pairs
    (docs/decisions.md), which the Ref's finest detail needs.
    """
    h, w = ref.shape[:2]
    if min(h, w) < 2 * REFINE_MIN_SIDE:
        return None
    up = cv2.resize(_float_rgb(lrc), (w, h), interpolation=cv2.INTER_CUBIC)
    g_lrc = _gray_u8(np.clip(up, 0.0, 1.0))
    g_ref = _gray_u8(cv2.GaussianBlur(_float_rgb(ref), (0, 0), 1.0))
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flow = dis.calc(g_lrc, g_ref, None)  # up(LRC)(p) ~ Ref(p + flow(p))
    flow = np.stack(
        [
            cv2.GaussianBlur(
                flow[..., i], (0, 0), REFINE_SMOOTH_PX, borderType=cv2.BORDER_REPLICATE
            )
            for i in range(2)
        ],
        axis=-1,
    )
    return np.clip(flow, -REFINE_MAX_PX, REFINE_MAX_PX).astype(np.float32)


def resample_reference(
    wide: np.ndarray,
    tele: np.ndarray,
    footprint: Footprint,
    box: tuple[int, int, int, int],
    refine: bool = True,
    return_refinement: bool = False,
):
    """The telephoto resampled onto the 2×LRC grid of `box` (wide pixels, (y0, y1, x0, x1)) and
    colour-matched to wide[box]: (ref in the wide's dtype, the 3×4 colour matrix), plus the
    dense refinement field (or None) with `return_refinement`.

    The one Ref the network sees, at inference (`align_reference`) and in the training pairs
    (`data.make_pair`), so that both are aligned the same way. With `refine`, a smooth dense
    correction (`dense_refinement`) is measured on the homography's result and the telephoto is
    resampled once more through both, from the original pixels (one interpolation, not two).
    """
    lr = as_rgb_array(wide)
    y0, y1, x0, x1 = box
    tele_rgb = _float_rgb(tele)
    step = footprint.zoom / 2.0  # telephoto pixels per Ref pixel
    src = tele_rgb
    if step > 1.05:
        src = cv2.GaussianBlur(tele_rgb, (0, 0), 0.5 * np.sqrt(step**2 - 1))
    to_tele = ref_to_tele_matrix(footprint, box)
    size = (2 * (x1 - x0), 2 * (y1 - y0))
    ref = cv2.warpPerspective(
        src, to_tele, size, flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    lrc01 = _float_rgb(lr[y0:y1, x0:x1])
    ref, colour = colour_match(ref, lrc01)
    field = dense_refinement(lrc01, ref) if refine else None
    if field is not None:
        # float32 is exact to ~1e-3 px at these coordinates and halves the memory of a
        # CameraFusion-sized Ref's maps
        v, u = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
        pts = np.stack([u + field[..., 0], v + field[..., 1], np.ones_like(u)], axis=-1)
        q = pts @ to_tele.T.astype(np.float32)
        q = q[..., :2] / q[..., 2:]
        ref = cv2.remap(src, q[..., 0], q[..., 1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        ref = _apply_colour(ref, colour)
    if lr.dtype == np.uint8:
        ref = np.rint(ref * 255.0).astype(np.uint8)
    elif lr.dtype == np.uint16:
        ref = np.rint(ref * 65535.0).astype(np.uint16)
    return (ref, colour, field) if return_refinement else (ref, colour)
