"""Grey-level pyramids of a pair at the scales each registration step needs, with the pixel maps
between levels (pixel centres at integers, so a level at scale s maps x to (x + 0.5)·s − 0.5)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .common import resize_to as downscale  # (image, full -> small pixel map)

# Grey as the luma of the (gamma-encoded) RGB values, with no contrast stretch: NCC and ECC are
# invariant to gain and offset, and a stretch by percentiles would differ between the two photos.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def grey01(rgb: np.ndarray) -> np.ndarray:
    """A float32 grey image in [0, 1] from RGB uint8/uint16/float, computed in 8 or 16 bits first
    so that a 12 MP photo never exists as a float RGB copy (145 MB)."""
    a = np.asarray(rgb)
    if a.ndim == 2:
        g = a
    elif a.dtype in (np.uint8, np.uint16):
        g = cv2.cvtColor(np.ascontiguousarray(a[..., :3]), cv2.COLOR_RGB2GRAY)
    else:
        g = a[..., :3].astype(np.float32) @ _LUMA
    peak = 255.0 if g.dtype == np.uint8 else 65535.0 if g.dtype == np.uint16 else 1.0
    return g.astype(np.float32) * np.float32(1.0 / peak)


@dataclass
class Level:
    """One scale: `image` (float32 grey) and `down` (3×3, full-resolution pixel → this level)."""

    image: np.ndarray
    down: np.ndarray

    @property
    def scale(self) -> float:
        return float(self.down[0, 0])


def pyramid(grey: np.ndarray, min_side: int, base_scale: float = 1.0) -> list[Level]:
    """Levels at base_scale, base_scale/2, ... down to a short side of `min_side` pixels."""
    img, down = downscale(grey, base_scale)
    levels = [Level(img, down)]
    while min(levels[-1].image.shape[:2]) // 2 >= min_side:
        prev = levels[-1]
        small, d = downscale(prev.image, 0.5)
        levels.append(Level(small, d @ prev.down))
    return levels


def level_homography(
    h_full: np.ndarray, tele_down: np.ndarray, wide_down: np.ndarray
) -> np.ndarray:
    """A full-resolution telephoto → wide homography between two pyramid levels."""
    return wide_down @ h_full @ np.linalg.inv(tele_down)
