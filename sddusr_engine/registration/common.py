"""The registration's shared vocabulary: the `Footprint` and `AlignedPair` results, image
conversions and downscaling, pixel-centre scale maps, and a footprint's geometry (corners, zoom,
roll, plausibility checks)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import FootprintNotFoundError
from ..io import as_rgb_array

NOT_FOUND = "the telephoto image could not be found in the wide image"


@dataclass(frozen=True)
class Footprint:
    """Where the telephoto lies in the wide image.

    homography: 3×3 float64, telephoto pixel → wide pixel.
    confidence: in [0, 1], from the photometric verification (`registration.verify`): 0.5 or
        more means the corners were checked to about 0.6 wide pixels; `register` returns nothing
        less than 0.5. A footprint made from a known homography carries the caller's value.
    inliers / matches: RANSAC inliers among the ratio-test matches (0 when the intensity search
        found the telephoto).
    corners: 4×2 float64, the telephoto's outer corners TL, TR, BR, BL in wide pixels.
    zoom: sqrt(telephoto area / footprint area). rotation_deg: angle of the footprint's top edge
        in the wide image, in degrees; positive turns clockwise on screen (y points down).
    tele_shape: (H, W) of the telephoto the homography refers to. refined: ECC succeeded.
    method: "features" (SIFT + MAGSAC) or "intensity search" (the zoom and roll sweep).
    corner_error_px: the verification's bound on the corner error, in wide pixels (nan: not
        verified). zoom_prior: the zoom the EXIF focal lengths implied (None: none used).
    notes: what the registration did that a user may want to know, in sentences.
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
    method: str = "features"
    corner_error_px: float = float("nan")
    zoom_prior: float | None = None
    notes: str = ""


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


def float_rgb(img: np.ndarray) -> np.ndarray:
    a = as_rgb_array(img)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    return a.astype(np.float32)


def gray_u8(rgb01: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(rgb01, cv2.COLOR_RGB2GRAY)
    lo, hi = np.percentile(g, (0.5, 99.5))
    g = (g - lo) / max(hi - lo, 1e-6)
    return np.clip(g * 255.0 + 0.5, 0, 255).astype(np.uint8)


def half(img: np.ndarray) -> np.ndarray:
    # Exact 2×2 block means on even sizes (Ref → LRC grid).
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)


def scale_matrix(sx: float, sy: float | None = None) -> np.ndarray:
    # Pixel-centre convention of cv2.resize: x_small = (x + 0.5)·s − 0.5.
    sy = sx if sy is None else sy
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def resize_to(img: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(resized image, its full→small pixel map) for a downscale by `scale` (≤ 1)."""
    h, w = img.shape[:2]
    if scale >= 1.0:
        return img, np.eye(3)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out, scale_matrix(nw / w, nh / h)


def footprint_corners(h: np.ndarray, tele_shape: tuple[int, int]) -> np.ndarray:
    th, tw = tele_shape
    c = np.array([[-0.5, -0.5], [tw - 0.5, -0.5], [tw - 0.5, th - 0.5], [-0.5, th - 0.5]])
    return cv2.perspectiveTransform(c[None].astype(np.float64), h)[0]


def zoom_rotation(corners: np.ndarray, tele_shape: tuple[int, int]) -> tuple[float, float]:
    area = abs(cv2.contourArea(corners.astype(np.float32)))
    zoom = float(np.sqrt(tele_shape[0] * tele_shape[1] / max(area, 1e-9)))
    top = corners[1] - corners[0]
    return zoom, float(np.degrees(np.arctan2(top[1], top[0])))


def footprint_from_homography(
    h: np.ndarray,
    tele_shape: tuple[int, int],
    *,
    confidence: float = 0.0,
    inliers: int = 0,
    matches: int = 0,
    refined: bool = False,
    **details,
) -> Footprint:
    """A `Footprint` for a known telephoto → wide homography (corners, zoom and roll derived)."""
    h = np.asarray(h, np.float64)
    h = h / h[2, 2]
    corners = footprint_corners(h, tele_shape)
    zoom, rot = zoom_rotation(corners, tele_shape)
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
        **details,
    )


def check_geometry(h, tele_shape, wide_shape, zoom_range, max_rotation_deg) -> None:
    corners = footprint_corners(h, tele_shape)
    if not np.all(np.isfinite(corners)) or not cv2.isContourConvex(corners.astype(np.float32)):
        raise FootprintNotFoundError(
            f"{NOT_FOUND}: the feature matches imply a twisted footprint; "
            "check that the two photos show the same scene."
        )
    zoom, rot = zoom_rotation(corners, tele_shape)
    if not zoom_range[0] <= zoom <= zoom_range[1]:
        raise FootprintNotFoundError(
            f"{NOT_FOUND}: the matches imply a zoom of x{zoom:.2f}, outside the plausible "
            f"x{zoom_range[0]:.2f}-x{zoom_range[1]:.2f}; check that the second photo is the "
            "telephoto of the same shot."
        )
    if abs(rot) > max_rotation_deg:
        raise FootprintNotFoundError(
            f"{NOT_FOUND}: the matches imply a rotation of {rot:.1f} degrees (at most "
            f"{max_rotation_deg:g} expected); check that the two photos were taken together."
        )
    # Opposite edges of a real footprint are nearly parallel and of equal length.
    e = np.linalg.norm(np.roll(corners, -1, 0) - corners, axis=1)
    if max(e[0] / e[2], e[2] / e[0], e[1] / e[3], e[3] / e[1]) > 1.15:
        raise FootprintNotFoundError(
            f"{NOT_FOUND}: the matches imply a strongly skewed footprint; "
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
            f"{NOT_FOUND}: the matched footprint extends outside the wide frame; "
            "check that the telephoto was taken with this wide photo."
        )
