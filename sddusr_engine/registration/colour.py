"""Colour matching of the telephoto to the wide image: a ridged, trimmed least-squares 3×4 map."""

from __future__ import annotations

import cv2
import numpy as np

from .common import half

# Ridge of the colour map's 3×3 toward the identity, as a variance per pixel: a colour direction
# whose spread in the picture is under about sqrt(3e-5) ≈ 0.005 (1.4 grey levels) keeps gain 1.
COLOUR_RIDGE = 3e-5


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


def apply_colour(rgb01: np.ndarray, m: np.ndarray) -> np.ndarray:
    out = rgb01.reshape(-1, 3) @ m[:, :3].T.astype(np.float32) + m[:, 3].astype(np.float32)
    return np.clip(out, 0, 1).reshape(rgb01.shape).astype(np.float32)


def colour_match(ref01: np.ndarray, lrc01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Ref on the 2×LRC grid (float RGB in [0, 1]) mapped to LRC's colours: (ref, 3×4 matrix).

    The fit runs on low-passed images: the telephoto's extra detail is noise in the regressor
    and would bias the gains toward zero (errors-in-variables).
    """
    colour = fit_colour_transform(
        cv2.GaussianBlur(half(ref01), (0, 0), 1.5), cv2.GaussianBlur(lrc01, (0, 0), 1.5)
    )
    return apply_colour(ref01, colour), colour
