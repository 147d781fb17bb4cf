"""Synthetic dual-lens pairs with known geometry, made from one high-resolution image.

Geometry (all coordinates are pixel centres, x right, y down):

- The wide image is `hr_image` downscaled by `s = W_hr / w_wide` (area interpolation), so wide pixel
  x_w sits at HR x = s·(x_w + 0.5) − 0.5.
- The telephoto has the wide's pixel count (one sensor size for both lenses) and sees the wide
  scene at `zoom` times its pixel density, rotated by `rotation_deg`, centred at the wide's centre
  plus `offset = (dx, dy)` wide pixels. Telephoto pixel (u, v) maps to wide pixel

      [x, y] = c + R(θ) · ([u, v] − t) / zoom,   t = ((w_t − 1)/2, (h_t − 1)/2),

  i.e. `H_true = T(c) · R(θ)/zoom · T(−t)`, the 3×3 homography returned with the pair.
- The telephoto is then blurred slightly (its own optics), multiplied by per-channel `gain`
  (exposure and white balance), optionally shifted by a smooth zero-mean displacement field of up to
  `parallax_px` wide pixels (mild parallax, which no homography explains), and given light noise.

`s` must be at least `zoom` so that the telephoto is never upsampled from the HR image.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["make_synthetic_pair", "procedural_image", "true_homography"]


def true_homography(
    tele_shape: tuple[int, int],
    wide_shape: tuple[int, int],
    zoom: float,
    rotation_deg: float,
    offset: tuple[float, float],
) -> np.ndarray:
    """The telephoto→wide homography of the model above (shapes are (H, W))."""
    th, tw = tele_shape[:2]
    wh, ww = wide_shape[:2]
    c = np.array([(ww - 1) / 2 + offset[0], (wh - 1) / 2 + offset[1]])
    a = np.deg2rad(rotation_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) / zoom
    t = np.array([(tw - 1) / 2, (th - 1) / 2])
    h = np.eye(3)
    h[:2, :2] = r
    h[:2, 2] = c - r @ t
    return h


def _smooth_field(shape: tuple[int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth zero-mean 2-channel displacement field whose largest magnitude is `amplitude`."""
    h, w = shape
    coarse = rng.standard_normal((4, 5, 2)).astype(np.float32)
    f = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    f -= f.reshape(-1, 2).mean(0)
    mag = float(np.sqrt((f**2).sum(-1)).max())
    return f * (amplitude / max(mag, 1e-9))


def make_synthetic_pair(
    hr_image: np.ndarray,
    zoom: float = 2.0,
    rotation_deg: float = 0.0,
    offset: tuple[float, float] = (0.0, 0.0),
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0),
    parallax_px: float = 0.0,
    rng: np.random.Generator | None = None,
    *,
    wide_shape: tuple[int, int] | None = None,
    tele_shape: tuple[int, int] | None = None,
    blur_sigma: float = 0.5,
    noise_sigma: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wide, tele, H_true) from one RGB image; H_true maps telephoto to wide pixel coordinates.

    `wide_shape` defaults to the HR size divided by 2.5; `tele_shape` defaults to `wide_shape`.
    `blur_sigma` is the telephoto's optical blur and `noise_sigma` its noise, both in telephoto
    pixels and 8-bit levels. Output dtype is the input's (uint8 or uint16; float stays float).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    hr = np.asarray(hr_image)
    if hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"hr_image must be H×W×3, got shape {hr.shape}")
    H0, W0 = hr.shape[:2]
    if wide_shape is None:
        wide_shape = (int(round(H0 / 2.5)), int(round(W0 / 2.5)))
    wh, ww = wide_shape
    tele_shape = wide_shape if tele_shape is None else tele_shape
    th, tw = tele_shape
    sx, sy = W0 / ww, H0 / wh
    if abs(sx - sy) > 0.01 * sx:
        raise ValueError(
            f"wide_shape {wide_shape} does not have the HR image's aspect {hr.shape[:2]}"
        )
    s = (sx + sy) / 2
    if s < zoom * 0.999:
        raise ValueError(f"HR image too small: its density is {s:.2f}× the wide's, zoom is {zoom}")
    peak = 255.0 if hr.dtype == np.uint8 else 65535.0 if hr.dtype == np.uint16 else 1.0
    hrf = hr.astype(np.float32)

    wide = cv2.resize(hrf, (ww, wh), interpolation=cv2.INTER_AREA)

    h_true = true_homography(tele_shape, wide_shape, zoom, rotation_deg, offset)
    a_hw = np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1.0]])
    m = a_hw @ h_true  # telephoto pixel -> HR pixel
    step = s / zoom  # HR pixels per telephoto pixel
    src = hrf
    if step > 1.05:  # anti-alias before sampling the HR image more coarsely
        src = cv2.GaussianBlur(hrf, (0, 0), 0.5 * np.sqrt(step**2 - 1))
    u, v = np.meshgrid(np.arange(tw, dtype=np.float64), np.arange(th, dtype=np.float64))
    den = m[2, 0] * u + m[2, 1] * v + m[2, 2]
    mx = (m[0, 0] * u + m[0, 1] * v + m[0, 2]) / den
    my = (m[1, 0] * u + m[1, 1] * v + m[1, 2]) / den
    if parallax_px > 0:
        d = _smooth_field((th, tw), parallax_px, rng) * s  # wide pixels -> HR pixels
        mx += d[..., 0]
        my += d[..., 1]
    tele = cv2.remap(
        src,
        mx.astype(np.float32),
        my.astype(np.float32),
        cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT,
    )
    if blur_sigma > 0:
        tele = cv2.GaussianBlur(tele, (0, 0), blur_sigma)
    tele = tele * np.asarray(gain, np.float32)[None, None, :]
    if noise_sigma > 0:
        tele = tele + rng.standard_normal(tele.shape).astype(np.float32) * (
            noise_sigma * peak / 255
        )

    def _cast(a: np.ndarray) -> np.ndarray:
        a = np.clip(a, 0, peak)
        return np.rint(a).astype(hr.dtype) if peak > 1 else a.astype(hr.dtype)

    return _cast(wide), _cast(tele), h_true


def procedural_image(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A uint8 RGB test scene: 1/f coloured noise with random shapes and lines (edges, corners)."""
    h, w = shape
    img = np.zeros((h, w, 3), np.float32)
    for octave in range(2, 8):
        gh, gw = max(2, h >> (9 - octave)), max(2, w >> (9 - octave))
        layer = rng.standard_normal((gh, gw, 3)).astype(np.float32)
        img += cv2.resize(layer, (w, h), interpolation=cv2.INTER_CUBIC) * (0.7**octave) * 60
    img = img - img.mean() + 120
    canvas = np.clip(img, 0, 255).astype(np.uint8)
    n = int(h * w / 6000)
    for _ in range(n):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.integers(max(3, w // 200), max(4, w // 25)))
        if kind == 0:
            cv2.circle(canvas, (x, y), size, colour, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(canvas, (x, y), (x + size, y + int(size * 0.7)), colour, -1, cv2.LINE_AA)
        else:
            x2, y2 = x + int(rng.integers(-4, 5)) * size, y + int(rng.integers(-4, 5)) * size
            cv2.line(canvas, (x, y), (x2, y2), colour, max(1, size // 6), cv2.LINE_AA)
    return cv2.GaussianBlur(canvas, (0, 0), 0.8)
