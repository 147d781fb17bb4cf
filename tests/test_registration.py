"""Registration: footprint accuracy on synthetic pairs with known geometry, failures, resampling."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sddusr_engine.io import read_image
from sddusr_engine.registration import (
    AlignedPair,
    Footprint,
    FootprintNotFoundError,
    _corners,
    align_reference,
    center_crop_box,
    estimate_footprint,
    register,
)
from sddusr_engine.synthetic import make_synthetic_pair, procedural_image, true_homography

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "sample"
WIDE = (400, 600)
GAIN = (1.3, 0.9, 0.8)


@pytest.fixture(scope="module")
def hr():
    return procedural_image((1000, 1500), np.random.default_rng(1))  # 2.5x the wide's density


# zoom, rotation, offset (dx, dy) in wide pixels, parallax (max, wide pixels)
GRID = [
    (1.7, -3.0, (-60.0, 35.0), 0.0),
    (1.7, 0.0, (45.0, -30.0), 0.5),
    (1.7, 3.0, (0.0, 0.0), 0.0),
    (2.0, -3.0, (30.0, 20.0), 0.0),
    (2.0, 0.0, (-70.0, -40.0), 0.0),
    (2.0, 3.0, (80.0, 45.0), 0.5),
    (2.3, -3.0, (-50.0, -45.0), 0.5),
    (2.3, 0.0, (0.0, 0.0), 0.0),
    (2.3, 3.0, (60.0, -50.0), 0.0),
]


def _corner_errors(fp: Footprint, h_true: np.ndarray, tele_shape) -> np.ndarray:
    return np.linalg.norm(fp.corners - _corners(h_true, tele_shape), axis=1)


def test_true_homography_model():
    h = true_homography((400, 600), (400, 600), 2.0, 0.0, (10.0, -5.0))
    # The telephoto's centre lands on the wide's centre plus the offset; scale 1/2.
    c = h @ [299.5, 199.5, 1.0]
    np.testing.assert_allclose(c[:2] / c[2], [299.5 + 10, 199.5 - 5])
    np.testing.assert_allclose(h[:2, :2], np.eye(2) / 2)


@pytest.mark.parametrize("zoom,rot,offset,parallax", GRID)
def test_footprint_corners_within_one_pixel(hr, zoom, rot, offset, parallax):
    rng = np.random.default_rng(int(zoom * 10 + rot + 100))
    wide, tele, h_true = make_synthetic_pair(
        hr, zoom, rot, offset, GAIN, parallax, rng, wide_shape=WIDE
    )
    fp = register(wide, tele)
    err = _corner_errors(fp, h_true, tele.shape[:2])
    assert err.mean() <= 1.0 and err.max() <= 1.5, f"corner errors {err.round(3)}"
    assert abs(fp.zoom - zoom) < 0.02
    assert abs(fp.rotation_deg - rot) < 0.2
    assert fp.inliers >= 50 and 0.5 < fp.confidence <= 1.0
    assert fp.corners.shape == (4, 2) and fp.tele_shape == tele.shape[:2]


def test_estimate_footprint_returns_the_homography(hr):
    wide, tele, h_true = make_synthetic_pair(
        hr, 2.0, 1.0, (10.0, 5.0), GAIN, 0.0, np.random.default_rng(3), wide_shape=WIDE
    )
    h = estimate_footprint(wide, tele)
    assert h.shape == (3, 3)
    pts = np.array([[0.0, 0.0, 1.0], [599.0, 399.0, 1.0], [300.0, 200.0, 1.0]]).T
    got, want = h @ pts, h_true @ pts
    np.testing.assert_allclose(got[:2] / got[2], want[:2] / want[2], atol=1.0)


def test_unrelated_and_noise_teles_raise(hr):
    rng = np.random.default_rng(5)
    wide, _, _ = make_synthetic_pair(hr, 2.0, 0.0, (0, 0), GAIN, 0.0, rng, wide_shape=WIDE)
    other = procedural_image((1000, 1500), np.random.default_rng(99))
    _, unrelated, _ = make_synthetic_pair(other, 2.0, 0.0, (0, 0), GAIN, 0.0, rng, wide_shape=WIDE)
    noise = rng.integers(0, 256, (*WIDE, 3), dtype=np.uint8)
    flat = np.full((*WIDE, 3), 90, np.uint8)
    for tele in (unrelated, noise, flat):
        with pytest.raises(FootprintNotFoundError, match="could not be found in the wide image"):
            register(wide, tele)
    assert issubclass(FootprintNotFoundError, ValueError)


def test_implausible_zoom_is_rejected(hr):
    # The "telephoto" is the wide image itself: zoom 1, outside [1.4, 2.8].
    wide, _, _ = make_synthetic_pair(hr, 2.0, 0.0, (0, 0), GAIN, 0.0, None, wide_shape=WIDE)
    with pytest.raises(FootprintNotFoundError, match="zoom of x1.00"):
        register(wide, wide)


def test_center_crop_box_is_even_and_inside_the_footprint():
    for rot in (-3.0, 0.0, 3.0):
        h = true_homography((400, 600), WIDE, 1.9, rot, (23.0, -11.0))
        corners = _corners(h, (400, 600))
        y0, y1, x0, x1 = center_crop_box(corners, WIDE)
        assert y0 % 2 == 0 and x0 % 2 == 0 and (y1 - y0) % 2 == 0 and (x1 - x0) % 2 == 0
        assert 0 <= y0 < y1 <= WIDE[0] and 0 <= x0 < x1 <= WIDE[1]
        # Every box corner (pixel outer edges) lies inside the footprint polygon.
        inv = np.linalg.inv(h)
        for x, y in (
            (x0 - 0.5, y0 - 0.5),
            (x1 - 0.5, y0 - 0.5),
            (x0 - 0.5, y1 - 0.5),
            (x1 - 0.5, y1 - 0.5),
        ):
            u = inv @ [x, y, 1.0]
            u = u[:2] / u[2]
            assert -0.5 <= u[0] <= 599.5 and -0.5 <= u[1] <= 399.5
        # ...and it is not much smaller than the footprint's inscribed rectangle.
        fw, fh = 600 / 1.9, 400 / 1.9
        assert (x1 - x0) > fw - 2 * fh * np.sin(np.radians(abs(rot))) - 6
        assert (y1 - y0) > fh - 2 * fw * np.sin(np.radians(abs(rot))) - 6


def test_center_crop_box_clips_to_the_frame():
    corners = np.array([[-30.0, -20.0], [700.0, -20.0], [700.0, 420.0], [-30.0, 420.0]])
    assert center_crop_box(corners, WIDE) == (0, 400, 0, 600)


def test_align_reference_shapes_geometry_and_colour(hr):
    wide, tele, h_true = make_synthetic_pair(
        hr, 2.1, 2.0, (25.0, -15.0), GAIN, 0.0, np.random.default_rng(8), wide_shape=WIDE
    )
    pair = align_reference(wide, tele)
    assert isinstance(pair, AlignedPair)
    y0, y1, x0, x1 = pair.box_lr
    assert pair.lrc.shape == (y1 - y0, x1 - x0, 3)
    assert pair.ref.shape == (2 * (y1 - y0), 2 * (x1 - x0), 3)
    assert pair.ref.dtype == np.uint8 and pair.lr is not None
    np.testing.assert_array_equal(pair.lrc, wide[y0:y1, x0:x1])
    # Colour-matched and aligned: the Ref averaged over 2x2 blocks is the LRC up to small error.
    ref_down = pair.ref.astype(np.float64).reshape(y1 - y0, 2, x1 - x0, 2, 3).mean((1, 3))
    diff = ref_down - pair.lrc.astype(np.float64)
    assert np.abs(diff.mean((0, 1))).max() < 1.0, diff.mean((0, 1))  # per-channel bias
    assert np.abs(diff).mean() < 3.0, np.abs(diff).mean()
    # Before the colour match the telephoto's red was 30% brighter.
    np.testing.assert_allclose(np.diag(pair.colour[:, :3]), 1 / np.array(GAIN), rtol=0.05)


def test_align_reference_with_given_footprint_and_uint16(hr):
    wide, tele, _ = make_synthetic_pair(
        hr, 2.0, 0.0, (0.0, 0.0), (1.0, 1.0, 1.0), 0.0, np.random.default_rng(9), wide_shape=WIDE
    )
    fp = register(wide, tele)
    pair = align_reference(wide.astype(np.uint16) * 257, tele.astype(np.uint16) * 257, fp)
    assert pair.footprint is fp and pair.ref.dtype == np.uint16
    y0, y1, x0, x1 = pair.box_lr
    assert pair.ref.shape[:2] == (2 * (y1 - y0), 2 * (x1 - x0))


def test_sample_pair_matches_truth():
    truth = json.loads((SAMPLE / "truth.json").read_text())
    wide = read_image(SAMPLE / "wide.jpg")
    tele = read_image(SAMPLE / "tele.jpg")
    assert wide.shape == (480, 640, 3) and tele.shape == (480, 640, 3)
    fp = register(wide, tele)
    err = np.linalg.norm(fp.corners - np.array(truth["corners_tele_in_wide"]), axis=1)
    assert err.max() <= 1.0, f"corner errors {err.round(3)}"
    h = np.array(truth["homography_tele_to_wide"])
    np.testing.assert_allclose(
        _corners(h, tele.shape[:2]), truth["corners_tele_in_wide"], atol=1e-9
    )


def test_working_resolution_cap_keeps_full_resolution_homography(hr):
    # Matching at half the wide's size (max_side 300) still lands the corners within ~2 wide pixels.
    wide, tele, h_true = make_synthetic_pair(
        hr, 1.9, -1.5, (20.0, 10.0), GAIN, 0.0, np.random.default_rng(11), wide_shape=WIDE
    )
    fp = register(wide, tele, max_side=300)
    err = _corner_errors(fp, h_true, tele.shape[:2])
    assert err.max() <= 2.0, err
    assert abs(fp.zoom - 1.9) < 0.03


@settings(max_examples=60, deadline=None)
@given(
    zoom=st.floats(1.5, 2.6),
    rot=st.floats(-4.0, 4.0),
    dx=st.floats(-40.0, 40.0),
    dy=st.floats(-30.0, 30.0),
    th=st.integers(60, 200),
    tw=st.integers(60, 260),
)
def test_center_crop_box_invariants(zoom, rot, dx, dy, th, tw):
    wide_shape = (th + 7, tw + 3)  # odd sizes too
    h = true_homography((th, tw), wide_shape, zoom, rot, (dx, dy))
    corners = _corners(h, (th, tw))
    y0, y1, x0, x1 = center_crop_box(corners, wide_shape)
    assert y0 % 2 == 0 and x0 % 2 == 0 and (y1 - y0) % 2 == 0 and (x1 - x0) % 2 == 0
    assert 0 <= y0 < y1 <= wide_shape[0] and 0 <= x0 < x1 <= wide_shape[1]
    poly = corners.astype(np.float32)
    for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
        assert cv2.pointPolygonTest(poly, (x - 0.5, y - 0.5), False) >= 0


def test_sample_pair_aligned_reference_is_colour_matched():
    pair = align_reference(read_image(SAMPLE / "wide.jpg"), read_image(SAMPLE / "tele.jpg"))
    y0, y1, x0, x1 = pair.box_lr
    assert (y1 - y0) % 2 == 0 and (x1 - x0) % 2 == 0 and y0 % 2 == 0 and x0 % 2 == 0
    ref_down = pair.ref.astype(np.float64).reshape(y1 - y0, 2, x1 - x0, 2, 3).mean((1, 3))
    diff = ref_down - pair.lrc.astype(np.float64)
    assert np.abs(diff.mean((0, 1))).max() < 1.0, diff.mean((0, 1))
    assert np.abs(diff).mean() < 5.0


def test_dense_refinement_recovers_a_smooth_shift():
    """A Ref displaced by a known smooth field is put back by the refinement to a small fraction
    of a pixel; the field is smooth and clipped, and tiny images are left alone."""
    import cv2

    from sddusr_engine.registration import REFINE_MAX_PX, dense_refinement

    rng = np.random.default_rng(0)
    ref = cv2.GaussianBlur(rng.uniform(0, 1, (192, 256, 3)).astype(np.float32), (0, 0), 1.5)
    h, w = ref.shape[:2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    shift = np.stack([1.2 + 0.4 * np.sin(u / 80), -0.8 + 0.3 * np.cos(v / 60)], axis=-1)
    # what LRC shows at p is Ref at p + shift(p): the refinement must find shift
    lrc_hr = cv2.remap(ref, u + shift[..., 0], v + shift[..., 1], cv2.INTER_CUBIC,
                       borderMode=cv2.BORDER_REFLECT)  # fmt: skip
    lrc = cv2.resize(lrc_hr, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    field = dense_refinement(lrc, ref)
    assert field.shape == (h, w, 2) and field.dtype == np.float32
    inner = (slice(24, -24), slice(24, -24))
    err = np.abs(field[inner] - shift[inner]).mean()
    assert err < 0.2, err
    assert np.abs(field).max() <= REFINE_MAX_PX
    assert dense_refinement(lrc[:20, :20], ref[:40, :40]) is None


def test_colour_map_of_a_one_hue_scene_keeps_the_detail():
    """A crop of nearly one hue (sky: collinear channels) leaves the 3×3 colour map undetermined
    off that hue, and a Ref a few pixels off (before refinement) pulls the fit anywhere there;
    the ridge keeps the identity's gain in those directions instead of a map that flattens or
    blows up the Ref's detail. A scene that spans all colours still gets its exact map."""
    import cv2

    from sddusr_engine.registration import fit_colour_transform

    hue = np.array([0.48, 0.80, 0.96])
    u, _, _ = np.linalg.svd(np.eye(3) - np.outer(hue, hue) / (hue @ hue))
    off_hue = u[:, :2]  # the two colour directions orthogonal to the hue
    gains = np.array([0.97, 1.02, 1.02])
    worst_plain = 0.0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        t = cv2.GaussianBlur(rng.normal(0, 1, (96, 96)).astype(np.float32), (0, 0), 2.0)
        t = 0.97 + 0.05 * t / t.std()
        src = np.clip(hue * t[..., None] + rng.normal(0, 0.0005, (96, 96, 3)), 0, 1)
        dst = np.roll(src, (3, 3), (0, 1)) * gains

        def off_hue_gain(m):
            true = np.linalg.norm(gains[:, None] * off_hue, axis=0)
            return np.linalg.norm(m[:, :3] @ off_hue, axis=0) / true

        ridged = off_hue_gain(fit_colour_transform(src, dst))
        assert np.all(np.abs(ridged - 1) < 0.15), (seed, ridged)
        plain = off_hue_gain(fit_colour_transform(src, dst, ridge=0.0))
        worst_plain = max(worst_plain, float(np.abs(plain - 1).max()))
    assert worst_plain > 0.5  # the unregularised fit really is lost there
    rng = np.random.default_rng(7)
    src = rng.uniform(0.05, 0.95, size=(64, 64, 3))
    true = np.array([[0.9, 0.05, 0.0, 0.02], [0.0, 1.1, 0.03, -0.01], [0.02, 0.0, 0.95, 0.0]])
    dst = np.clip(src @ true[:, :3].T + true[:, 3], 0, 1)
    np.testing.assert_allclose(fit_colour_transform(src, dst), true, atol=0.01)
