"""The comparison picture: crops placed on detail (inside the centre box; in a corner outside the
telephoto's footprint), panels that hold exactly the bicubic, SR and registered-telephoto pixels,
labels drawn, and the files `sddusr sr --comparison` and `sddusr demo` write."""

import json

import cv2
import numpy as np
import pytest
from support import invoke

from sddusr_engine.compare import (
    BACKGROUND,
    MAX_CROP,
    bicubic_x2,
    choose_crops,
    comparison_from_run,
    render_comparison,
)
from sddusr_engine.io import read_image
from sddusr_engine.synthetic import procedural_image


def flat_with_patches(shape, patches, seed=0):
    """A flat grey RGB image with strong noise texture in each (y0, y1, x0, x1) of `patches`."""
    rng = np.random.default_rng(seed)
    img = np.full((*shape, 3), 128, np.uint8)
    for y0, y1, x0, x1 in patches:
        img[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    return img


def covers(outer, inner) -> bool:
    return (
        outer[0] <= inner[0]
        and inner[1] <= outer[1]
        and outer[2] <= inner[2]
        and inner[3] <= outer[3]
    )


def footprint_pixels(corners, shape) -> np.ndarray:
    """Output pixels whose centre lies inside the footprint (wide pixel x -> output 2x + 0.5)."""
    mask = np.zeros(shape, np.uint8)
    pts = np.rint((2 * np.asarray(corners, float) + 0.5) * 16).astype(np.int32)
    cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def test_centre_crop_covers_the_only_detail_inside_the_box():
    box_lr = (40, 200, 60, 280)  # output (80, 400, 120, 560)
    patch = (300, 364, 440, 504)  # inside the box, off its middle
    decoy = (10, 74, 10, 74)  # more texture, but outside the box: no telephoto there
    sr = flat_with_patches((480, 640), [patch, decoy])
    crops = choose_crops(sr, box_lr)
    assert crops.side == MAX_CROP and crops.zoom == 1
    assert covers((80, 400, 120, 560), crops.centre)
    assert covers(crops.centre, patch)
    assert all(v % 2 == 0 for v in crops.centre)  # whole wide pixels, so bicubic crops align


def test_corner_crop_is_on_detail_outside_the_footprint():
    h, w = 480, 640
    # a rotated footprint over the middle, in wide pixels (centre convention), 4x2 (x, y);
    # in output pixels it spans about x 200..440, y 140..320
    corners = np.array([[100.0, 70.0], [220.0, 74.0], [218.0, 160.0], [98.0, 156.0]])
    inside = (160, 300, 220, 420)  # texture inside the footprint, stronger than the corner's
    patch = (380, 440, 520, 600)  # bottom right, clear of the footprint
    sr = flat_with_patches((h, w), [inside, patch])
    sr[380:440, 520:600] //= 2
    crops = choose_crops(sr, (80, 150, 110, 210), corners)
    assert crops.corner_place == "corner"
    y0, y1, x0, x1 = crops.corner
    assert y1 - y0 == crops.side  # room for a full-size crop
    assert not footprint_pixels(corners, (h, w))[y0:y1, x0:x1].any()
    assert abs((y0 + y1) / 2 - h / 2) >= h / 4 and abs((x0 + x1) / 2 - w / 2) >= w / 4
    assert covers(crops.corner, patch)


def test_corner_crop_shrinks_then_says_where_it_fell():
    h, w = 240, 320
    sr = flat_with_patches((h, w), [(0, h, 0, w)])
    box = (10, 110, 50, 110)  # 200x120 output pixels: 112-pixel crops
    # a footprint over the full height with side margins of about 48 wide pixels: a
    # centre-sized corner crop does not fit beside it, a smaller one does
    band = np.array([[48.0, -2.0], [111.0, -2.0], [111.0, 122.0], [48.0, 122.0]])
    crops = choose_crops(sr, box, band)
    y0, y1, x0, x1 = crops.corner
    assert crops.side == 112
    assert crops.corner_place == "corner" and crops.side // 2 <= y1 - y0 < crops.side
    assert not footprint_pixels(band, (h, w))[y0:y1, x0:x1].any()
    # a footprint over the whole frame: the crop still comes back, and its label says so
    whole = np.array([[-2.0, -2.0], [162.0, -2.0], [162.0, 122.0], [-2.0, 122.0]])
    crops = choose_crops(sr, box, whole)
    assert crops.corner_place == "corner, under the telephoto"
    assert crops.corner[1] - crops.corner[0] == crops.side


@pytest.mark.parametrize("wide_shape, box_lr, zoom", [((240, 320), (60, 200, 80, 260), 1),
                                                      ((60, 80), (14, 46, 20, 60), 2)])  # fmt: skip
def test_panels_hold_the_bicubic_sr_and_telephoto_pixels(wide_shape, box_lr, zoom):
    rng = np.random.default_rng(1)
    wide = procedural_image(wide_shape, rng)
    sr = procedural_image((2 * wide_shape[0], 2 * wide_shape[1]), rng)
    y0, y1, x0, x1 = box_lr
    ref = procedural_image((2 * (y1 - y0), 2 * (x1 - x0)), rng)
    corners = np.array(
        [[x0 - 4, y0 - 4], [x1 + 3, y0 - 4], [x1 + 3, y1 + 3], [x0 - 4, y1 + 3]], float
    )
    c = render_comparison(wide, sr, corners, box_lr, ref, ["telephoto zoom 2.00x"])
    names = {
        "overview",
        "centre/bicubic",
        "centre/sr",
        "centre/telephoto",
        "corner/bicubic",
        "corner/sr",
    }
    assert set(c.panels) == names
    assert c.crops.zoom == zoom
    big = bicubic_x2(wide)

    def expect(src):
        return np.repeat(np.repeat(src, zoom, axis=0), zoom, axis=1)

    for p in c.panels.values():
        a0, a1, b0, b1 = p.at
        assert 0 <= a0 < a1 <= c.image.shape[0] and 0 <= b0 < b1 <= c.image.shape[1]
        got = c.image[a0:a1, b0:b1]
        if p.source is not None:
            s0, s1, t0, t1 = p.source
            kind = p.name.split("/")[1]
            src = {
                "bicubic": big[s0:s1, t0:t1],
                "sr": sr[s0:s1, t0:t1],
                "telephoto": ref[s0 - 2 * y0 : s1 - 2 * y0, t0 - 2 * x0 : t1 - 2 * x0],
            }[kind]
            assert np.array_equal(got, expect(src)), p.name
        # the label strip above each panel carries bright text on the dark background
        l0, l1, m0, m1 = p.label_at
        strip = c.image[l0:l1, m0:m1].astype(int)
        assert (strip.min(axis=2) > 150).sum() > 20, p.name
        assert p.label
    # panels do not overlap one another
    taken = np.zeros(c.image.shape[:2], int)
    for p in c.panels.values():
        taken[p.at[0] : p.at[1], p.at[2] : p.at[3]] += 1
    assert taken.max() == 1
    # the overview sits on the left, the crops to its right; the rest is background
    assert c.panels["overview"].at[3] < min(p.at[2] for n, p in c.panels.items() if n != "overview")
    assert (c.image[-2:] == BACKGROUND).all()


def test_without_a_reference_there_is_no_telephoto_panel_and_16_bits_work():
    rng = np.random.default_rng(2)
    wide = procedural_image((120, 160), rng).astype(np.uint16) * 257
    sr = procedural_image((240, 320), rng).astype(np.uint16) * 257
    c = render_comparison(wide, sr)
    assert "centre/telephoto" not in c.panels and c.image.dtype == np.uint8
    y0, y1, x0, x1 = c.crops.centre
    assert covers((60, 180, 80, 240), c.crops.centre)  # the middle half
    got = c.image[c.panels["centre/sr"].at[0] :, c.panels["centre/sr"].at[2] :][
        : 2 * (y1 - y0) : 2, ::2
    ]
    assert np.array_equal(got[: y1 - y0, : x1 - x0], (sr[y0:y1, x0:x1] // 257).astype(np.uint8))


def test_sr_writes_the_comparison_with_its_output(pair, tiny_weights, tmp_path):
    from sddusr_engine.engine import Engine

    wide, tele, _ = pair
    out, cmp = tmp_path / "x2.png", tmp_path / "views" / "cmp.png"
    common = ("--weights", tiny_weights, "--device", "cpu")
    res = invoke("sr", wide, tele, "-o", out, "--comparison", cmp, "--json", *common)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["comparison"] == str(cmp)
    # the very picture of this run: the same engine in-process gives the same result and info
    eng = Engine.from_pretrained(tiny_weights, device="cpu")
    wide_a, tele_a = read_image(wide), read_image(tele)
    sr, info = eng.super_resolve(wide_a, tele_a, return_info=True, keep_maps=True)
    assert np.array_equal(read_image(out), sr)
    assert info.maps["ref"].shape[:2] == tuple(
        2 * (info.box_lr[i + 1] - info.box_lr[i]) for i in (0, 2)
    )
    assert np.array_equal(read_image(cmp), comparison_from_run(wide_a, sr, info))

    # all or none: a comparison that cannot be written stops the command before it writes anything
    (tmp_path / "file").write_text("a file, not a folder")
    # unknown suffix; exists already; under a file
    for bad, code in ((tmp_path / "cmp.gif", 2), (cmp, 2), (tmp_path / "file" / "c.png", 1)):
        out2 = tmp_path / "y.png"
        res = invoke("sr", wide, tele, "-o", out2, "--comparison", bad, *common)
        assert res.exit_code == code, res.output
        assert not out2.exists() and not (tmp_path / "cmp.gif").exists()


def test_demo_comparison_shows_the_telephoto(tiny_weights, tmp_path):
    from sddusr_engine.engine import Engine
    from sddusr_engine.shipped import sample_dir

    res = invoke(
        "demo", "-o", tmp_path, "--shrink", 4, "--device", "cpu", SDDUSR_WEIGHTS=str(tiny_weights)
    )
    assert res.exit_code == 0, res.output
    wide, tele = (read_image(sample_dir() / n) for n in ("wide.jpg", "tele.jpg"))
    wide, tele = (cv2.resize(a, (160, 120), interpolation=cv2.INTER_AREA) for a in (wide, tele))
    eng = Engine.from_pretrained(tiny_weights, device="cpu")
    sr, info = eng.super_resolve(wide, tele, return_info=True, keep_maps=True)
    c = render_comparison(wide, sr, info.footprint.corners, info.box_lr, info.maps["ref"])
    got = read_image(tmp_path / "comparison.png")
    assert got.shape == c.image.shape
    a0, a1, b0, b1 = c.panels["centre/telephoto"].at
    assert np.array_equal(got[a0:a1, b0:b1], c.image[a0:a1, b0:b1])
    assert c.crops.zoom == 2  # the 320x240 output's crops are small: shown 2x
