"""Intensity-based hypotheses for scenes where features fail (sky, walls, repeated patterns, night):
a global sweep of zoom and roll with normalised cross-correlation on a coarse pyramid level, a
finer local sweep one level up, then ECC from coarse to fine.

The telephoto, scaled by 1/zoom and turned by the roll, is correlated as a template against the
whole coarse wide image (`cv2.matchTemplate`, TM_CCOEFF_NORMED: gain and offset do not matter);
the template is the telephoto's inner rectangle that stays inside it after the turn. The best
few distinct peaks become similarity hypotheses; ECC (`cv2.findTransformECC`) refines each one
level at a time, affine on the coarse levels and a homography at the working level.
"""

from __future__ import annotations

import cv2
import numpy as np

from .pyramid import Level, downscale

COARSE_SIDE = 160  # long side of the wide level of the global sweep
ZOOM_STEP = 0.04  # relative zoom step of the global sweep (0.75 px at a 40 px template edge)
ROLL_STEP = 2.0  # degrees
ROLL_SWEEP = 6.0  # the sweep covers ±6°: phone lenses are mounted together, their roll is small
HYPOTHESES = 6


def similarity(tele_shape, zoom, roll_deg, centre_wide) -> np.ndarray:
    """Telephoto → wide homography: the telephoto's centre at `centre_wide`, scale 1/zoom."""
    th, tw = tele_shape
    a = np.deg2rad(roll_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / zoom
    t = np.array([(tw - 1) / 2, (th - 1) / 2])
    h = np.eye(3)
    h[:2, :2] = r
    h[:2, 2] = np.asarray(centre_wide, float) - r @ t
    return h


def _tele_at(tele_levels: list[Level], density: float):
    """(telephoto level with at least `density` pixels per telephoto pixel, pre-blurred to it)."""
    best = tele_levels[0]
    for lv in tele_levels:
        if lv.scale >= density:
            best = lv
    r = best.scale / density
    img = best.image
    if r > 1.05:
        img = cv2.GaussianBlur(img, (0, 0), 0.5 * np.sqrt(r * r - 1.0))
    return img, best


def _template(tele_levels, tele_shape, zoom, roll_deg, wide_scale):
    """The telephoto's inner rectangle as seen at `wide_scale` (template, its centre offset)."""
    th, tw = tele_shape
    k = wide_scale / zoom  # template pixels per telephoto pixel
    s = abs(np.sin(np.deg2rad(roll_deg)))
    big_w, big_h = tw * k, th * k
    a = int(big_w - big_h * s - 2)
    b = int(big_h - big_w * s - 2)
    if a < 8 or b < 8:
        return None
    src, lv = _tele_at(tele_levels, k)
    ang = np.deg2rad(roll_deg)
    # template pixel p -> telephoto pixel u = t + R(-roll)·(p - pc)/k
    rinv = np.array([[np.cos(ang), np.sin(ang)], [-np.sin(ang), np.cos(ang)]]) / k
    pc = np.array([(a - 1) / 2, (b - 1) / 2])
    t = np.array([(tw - 1) / 2, (th - 1) / 2])
    m = np.eye(3)
    m[:2, :2] = rinv
    m[:2, 2] = t - rinv @ pc
    m = lv.down @ m  # -> telephoto level pixels
    tmpl = cv2.warpAffine(
        src, m[:2], (a, b), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip
    return tmpl, pc


def _subpixel(c: np.ndarray, iy: int, ix: int) -> tuple[float, float]:
    def sub(m, p, q):
        den = m - 2 * p + q
        return 0.5 * (m - q) / den if den < -1e-9 else 0.0

    dx = sub(c[iy, ix - 1], c[iy, ix], c[iy, ix + 1]) if 0 < ix < c.shape[1] - 1 else 0.0
    dy = sub(c[iy - 1, ix], c[iy, ix], c[iy + 1, ix]) if 0 < iy < c.shape[0] - 1 else 0.0
    return float(np.clip(dx, -0.5, 0.5)), float(np.clip(dy, -0.5, 0.5))


def _sweep(wide_lv: Level, tele_levels, tele_shape, zooms, rolls, around=None, radius=4):
    """[(score, zoom, roll, centre in full-resolution wide pixels)] for every (zoom, roll)."""
    s = wide_lv.scale
    img = wide_lv.image
    out = []
    for z in zooms:
        for r in rolls:
            made = _template(tele_levels, tele_shape, z, r, s)
            if made is None:
                continue
            tmpl, pc = made
            b, a = tmpl.shape
            if a >= img.shape[1] or b >= img.shape[0]:
                continue
            ox = oy = 0
            search = img
            if around is not None:  # only near the predicted centre
                cx, cy = (around[0] + 0.5) * s - 0.5, (around[1] + 0.5) * s - 0.5
                ox = int(np.clip(round(cx - pc[0]) - radius, 0, img.shape[1] - a))
                oy = int(np.clip(round(cy - pc[1]) - radius, 0, img.shape[0] - b))
                search = img[oy : oy + b + 2 * radius, ox : ox + a + 2 * radius]
                if search.shape[0] < b or search.shape[1] < a:
                    continue
            c = cv2.matchTemplate(search, tmpl, cv2.TM_CCOEFF_NORMED)
            iy, ix = np.unravel_index(int(np.argmax(c)), c.shape)
            dx, dy = _subpixel(c, iy, ix)
            x = ox + ix + dx + pc[0]
            y = oy + iy + dy + pc[1]
            out.append((float(c[iy, ix]), z, r, ((x + 0.5) / s - 0.5, (y + 0.5) / s - 0.5)))
    return out


def _distinct(found, k, min_dist):
    found = sorted(found, key=lambda f: -f[0])
    keep = []
    for f in found:
        if all(np.hypot(f[3][0] - g[3][0], f[3][1] - g[3][1]) > min_dist for g in keep):
            keep.append(f)
        if len(keep) == k:
            break
    return keep


def _ecc(wide_lv: Level, tele_levels, tele_shape, h_full, zoom, motion, iters):
    """One ECC refinement of h_full at `wide_lv`'s scale; None when ECC fails or diverges."""
    s = wide_lv.scale
    density = s / zoom
    src, tlv = _tele_at(tele_levels, density)
    tmpl, t_down = downscale(src, min(1.0, density / tlv.scale))
    t_down = t_down @ tlv.down
    h_lv = wide_lv.down @ h_full @ np.linalg.inv(t_down)
    th, tw = tmpl.shape
    mb = max(2, int(0.03 * min(th, tw)))
    mask = np.zeros((th, tw), np.uint8)
    mask[mb:-mb, mb:-mb] = 1
    # where the warped wide exists (a footprint at the frame's edge)
    inside = cv2.warpPerspective(
        np.ones(wide_lv.image.shape, np.uint8), h_lv, (tw, th),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
    )  # fmt: skip
    mask &= inside
    if mask.mean() < 0.3:
        return None
    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iters, 1e-5)
    warp = (h_lv / h_lv[2, 2]).astype(np.float32)
    if motion != cv2.MOTION_HOMOGRAPHY:
        warp = warp[:2].copy()
    try:
        _, warp = cv2.findTransformECCWithMask(
            tmpl, wide_lv.image, mask, None, warp, motion, crit, 3
        )
    except (cv2.error, AttributeError):
        try:
            _, warp = cv2.findTransformECC(tmpl, wide_lv.image, warp, motion, crit, mask, 3)
        except cv2.error:
            return None
    h_new = np.vstack([warp, [0, 0, 1]]) if warp.shape[0] == 2 else warp
    h_new = np.linalg.inv(wide_lv.down) @ h_new.astype(np.float64) @ t_down
    if not np.all(np.isfinite(h_new)):
        return None
    # ECC that ran off by more than a few pixels of its level has lost the image
    c_old = cv2.perspectiveTransform(np.float64([[[0, 0], [tele_shape[1], tele_shape[0]]]]), h_full)
    c_new = cv2.perspectiveTransform(np.float64([[[0, 0], [tele_shape[1], tele_shape[0]]]]), h_new)
    if np.abs(c_new - c_old).max() * s > 6.0:
        return None
    return h_new


def search_hypotheses(
    wide_levels: list[Level],
    tele_levels: list[Level],
    tele_shape: tuple[int, int],
    zoom_range: tuple[float, float],
    max_roll_deg: float,
    finest_scale: float,
) -> list[np.ndarray]:
    """Full-resolution telephoto → wide homographies, best first, from the intensity search,
    each refined by ECC up to the level at `finest_scale` (the working resolution)."""
    coarse = next((lv for lv in wide_levels if max(lv.image.shape) <= COARSE_SIDE), wide_levels[-1])
    n_zoom = max(2, int(np.ceil(np.log(zoom_range[1] / zoom_range[0]) / ZOOM_STEP)) + 1)
    zooms = np.geomspace(zoom_range[0], zoom_range[1], n_zoom)
    roll_max = min(max_roll_deg, ROLL_SWEEP)
    rolls = np.arange(-roll_max, roll_max + 1e-6, ROLL_STEP)
    found = _sweep(coarse, tele_levels, tele_shape, zooms, rolls)
    if not found:
        return []
    top = _distinct(found, HYPOTHESES, 4.0 / coarse.scale)
    idx = next(i for i, lv in enumerate(wide_levels) if lv is coarse)
    finer = wide_levels[max(idx - 1, 0)]
    out = []
    for _, z, r, c in top:
        zs = z * np.exp(np.arange(-2, 3) * ZOOM_STEP / 3)
        rs = r + np.arange(-2, 3) * ROLL_STEP / 3
        local = _sweep(finer, tele_levels, tele_shape, zs, rs, around=c)
        _, z, r, c = max(local, key=lambda f: f[0]) if local else (0, z, r, c)
        h = similarity(tele_shape, z, r, c)
        # affine ECC level by level below the working resolution, where the caller's homography
        # ECC (colour-matched) takes over
        for lv in reversed(wide_levels[: max(idx - 1, 0) + 1]):
            if lv.scale >= finest_scale * 0.99:
                break
            refined = _ecc(lv, tele_levels, tele_shape, h, z, cv2.MOTION_AFFINE, 40)
            if refined is None:
                break
            h = refined
        out.append(h / h[2, 2])
    return out
