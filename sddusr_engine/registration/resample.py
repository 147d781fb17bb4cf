"""Resampling the telephoto onto the 2×LRC grid: the centre box, the Ref, its dense refinement."""

from __future__ import annotations

import cv2
import numpy as np

from ..io import as_rgb_array
from .colour import apply_colour, colour_match
from .common import NOT_FOUND, Footprint, FootprintNotFoundError, float_rgb, gray_u8


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
                f"{NOT_FOUND}: the footprint is too small for a centre box."
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
    up = cv2.resize(float_rgb(lrc), (w, h), interpolation=cv2.INTER_CUBIC)
    g_lrc = gray_u8(np.clip(up, 0.0, 1.0))
    g_ref = gray_u8(cv2.GaussianBlur(float_rgb(ref), (0, 0), 1.0))
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


RESAMPLE_STEPS = 3


def resample_reference(
    wide: np.ndarray,
    tele: np.ndarray,
    footprint: Footprint,
    box: tuple[int, int, int, int],
    refine: bool = True,
    return_refinement: bool = False,
    tick=None,
):
    """The telephoto resampled onto the 2×LRC grid of `box` (wide pixels, (y0, y1, x0, x1)) and
    colour-matched to wide[box]: (ref in the wide's dtype, the 3×4 colour matrix), plus the
    dense refinement field (or None) with `return_refinement`.

    The one Ref the network sees, at inference (`align_reference`) and in the training pairs
    (`data.make_pair`), so that both are aligned the same way. With `refine`, a smooth dense
    correction (`dense_refinement`) is measured on the homography's result and the telephoto is
    resampled once more through both, from the original pixels (one interpolation, not two).
    `tick()`, when given, is called after each of its `RESAMPLE_STEPS` steps (the warp and colour
    match, the refinement's measurement, the second resampling), so that a long one shows progress.
    """
    tick = tick or (lambda: None)
    lr = as_rgb_array(wide)
    y0, y1, x0, x1 = box
    tele_rgb = float_rgb(tele)
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
    lrc01 = float_rgb(lr[y0:y1, x0:x1])
    ref, colour = colour_match(ref, lrc01)
    tick()
    field = dense_refinement(lrc01, ref) if refine else None
    tick()
    if field is not None:
        # float32 is exact to ~1e-3 px at these coordinates and halves the memory of a
        # CameraFusion-sized Ref's maps
        v, u = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
        pts = np.stack([u + field[..., 0], v + field[..., 1], np.ones_like(u)], axis=-1)
        q = pts @ to_tele.T.astype(np.float32)
        q = q[..., :2] / q[..., 2:]
        ref = cv2.remap(src, q[..., 0], q[..., 1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        ref = apply_colour(ref, colour)
    tick()
    if lr.dtype == np.uint8:
        ref = np.rint(ref * 255.0).astype(np.uint8)
    elif lr.dtype == np.uint16:
        ref = np.rint(ref * 65535.0).astype(np.uint16)
    return (ref, colour, field) if return_refinement else (ref, colour)
