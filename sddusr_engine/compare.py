"""Pictures of a result: the side-by-side comparison image and the matching maps as images.

`comparison_image` puts a bicubic x2 of the wide photo (the telephoto's footprint and the centre
box drawn on it) beside the super-resolved one, for `sddusr demo`; `map_images` turns a run's kept
maps (`RunInfo.maps`) into 8-bit images for `sddusr sr --save-maps`. Arrays in, arrays out.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def bicubic_x2(img: np.ndarray) -> np.ndarray:
    """`img` enlarged twice by bicubic interpolation."""
    h, w = img.shape[:2]
    return cv2.resize(img, (2 * w, 2 * h), interpolation=cv2.INTER_CUBIC)


def to_u8(img: np.ndarray) -> np.ndarray:
    """A uint16 image rounded to uint8; a uint8 image as it is."""
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return img


def comparison_image(wide, sr, corners=None, box_lr=None) -> np.ndarray:
    """Side by side: bicubic x2 of `wide` (footprint polygon `corners`, in LR pixels, in yellow;
    centre box `box_lr` in cyan) | SR."""
    left = np.ascontiguousarray(to_u8(bicubic_x2(wide)))
    right = np.ascontiguousarray(to_u8(sr))
    thick = max(1, round(left.shape[1] / 400))
    if corners is not None:
        # LR pixel x -> 2x pixel 2x + 0.5 (pixel-centre convention); drawn with 4-bit sub-pixels
        pts = np.rint((2 * np.asarray(corners, float) + 0.5) * 16).astype(np.int32)
        cv2.polylines(left, [pts.reshape(-1, 1, 2)], True, (255, 220, 0), thick, cv2.LINE_AA, 4)
    if box_lr is not None:
        y0, y1, x0, x1 = (2 * int(v) for v in box_lr)
        cv2.rectangle(left, (x0, y0), (x1 - 1, y1 - 1), (0, 220, 255), thick)
    gap = np.full((left.shape[0], max(4, thick * 4), 3), 255, np.uint8)
    both = np.concatenate([left, gap, right], axis=1)
    scale = max(0.4, left.shape[1] / 900)
    for text, x in (("bicubic x2", 8), ("SR x2", left.shape[1] + gap.shape[1] + 8)):
        org = (x, int(24 * scale) + 4)
        cv2.putText(
            both, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3 * thick, cv2.LINE_AA
        )
        cv2.putText(
            both, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA
        )
    return both


def map_images(info, lr_shape) -> dict[str, Any]:
    """Figure-4 style images from info.maps, upsampled (nearest) to the LR size; mask_lrc to the
    size of the centre box `info.box_lr`."""
    maps = info.maps
    h, w = lr_shape[:2]

    def big(a):
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST)

    images: dict[str, Any] = {}
    for name in ("mask_lr", "mask_lrc"):
        if name in maps:
            m = (np.asarray(maps[name], np.float32) > 0.5).astype(np.uint8) * 255
            if name == "mask_lrc" and info.box_lr is not None:
                y0, y1, x0, x1 = info.box_lr
                images[name] = cv2.resize(m, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
            else:
                images[name] = big(m)
    if "confidence" in maps:
        c = np.clip(np.asarray(maps["confidence"], np.float32), 0, 1)
        images["confidence"] = big(np.rint(c * 255).astype(np.uint8))
    if "index" in maps:
        idx = np.asarray(maps["index"]).astype(np.int64)
        wk = int(np.asarray(maps.get("key_grid_width", 0)))
        if wk <= 0 and info.box_lr is not None:
            wk = max(1, (info.box_lr[3] - info.box_lr[2]) // 2)
        wk = max(wk, 1)
        valid = idx >= 0
        if info.box_lr is not None:
            hk = max(1, (info.box_lr[1] - info.box_lr[0]) // 2)
        else:
            hk = max(1, int(idx.max()) // wk + 1) if valid.any() else 1
        rgb = np.zeros((*idx.shape, 3), np.uint8)
        # red = matched key's x, green = its y across the LRC grid, blue = 128 where matched
        rgb[..., 0] = np.where(valid, np.rint(255 * (idx % wk) / max(wk - 1, 1)), 0)
        rgb[..., 1] = np.where(valid, np.rint(255 * (idx // wk) / max(hk - 1, 1)), 0)
        rgb[..., 2] = np.where(valid, 128, 0)
        images["index"] = big(rgb)
    return images
