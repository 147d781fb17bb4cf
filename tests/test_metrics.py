"""PSNR / SSIM against independent computations, and the full / center / corner pooling."""

import math

import numpy as np
import pytest
from scipy.signal import correlate2d

from sddusr_engine.metrics import psnr, region_metrics, ssim, ssim_map


def _img(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _ssim_direct(a, b):
    """SSIM written out: explicit Gaussian weights, valid positions only, channel mean."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()
    win = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for c in range(a.shape[2]):
        x, y = a[..., c], b[..., c]
        f = lambda z: correlate2d(z, win, mode="valid")
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
        out.append(m)
    return np.stack(out, -1)


def test_psnr_by_hand():
    a = np.zeros((8, 9, 3), np.uint8)
    b = np.full((8, 9, 3), 5, np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a, a) == math.inf
    x, y = _img(16, 20, 0), _img(16, 20, 1)
    mse = np.mean((x.astype(float) - y.astype(float)) ** 2)
    assert psnr(x, y) == pytest.approx(10 * math.log10(65025 / mse), rel=1e-12)


def test_input_types_agree():
    x, y = _img(20, 24, 2), _img(20, 24, 3)
    p, s = psnr(x, y), ssim(x, y)
    assert psnr(x.astype(np.float32), y.astype(np.float64)) == pytest.approx(p, rel=1e-6)
    x16, y16 = x.astype(np.uint16) * 257, y.astype(np.uint16) * 257
    assert psnr(x16, y16) == pytest.approx(p, rel=1e-12)
    assert ssim(x16, y16) == pytest.approx(s, rel=1e-12)
    # Float output is not rounded: half a level of error costs exactly that.
    assert psnr(x.astype(float) + 0.5, x) == pytest.approx(10 * math.log10(65025 / 0.25))


def test_ssim_identical_is_one_and_matches_direct_numpy():
    x, y = _img(19, 23, 4), _img(19, 23, 5)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    smooth = (x.astype(float) * 0.7 + 40).clip(0, 255)
    want = _ssim_direct(x, smooth)
    np.testing.assert_allclose(ssim_map(x, smooth), want, rtol=1e-9, atol=1e-12)
    assert ssim(x, smooth) == pytest.approx(want.mean(), rel=1e-9)
    assert ssim(x, y) == pytest.approx(_ssim_direct(x, y).mean(), rel=1e-9)
    assert ssim(x, y) < 0.2 < ssim(x, smooth) < 1.0
    assert ssim_map(x, y).shape == (9, 13, 3)


def test_region_metrics_pool_by_area():
    h, w = 40, 60
    hr = _img(h, w, 6)
    sr = hr.astype(np.float64).copy()
    box = (10, 30, 20, 44)
    sr[:5] += 4.0  # error only in the corner region
    out = region_metrics(sr, hr, box)
    assert out["psnr_center"] == math.inf
    corner_area = h * w - 20 * 24
    mse_corner = 5 * w * 16.0 / corner_area
    assert out["psnr_corner"] == pytest.approx(10 * math.log10(65025 / mse_corner))
    assert out["psnr"] == pytest.approx(10 * math.log10(65025 / (5 * w * 16.0 / (h * w))))

    noisy = (hr + np.random.default_rng(0).normal(0, 8, hr.shape)).clip(0, 255)
    out = region_metrics(noisy, hr, box)
    se = ((noisy - hr) ** 2).mean(2)
    m = np.zeros((h, w), bool)
    m[10:30, 20:44] = True
    assert out["psnr_center"] == pytest.approx(10 * math.log10(65025 / se[m].mean()))
    assert out["psnr_corner"] == pytest.approx(10 * math.log10(65025 / se[~m].mean()))
    assert out["psnr"] == pytest.approx(psnr(noisy, hr))
    assert out["ssim"] == pytest.approx(ssim(noisy, hr))

    # KeDuSR's pooling: the valid SSIM map indexed with the box as it is, per channel, averaged.
    smap = _ssim_direct(noisy, hr)
    mh, mw = smap.shape[:2]
    center = np.mean([smap[10:30, 20:44, c].mean() for c in range(3)])
    corner = np.mean(
        [(smap[..., c].sum() - smap[10:30, 20:44, c].sum()) / (mh * mw - 20 * 24) for c in range(3)]
    )
    assert out["ssim_center"] == pytest.approx(center, rel=1e-9)
    assert out["ssim_corner"] == pytest.approx(corner, rel=1e-9)

    # Centred pooling: map pixel (i, j) belongs to image pixel (i + 5, j + 5).
    out2 = region_metrics(noisy, hr, box, kedusr_compat=False)
    center2 = smap[5:25, 15:39].mean()
    assert out2["ssim_center"] == pytest.approx(center2, rel=1e-9)
    assert out2["psnr_center"] == out["psnr_center"]


def test_region_metrics_edge_cases():
    hr = _img(24, 30, 7)
    out = region_metrics(hr, hr, (0, 24, 0, 30))
    assert math.isnan(out["psnr_corner"]) and out["psnr_center"] == math.inf
    with pytest.raises(ValueError, match="inside"):
        region_metrics(hr, hr, (0, 30, 0, 30))
    with pytest.raises(ValueError, match="differ"):
        psnr(hr, hr[:-1])
    with pytest.raises(ValueError, match="at least"):
        ssim(hr[:8], hr[:8])


def test_psnr_tensor_is_the_same_psnr_on_unit_tensors():
    import torch

    from sddusr_engine.metrics import psnr_tensor

    x, y = _img(20, 24, 8), _img(20, 24, 9)
    tx, ty = (torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255 for a in (x, y))
    assert psnr_tensor(tx, ty) == pytest.approx(psnr(x, y), rel=1e-12)
    assert psnr_tensor(tx.float(), ty.float()) == pytest.approx(psnr(x, y), rel=1e-6)
    assert psnr_tensor(ty, ty) == math.inf
    # the first argument is a network's output: clamped to [0, 1] before the error
    over = tx.clone()
    over[..., :4, :] = 1.5
    clamped = over.clamp(0, 1).permute(0, 2, 3, 1)[0].numpy() * 255
    assert psnr_tensor(over, ty) == pytest.approx(psnr(clamped, y.astype(float)), rel=1e-12)
    # a mask pools the squared error over its pixels, as region_metrics' centre does
    box = (4, 14, 6, 18)
    mask = torch.zeros(1, 1, 20, 24, dtype=torch.bool)
    mask[..., 4:14, 6:18] = True
    want = region_metrics(x, y, box)
    assert psnr_tensor(tx, ty, mask) == pytest.approx(want["psnr_center"], rel=1e-12)
    assert psnr_tensor(tx, ty, ~mask) == pytest.approx(want["psnr_corner"], rel=1e-12)
    assert math.isnan(psnr_tensor(tx, ty, torch.zeros_like(mask)))
    with pytest.raises(ValueError, match="differ"):
        psnr_tensor(tx, ty[..., :-1])


def test_psnr_tensor_keeps_trainings_numbers():
    """The formula training's validation used (torch mean squared error on [0, 255] doubles)."""
    import torch
    import torch.nn.functional as F

    from sddusr_engine.metrics import psnr_tensor

    g = torch.Generator().manual_seed(0)
    sr = torch.rand(1, 3, 16, 18, generator=g) * 1.2 - 0.1
    hr = torch.rand(1, 3, 16, 18, generator=g)
    mse = F.mse_loss(sr.clamp(0, 1).double() * 255, hr.double() * 255).item()
    assert psnr_tensor(sr, hr) == 10 * math.log10(255.0**2 / mse)
