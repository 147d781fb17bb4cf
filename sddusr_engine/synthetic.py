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

Scenes where features fail (`scene_image`): a sky gradient with a kite, soft clouds, periodic
tiles, stripes, rows of identical circles; `camera_pair` adds what a phone adds to a pair: low
exposure, sensor noise in both photos, the telephoto's own gamma.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "SCENES",
    "camera_pair",
    "make_synthetic_pair",
    "procedural_image",
    "scene_image",
    "true_homography",
]


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


SCENES = ("sky_kite", "clouds", "tiles", "stripes", "circles")


def _sky(h: int, w: int) -> np.ndarray:
    """A clear sky: deep blue at the top to pale near the horizon, a little lighter to one side."""
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    top, low = np.float32([40, 95, 190]), np.float32([175, 205, 235])
    return top + (low - top) * y**0.8 + 12.0 * x


def _soft_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1] with about `cells` blobs across the width."""
    gh, gw = max(2, round(cells * h / w)), cells
    n = cv2.resize(rng.random((gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    n = cv2.GaussianBlur(n, (0, 0), w / cells / 3)
    return (n - n.min()) / max(float(np.ptp(n)), 1e-6)


def scene_image(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A uint8 RGB scene of one of `SCENES` kinds, `shape` (H, W), for registration tests.

    - sky_kite: the sky gradient and one small kite (about 4 % of the width) with its tail.
    - clouds: the sky with soft, low-contrast clouds and nothing sharp.
    - tiles: square tiles with grout, each tile's colour a little different (real tiles are),
      under a lighting gradient.
    - stripes: vertical stripes of one period across the whole frame under a lighting gradient:
      along x the scene repeats exactly, which no registration can resolve.
    - circles: rows of identical cups seen from above (circles with a rim), their places jittered
      by a few per cent of the spacing, on a table with a lighting gradient.
    """
    h, w = shape
    if kind in ("sky_kite", "clouds"):
        img = _sky(h, w)
        if kind == "clouds":
            c = _soft_noise(h, w, 6, rng)
            img += (np.clip(c - 0.45, 0, 1) / 0.55)[..., None] * np.float32([55, 45, 25])
        else:
            s = 0.04 * w
            cx, cy = w * rng.uniform(0.42, 0.58), h * rng.uniform(0.4, 0.55)
            a = rng.uniform(-0.4, 0.4)
            pts = np.array([[0, -1.0], [0.6, 0], [0, 1.6], [-0.6, 0]]) * s
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            poly = (pts @ rot.T + [cx, cy]).astype(np.int32)
            tail = [(cx + rot[0, 1] * 1.6 * s, cy + rot[1, 1] * 1.6 * s)]
            for _ in range(6):
                tail.append((tail[-1][0] + rng.uniform(-0.4, 0.4) * s, tail[-1][1] + 0.5 * s))
            img = np.clip(img, 0, 255).astype(np.uint8)
            cv2.fillConvexPoly(img, poly, (220, 40, 40), cv2.LINE_AA)
            cv2.line(img, tuple(poly[0]), tuple(poly[2]), (250, 220, 40), max(1, int(s / 8)))
            cv2.polylines(img, [np.int32(tail)], False, (60, 50, 50), max(1, int(s / 12)))
        return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (0, 0), 0.8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = (0.75 + 0.35 * (xx / w) * (1 - 0.4 * yy / h))[..., None]
    if kind == "tiles":
        p = w / 14.0
        base = np.float32([200, 195, 185]) * (
            1 + rng.uniform(-0.05, 0.05, (h // int(p) + 2, 15, 3))
        )
        iy, ix = (yy // p).astype(int), (xx // p).astype(int)
        img = base[iy, ix]
        grout = ((yy % p) < 0.08 * p) | ((xx % p) < 0.08 * p)
        img[grout] = (120, 115, 110)
        img = img * light
    elif kind == "stripes":
        p = w / 18.0
        t = 0.5 + 0.5 * np.tanh(4 * np.cos(2 * np.pi * xx / p))
        img = (np.float32([60, 70, 140]) + t[..., None] * np.float32([160, 150, 90])) * light
    elif kind == "circles":
        img = np.float32([150, 120, 90]) * light * np.ones((h, w, 3), np.float32)
        img = np.clip(img, 0, 255).astype(np.uint8)
        p = w / 12.0
        for gy in range(int(h / p) + 1):
            for gx in range(13):
                x = (gx + 0.5) * p + rng.uniform(-0.04, 0.04) * p
                y = (gy + 0.5) * p + rng.uniform(-0.04, 0.04) * p
                r = 0.36 * p
                cv2.circle(img, (int(x * 16), int(y * 16)), int(r * 16), (235, 235, 230), -1,
                           cv2.LINE_AA, 4)  # fmt: skip
                cv2.circle(img, (int(x * 16), int(y * 16)), int(0.75 * r * 16), (90, 60, 40), -1,
                           cv2.LINE_AA, 4)  # fmt: skip
        img = img.astype(np.float32) * (0.85 + 0.15 * light)
    else:
        raise ValueError(f"unknown scene {kind!r}; one of {SCENES}")
    return cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (0, 0), 0.8)


def camera_pair(
    hr_image: np.ndarray,
    zoom: float,
    rotation_deg: float,
    offset: tuple[float, float],
    rng: np.random.Generator,
    *,
    wide_shape: tuple[int, int],
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0),
    gamma: float = 1.0,
    exposure: float = 1.0,
    noise: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wide, tele, H_true) as `make_synthetic_pair` makes them, with a phone's imperfections:
    the scene's light scaled by `exposure` before capture, Gaussian sensor noise of `noise` 8-bit
    levels in the wide and 1.5× that in the telephoto (smaller pixels), and the telephoto's tone
    curve raised to 1/`gamma` (another processing pipeline). uint8 in and out."""
    hr = np.asarray(hr_image)
    if exposure != 1.0:
        hr = np.clip(hr.astype(np.float32) * exposure + 0.5, 0, 255).astype(np.uint8)
    wide, tele, h_true = make_synthetic_pair(
        hr, zoom, rotation_deg, offset, gain, 0.0, rng, wide_shape=wide_shape
    )
    tele = tele.astype(np.float32)
    if gamma != 1.0:
        tele = 255.0 * (tele / 255.0) ** (1.0 / gamma)
    wide = wide.astype(np.float32)
    if noise > 0:
        wide += rng.normal(0, noise, wide.shape).astype(np.float32)
        tele += rng.normal(0, 1.5 * noise, tele.shape).astype(np.float32)
    return (
        np.clip(wide + 0.5, 0, 255).astype(np.uint8),
        np.clip(tele + 0.5, 0, 255).astype(np.uint8),
        h_true,
    )
