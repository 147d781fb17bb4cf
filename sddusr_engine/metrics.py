"""PSNR and SSIM as the dual-lens SR papers report them (DESIGN section 1), full / center / corner.

Conventions, chosen to reproduce KeDuSR's evaluation code (`crop_psnr.py`, BasicSR-derived):

- Inputs are H×W×3 RGB. Floats are taken as already in [0, 255] (SR output is not rounded: KeDuSR
  evaluates float output); uint8 is used as is; uint16 is divided by 257. Everything is computed
  in float64. No border is shaved.
- PSNR = 10·log10(255² / MSE), MSE over all pixels and channels; `inf` when MSE is 0.
- SSIM: Gaussian window 11×11, σ 1.5, K1 0.01, K2 0.03, L 255, per channel, "valid" filtering (the
  map is (H−10)×(W−10); map pixel (i, j) is centred on image pixel (i+5, j+5)); the mean of the map,
  averaged over the three channels.
- Regions: the center box (y0, y1, x0, x1) is in the images' own (HR) pixels; the corner region is
  everything outside it. PSNR pools squared errors by area: MSE over the center pixels, and MSE over
  the corner pixels. SSIM pools the SSIM map by area: its mean over the center, and over the rest.
  KeDuSR indexes the *valid* SSIM map with the box directly, which shifts the region 5 pixels up and
  left of the box; `kedusr_compat=True` (the default) reproduces that, so numbers compare with
  published ones, and `kedusr_compat=False` offsets the box by the 5-pixel margin so that each map
  value counts in the region that holds its window's centre.

`psnr_tensor` is the same PSNR on [0, 1] float tensors (training's validation and the benchmarks):
the first argument (a network's output) is clamped to [0, 1], both are scaled to [0, 255] in
float64, and an optional boolean mask picks the pixels the squared error is averaged over.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "psnr_tensor", "region_metrics", "ssim", "ssim_map"]

_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2
_WIN = 11
_HALF = _WIN // 2


def _as_255(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.uint16:
        a = a.astype(np.float64) / 257.0
    elif a.dtype == np.uint8 or np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    else:
        raise ValueError(
            f"{name}: dtype {a.dtype} is not supported (uint8, uint16 or float in [0, 255])"
        )
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"{name}: shape {a.shape} is not H×W×C")
    return a


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_255(a, "first image"), _as_255(b, "second image")
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return a, b


def _psnr_from_mse(mse: float) -> float:
    return math.inf if mse == 0 else float(10.0 * math.log10(255.0 * 255.0 / mse))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over all pixels and channels, peak 255 (float inputs are in [0, 255])."""
    a, b = _pair(a, b)
    return _psnr_from_mse(float(np.mean((a - b) ** 2)))


def psnr_tensor(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of image tensors in [0, 1] (same shape), peak 255, `a` clamped to [0, 1] first.

    `mask`: a boolean tensor that broadcasts to the images' shape (e.g. [1, 1, H, W]); the MSE is
    then taken over the pixels where it is True (all channels). `inf` when the MSE is 0.
    """
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = a.detach().clamp(0, 1).double() * 255, b.detach().double() * 255
    if mask is None:
        mse = F.mse_loss(x, y).item()
    else:
        m = mask.to(device=x.device, dtype=torch.bool).expand_as(x)
        if not m.any():
            return math.nan
        mse = (x - y).square()[m].mean().item()
    return _psnr_from_mse(mse)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel SSIM map, shape (H−10, W−10, C): valid Gaussian filtering, no padding used."""
    a, b = _pair(a, b)
    h, w = a.shape[:2]
    if h < _WIN or w < _WIN:
        raise ValueError(f"SSIM needs images of at least {_WIN}×{_WIN}, got {h}×{w}")
    g = cv2.getGaussianKernel(_WIN, 1.5)
    win = g @ g.T

    def blur(x: np.ndarray) -> np.ndarray:
        # Border handling never reaches the kept "valid" part.
        return cv2.filter2D(x, cv2.CV_64F, win)[_HALF:-_HALF, _HALF:-_HALF]

    out = np.empty((h - 2 * _HALF, w - 2 * _HALF, a.shape[2]))
    for c in range(a.shape[2]):
        x, y = np.ascontiguousarray(a[..., c]), np.ascontiguousarray(b[..., c])
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cxy = blur(x * y) - mx * my
        out[..., c] = ((2 * mx * my + _C1) * (2 * cxy + _C2)) / (
            (mx * mx + my * my + _C1) * (vx + vy + _C2)
        )
    return out


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (11×11 Gaussian σ 1.5, L 255) per channel, averaged; float inputs are in [0, 255]."""
    return float(ssim_map(a, b).mean(axis=(0, 1)).mean())


def region_metrics(
    sr: np.ndarray,
    hr: np.ndarray,
    center_box: tuple[int, int, int, int],
    *,
    kedusr_compat: bool = True,
) -> dict[str, float]:
    """PSNR and SSIM for the full image, the center box (y0, y1, x0, x1) and the corner region.

    Returns {"psnr", "psnr_center", "psnr_corner", "ssim", "ssim_center", "ssim_corner"}; a
    region that is empty gives nan. See the module docstring for the pooling.
    """
    a, b = _pair(sr, hr)
    h, w = a.shape[:2]
    y0, y1, x0, x1 = (int(v) for v in center_box)
    if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
        raise ValueError(f"center box {center_box} does not lie inside the {h}×{w} image")

    se = ((a - b) ** 2).mean(axis=2)  # per-pixel squared error, averaged over channels
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True

    smap = ssim_map(a, b).mean(axis=2)  # channel mean: same pooling as per-channel then average
    mh, mw = smap.shape
    off = 0 if kedusr_compat else _HALF
    m_inside = np.zeros((mh, mw), bool)
    m_inside[max(y0 - off, 0) : max(y1 - off, 0), max(x0 - off, 0) : max(x1 - off, 0)] = True

    def mean_or_nan(v: np.ndarray, m: np.ndarray) -> float:
        return float(v[m].mean()) if m.any() else math.nan

    def psnr_or_nan(m: np.ndarray) -> float:
        return _psnr_from_mse(float(se[m].mean())) if m.any() else math.nan

    return {
        "psnr": _psnr_from_mse(float(se.mean())),
        "psnr_center": psnr_or_nan(inside),
        "psnr_corner": psnr_or_nan(~inside),
        "ssim": float(smap.mean()),
        "ssim_center": mean_or_nan(smap, m_inside),
        "ssim_corner": mean_or_nan(smap, ~m_inside),
    }
