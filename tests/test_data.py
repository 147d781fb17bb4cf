"""Data: licence lookup, photo fetching (from a locally built .deb), near-duplicate collapse, the
fixed validation split, the reserved package, pair maker, both layouts, the training Dataset.
Tiny synthetic images only; nothing is downloaded."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from support import fake_photo_manifest as _fake_photo_manifest
from support import textured_photo as _photo

from sddusr_engine.data import (
    BOX_FILE,
    DualLensDataset,
    fetch_photos,
    license_for,
    make_pair,
    parse_dep5,
    prepare_pairs,
)
from sddusr_engine.data.dedup import collapse_copies, dct_hash, hamming
from sddusr_engine.data.photos import PHOTO_PACKAGES, RESERVED_PACKAGES, split_for
from sddusr_engine.datasets import load_pairs

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: test

Files: *
Copyright: The Authors
License: BSD-3-clause

Files: 16.04/Bridge_by_Someone.jpg
Copyright: 2018, Someone
License: CC-BY-SA-4.0

Files: nature/*.jpg
Copyright: 2008, A Person <a@b.c>
           2009, Another
License: GPL-2+
 This program is free software.
"""


def test_dep5_licence_lookup():
    st = parse_dep5(COPYRIGHT)
    assert [s.license for s in st] == ["BSD-3-clause", "CC-BY-SA-4.0", "GPL-2+"]
    assert st[2].copyright == "2008, A Person <a@b.c>\n2009, Another"
    # source path 16.04/X installed as usr/share/backgrounds/X: matched by file name
    assert license_for(st, "usr/share/backgrounds/Bridge_by_Someone.jpg").license == "CC-BY-SA-4.0"
    assert license_for(st, "usr/share/backgrounds/mate/nature/Aqua.jpg").license == "GPL-2+"
    assert license_for(st, "usr/share/x/flower.png").license == "BSD-3-clause"
    assert license_for(parse_dep5("Files: a.jpg\nLicense: MIT\n"), "b.jpg") is None


def _save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * 255).astype(np.uint8)).save(path, **kw)


def _build_deb(tmp_path, pkg, files, copyright_text=COPYRIGHT):
    """A .deb of `files` ({relative path: image}) in `tmp_path/cache/debs`, as apt-get would
    leave it; returns the cache folder."""
    root = tmp_path / "build" / pkg
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {pkg}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    for rel, img in files.items():
        _save(root / rel, img, quality=90)
    (root / f"usr/share/doc/{pkg}").mkdir(parents=True)
    (root / f"usr/share/doc/{pkg}/copyright").write_text(copyright_text)
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    deb = cache / "debs" / f"{pkg}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    return cache


def _resized(img, h, w):
    u8 = Image.fromarray((img * 255).astype(np.uint8)).resize((w, h), Image.LANCZOS)
    return np.asarray(u8, np.float32) / 255


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_photos_from_a_local_deb(tmp_path):
    """One original, its smaller re-encoded copy, a distinct photo and a thumbnail: photos.json
    keeps the original and the distinct one, each with its licence, hash and split, names the
    copy as the original's duplicate and leaves the thumbnail out."""
    pkg = "sddusr-test-photos"
    a = _photo(384, 512, seed=1)
    d = "usr/share/backgrounds/nature"
    files = {f"{d}/a.jpg": a, f"{d}/a_small.jpg": _resized(a, 288, 384)}
    files.update({f"{d}/b.jpg": _photo(384, 512, seed=2), f"{d}/tiny.jpg": _photo(64, 96)})
    cache = _build_deb(tmp_path, pkg, files)
    m = json.loads(fetch_photos(cache, packages=[pkg]).read_text())
    assert m["packages"][pkg]["version"] == "1.0-1" and len(m["packages"][pkg]["sha256"]) == 64
    assert [ph["id"] for ph in m["photos"]] == [f"{pkg}/a.jpg", f"{pkg}/b.jpg"]
    ph = m["photos"][0]
    assert ph["license"] == "GPL-2+" and ph["size"] == [384, 512]
    assert ph["path"].endswith("usr/share/backgrounds/nature/a.jpg")
    assert ph["copies"] == [f"{pkg}/a_small.jpg"]
    (dup,) = m["collapsed"]
    assert dup["duplicate_of"] == f"{pkg}/a.jpg" and dup["hamming"] <= 10
    assert m["too_small"] == [f"{pkg}/tiny.jpg"]
    assert m["counts"] == {"files": 4, "too_small": 1, "collapsed": 1, "photos": 2, "test": 0}
    for ph in m["photos"]:
        assert ph["split"] == split_for(ph["id"]) and len(ph["phash"]) == 16


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_every_photo_has_a_licence(tmp_path):
    """A photo its package's copyright file gives no licence for stops the fetch, naming it."""
    pkg = "sddusr-test-unlicensed"
    cache = _build_deb(
        tmp_path,
        pkg,
        {"usr/share/backgrounds/x.jpg": _photo(300, 400)},
        copyright_text="Files: other/*\nCopyright: someone\nLicense: MIT\n",
    )
    with pytest.raises(ValueError, match="no licence for usr/share/backgrounds/x.jpg"):
        fetch_photos(cache, packages=[pkg], globs={pkg: ("usr/share/backgrounds/*.jpg",)})


def test_dedup_collapses_resized_copies_and_keeps_distinct_photos(tmp_path):
    """Resized, re-encoded and re-saved copies of one photo collapse onto its largest copy;
    distinct photos, even of the same texture statistics, stay apart."""
    base = _photo(480, 640, seed=5)
    entries = []
    for name, img, kw in [
        ("orig.png", base, {}),
        ("half.jpg", _resized(base, 240, 320), {"quality": 75}),
        ("q60.jpg", base, {"quality": 60}),
        ("wide.png", _resized(base, 300, 420), {}),  # resized to another aspect ratio
        ("other1.png", _photo(480, 640, seed=6), {}),
        ("other2.jpg", _photo(480, 640, seed=7), {"quality": 90}),
        ("other2_flip.png", _photo(480, 640, seed=7)[:, ::-1], {}),  # mirrored: another view
    ]:
        _save(tmp_path / name, img, **kw)
        entries.append({"id": f"pkg/{name}", "path": str(tmp_path / name), "size": img.shape[:2]})
    kept, dropped = collapse_copies(entries)
    assert [e["id"] for e in kept] == [
        "pkg/orig.png",
        "pkg/other1.png",
        "pkg/other2.jpg",
        "pkg/other2_flip.png",
    ]
    assert kept[0]["copies"] == ["pkg/half.jpg", "pkg/q60.jpg", "pkg/wide.png"]
    assert {e["id"]: e["duplicate_of"] for e in dropped} == {
        f"pkg/{n}": "pkg/orig.png" for n in ("half.jpg", "q60.jpg", "wide.png")
    }
    assert all(e["hamming"] <= 6 for e in dropped)
    # the distinct photos are far from each other, not just past the threshold
    hs = [dct_hash(e["path"]) for e in kept]
    assert min(hamming(a, b) for i, a in enumerate(hs) for b in hs[i + 1 :]) >= 16


def test_split_is_stable_when_photos_are_added(tmp_path):
    """A photo's split depends on its id alone: adding photos (or packages) moves none, about a
    fifth are held out, and prepare_pairs puts each photo where split_for says."""
    ids = [f"pkg{i % 7}/photo_{i}.jpg" for i in range(3000)]
    first = {i: split_for(i) for i in ids[:200]}
    later = {i: split_for(i) for i in reversed(ids)}  # more photos, another order
    assert all(later[i] == s for i, s in first.items())
    share = sum(s == "test" for s in later.values()) / len(later)
    assert 0.17 < share < 0.23
    # 16 photos (p15 held out), then 18 (p17 held out too)
    pm = _fake_photo_manifest(tmp_path, n=18, split=False)
    fewer = json.loads(pm.read_text())
    fewer["photos"] = fewer["photos"][:16]
    pm16 = tmp_path / "photos16.json"
    pm16.write_text(json.dumps(fewer))
    kw = dict(seed=0, train_crops=0, ref_alignment="simulated")
    m16 = json.loads(prepare_pairs(pm16, tmp_path / "d16", **kw).read_text())
    m18 = json.loads(prepare_pairs(pm, tmp_path / "d18", **kw).read_text())
    s18 = {p["id"]: p["split"] for p in m18["photos"]}
    assert all(s18[p["id"]] == p["split"] == split_for(p["id"]) for p in m16["photos"])
    assert [i for i, s in s18.items() if s == "test"] == ["pkg/p15.png", "pkg/p17.png"]
    held = {p["photo"] for p in m18["pairs"] if p["split"] == "test"}
    trained = {p["photo"] for p in m18["pairs"] if p["split"] == "train"}
    assert held == {"pkg/p15.png", "pkg/p17.png"} and not held & trained


def test_reserved_package_is_refused(tmp_path):
    """plasma-workspace-wallpapers is kept for independent evaluation: not among the training
    packages, refused by the fetch before any download, and refused by prepare_pairs."""
    assert "plasma-workspace-wallpapers" in RESERVED_PACKAGES
    assert not RESERVED_PACKAGES & set(PHOTO_PACKAGES)
    with pytest.raises(ValueError, match="reserved for independent evaluation"):
        fetch_photos(
            tmp_path / "cache", packages=["mate-backgrounds", "plasma-workspace-wallpapers"]
        )
    assert not (tmp_path / "cache").exists()
    pm = _fake_photo_manifest(tmp_path, n=2)
    m = json.loads(pm.read_text())
    m["photos"][1]["package"] = "plasma-workspace-wallpapers"
    pm.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="plasma-workspace-wallpapers is reserved"):
        prepare_pairs(pm, tmp_path / "pairs")
    assert not (tmp_path / "pairs").exists()


def test_make_pair_geometry_and_determinism():
    src = _photo(300, 420)
    a = make_pair(src, np.random.default_rng(5))
    b = make_pair(src, np.random.default_rng(5))
    H, W = a["hr"].shape[:2]
    assert (H, W) == (144, 208)  # (150, 210) floored to multiples of 8
    assert a["lr"].shape == (H // 2, W // 2, 3)
    y0, y1, x0, x1 = a["box"]
    # the LR origin is even (y0, x0 multiples of 4 in HR): LR and LRC matching cells coincide
    assert (y1 - y0) % 4 == 0 and (x1 - x0) % 4 == 0 and y0 % 4 == 0 and x0 % 4 == 0
    assert a["lrc"].shape[:2] == ((y1 - y0) // 2, (x1 - x0) // 2)
    assert a["lrc"].shape[0] % 2 == 0 and a["lrc"].shape[1] % 2 == 0
    np.testing.assert_array_equal(a["lrc"], a["lr"][y0 // 2 : y1 // 2, x0 // 2 : x1 // 2])
    assert a["ref"].shape[:2] == (y1 - y0, x1 - x0)
    for k in ("hr", "lr", "ref", "tele"):
        np.testing.assert_array_equal(a[k], b[k])
    p = a["params"]
    assert 1.9 <= p.tele_zoom <= 2.1 and abs(p.residual_rot_deg) <= 1.0
    # Ref shows the centre of the scene: it correlates with the HR centre far better than with
    # the centre mirrored, and it is not the HR itself.
    c = a["hr"][y0:y1, x0:x1].astype(np.float64)
    r = a["ref"].astype(np.float64)
    corr = lambda u, v: np.corrcoef(u.ravel(), v.ravel())[0, 1]
    assert corr(c, r) > 0.6
    assert corr(c, r) > corr(c[::-1, ::-1], r) + 0.3
    assert np.abs(c - r).mean() > 1.0


def _flow_errors(pair):
    """(no flow, true flow, opposite flow): standardised error of the pooled Ref against LRC."""
    import torch.nn.functional as F

    from sddusr_engine.model.flow import flow_warp
    from sddusr_engine.train.losses import _standardise

    lrc = torch.from_numpy(pair["lrc"].copy()).permute(2, 0, 1)[None].float() / 255
    pooled = F.avg_pool2d(torch.from_numpy(pair["ref"].copy()).permute(2, 0, 1)[None].float(), 2)
    flow = torch.from_numpy(pair["flow"]).permute(2, 0, 1)[None]

    def err(x):
        inner = (..., slice(6, -6), slice(6, -6))
        return float((_standardise(x[inner]) - _standardise(lrc[inner])).square().mean())

    return (
        err(pooled),
        err(flow_warp(pooled, flow, "border")),
        err(flow_warp(pooled, -flow, "border")),
    )


@pytest.mark.parametrize("alignment", ["simulated", "registration"])
def test_true_flow_aligns_the_reference(alignment):
    """make_pair's `flow` warps the average-pooled Ref onto LRC: closer than no flow, and the
    opposite flow is worse (sign and axes are right), whichever way Ref was aligned."""
    src = _photo(520, 680)
    for seed in (1, 2):
        a = make_pair(src, np.random.default_rng(seed), ref_alignment=alignment)
        assert a["alignment"] == alignment
        hc, wc = a["lrc"].shape[:2]
        assert a["flow"].shape == (hc, wc, 2) and a["flow"].dtype == np.float32
        none, true, opposite = _flow_errors(a)
        if alignment == "simulated":  # pixels of misalignment left: the flow removes most
            assert true < 0.6 * none, (true, none)
            assert opposite > none
        else:  # registered and densely refined: a tenth of a pixel left, the flow still helps
            assert true < none < opposite, (true, none, opposite)


def test_registered_reference_is_the_engines_and_better_aligned():
    """The default Ref is the engine's registration of the telephoto: same HR/LR/telephoto as the
    simulated alignment (no extra random draws), smaller true flow, smaller error, and the
    colours of the wide photo (the telephoto's exposure and colour shift are matched away)."""
    from sddusr_engine.registration import align_reference, register, resample_reference

    src = _photo(520, 680)
    sim = make_pair(src, np.random.default_rng(3), ref_alignment="simulated")
    reg = make_pair(src, np.random.default_rng(3))
    assert reg["alignment"] == "registration"
    for k in ("hr", "lr", "lrc", "tele"):
        np.testing.assert_array_equal(sim[k], reg[k])
    assert reg["box"] == sim["box"]
    assert np.abs(reg["flow"]).mean() < 0.5 * np.abs(sim["flow"]).mean()
    assert _flow_errors(reg)[0] < _flow_errors(sim)[0]
    np.testing.assert_array_equal(make_pair(src, np.random.default_rng(3))["ref"], reg["ref"])
    # exactly what the engine computes for that box
    box = tuple(v // 2 for v in reg["box"])
    fp = register(reg["lr"], reg["tele"])
    ref, _ = resample_reference(reg["lr"], reg["tele"], fp, box)
    np.testing.assert_array_equal(ref, reg["ref"])
    # the dense refinement removes most of what the homography leaves (the parallax)
    homography_only, _ = resample_reference(reg["lr"], reg["tele"], fp, box, refine=False)
    assert _flow_errors(reg)[0] < 0.7 * _flow_errors({**reg, "ref": homography_only})[0]
    pooled_mean = reg["ref"].reshape(-1, 3).mean(0)
    assert np.abs(pooled_mean - reg["lrc"].reshape(-1, 3).mean(0)).max() < 3.0
    # align_reference (the engine's entry) still cuts its own box and agrees with itself
    ap = align_reference(reg["lr"], reg["tele"])
    by0, by1, bx0, bx1 = ap.box_lr
    assert ap.ref.shape[:2] == (2 * (by1 - by0), 2 * (bx1 - bx0))


def test_make_pair_falls_back_where_registration_fails():
    """A featureless photo cannot be registered: the pair says so and why, and its Ref is the
    engine's resampling (colour match, dense refinement) from the true footprint, not a Ref
    worse aligned than any the engine would show the network."""
    from sddusr_engine.registration import footprint_from_homography, resample_reference

    flat = np.full((300, 420, 3), 0.5, np.float32)
    p = make_pair(flat, np.random.default_rng(0))
    assert p["alignment"] == "true-footprint-fallback"
    assert "could not be found" in p["fallback_reason"]
    fp = footprint_from_homography(p["tele_to_lr"], p["tele"].shape[:2])
    ref, _ = resample_reference(p["lr"], p["tele"], fp, tuple(v // 2 for v in p["box"]))
    np.testing.assert_array_equal(p["ref"], ref)
    with pytest.raises(ValueError, match="ref_alignment"):
        make_pair(flat, np.random.default_rng(0), ref_alignment="sift")


def test_true_footprint_is_where_registration_finds_the_telephoto():
    """`tele_to_lr` (the fallback's footprint) uses the registration's pixel convention: on
    textured photos the registered corners are within the parallax of the true ones."""
    from sddusr_engine.registration import footprint_from_homography, register

    for seed in (1, 2):  # a clean wide photo and a phone-like one
        p = make_pair(_photo(520, 680, seed=seed), np.random.default_rng(seed))
        assert p["alignment"] == "registration" and p["fallback_reason"] is None
        true = footprint_from_homography(p["tele_to_lr"], p["tele"].shape[:2])
        found = register(p["lr"], p["tele"])
        assert np.abs(found.corners - true.corners).max() < p["params"].parallax_px + 0.5
        assert abs(found.zoom - true.zoom) < 0.02


def _gain_offset(ref_u8: np.ndarray, lrc_u8: np.ndarray) -> list[tuple[float, float]]:
    """Per-channel least-squares lrc ~ g·half(ref) + o on 2×2-pooled, blurred images."""
    import cv2

    half = cv2.resize(ref_u8.astype(np.float32), lrc_u8.shape[1::-1], interpolation=cv2.INTER_AREA)
    a, b = (
        cv2.GaussianBlur(half, (0, 0), 2.0),
        cv2.GaussianBlur(lrc_u8.astype(np.float32), (0, 0), 2.0),
    )
    fits = []
    for c in range(3):
        x = np.stack([a[..., c].ravel(), np.ones(a[..., c].size)], 1)
        g, o = np.linalg.lstsq(x, b[..., c].ravel(), rcond=None)[0]
        fits.append((float(g), float(o)))
    return fits


def test_simulated_reference_is_colour_matched_like_the_registered_one():
    """The simulated Ref (and so the fallback one) has LRC's colours, not the telephoto's own
    exposure and white balance: the engine colour-matches every Ref it shows the network, so a
    training Ref left in the telephoto's colours would teach the fusion to distrust the Ref."""
    from dataclasses import replace

    from sddusr_engine.data import sample_params

    src = _photo(520, 680, seed=4)
    base = sample_params(np.random.default_rng(9))
    for exposure, gains in ((1.15, (1.06, 0.94, 1.0)), (0.85, (0.95, 1.05, 0.94))):
        params = replace(base, exposure=exposure, color_gains=gains, gamma=1.06)
        p = make_pair(src, np.random.default_rng(9), params, ref_alignment="simulated")
        raw_mean = p["tele"].reshape(-1, 3).mean(0)
        lrc_mean = p["lrc"].reshape(-1, 3).mean(0)
        assert np.abs(raw_mean - lrc_mean).max() > 8.0  # the telephoto itself is far off
        assert np.abs(p["ref"].reshape(-1, 3).mean(0) - lrc_mean).max() < 2.0
        for g, o in _gain_offset(p["ref"], p["lrc"]):
            assert abs(g - 1.0) < 0.03 and abs(o) < 4.0, (exposure, g, o)


def test_prepare_pairs_layout_split_and_reader(tmp_path):
    pm = _fake_photo_manifest(tmp_path)
    out = tmp_path / "pairs"
    man = json.loads(prepare_pairs(pm, out, seed=3, train_crops=1, crop_hr=(48, 64)).read_text())
    assert [p["split"] for p in man["photos"]] == ["train", "train", "test", "train", "train"]
    assert all(p["license"] == "CC0-1.0" for p in man["photos"])
    test_names = sorted(p.name for p in (out / "test" / "HR").iterdir())
    assert test_names == ["p2_0.png"]
    assert len(list((out / "train" / "HR").iterdir())) == 8  # 4 photos x (whole + 1 crop)
    boxes = json.loads((out / BOX_FILE).read_text())
    assert set(boxes) == {p["name"] for p in man["pairs"]}
    for split in ("train", "test"):
        for sub in ("LR", "HR", "LR_center", "Ref_SIFT"):
            assert (out / split / sub).is_dir()
    (t,) = load_pairs(out, "test")
    assert t.name == "p2_0.png" and t.box_hr == boxes["p2_0.png"]
    y0, y1, x0, x1 = t.box_hr
    np.testing.assert_array_equal(t.lrc, t.lr[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2])
    assert t.ref.shape[:2] == (y1 - y0, x1 - x0) and t.hr.shape[0] == 2 * t.lr.shape[0]
    # the validation pair again with a phone's degradations, everything else its clean twin's
    (phone,) = load_pairs(out, "test_phone")
    assert phone.name == t.name and phone.box_hr == t.box_hr
    np.testing.assert_array_equal(phone.hr, t.hr)
    # the same telephoto, registered against (and colour-matched to) the phone-like wide photo
    assert np.abs(phone.ref.astype(float) - t.ref.astype(float)).mean() < 8.0
    noise = phone.lr.astype(float) - t.lr.astype(float)
    assert 1.0 < noise.std() < 0.5 * t.lr.std()  # blur, noise, sharpening, JPEG: not a new photo
    assert [p["params"]["degradation"] for p in man["pairs"] if p["split"] == "test"] == ["clean"]
    assert {p["params"]["degradation"] for p in man["pairs"]} <= {"clean", "phone"}
    # same seed, same data
    out2 = tmp_path / "pairs2"
    prepare_pairs(pm, out2, seed=3, train_crops=1, crop_hr=(48, 64))
    a = np.asarray(Image.open(out / "test" / "Ref_SIFT" / "p2_0.png"))
    b = np.asarray(Image.open(out2 / "test" / "Ref_SIFT" / "p2_0.png"))
    np.testing.assert_array_equal(a, b)


def test_training_mix_is_clean_and_phone_like_and_validation_is_fixed():
    from sddusr_engine.data.camera import PHONE_VALIDATION, sample_params

    rng = np.random.default_rng(0)
    drawn = [sample_params(rng) for _ in range(400)]
    phone = [p for p in drawn if p.degradation == "phone"]
    assert 0.4 < len(phone) / len(drawn) < 0.6
    clean = [p for p in drawn if p.degradation == "clean"]
    assert all(p.lr_blur == p.lr_noise == p.lr_sharpen == p.lr_jpeg == 0 for p in clean)
    for field in ("lr_blur", "lr_noise", "lr_sharpen", "lr_jpeg"):  # each drawn on its own
        share = np.mean([getattr(p, field) > 0 for p in phone])
        assert 0.3 < share < 0.85, field
    fixed = sample_params(np.random.default_rng(1), "phone-validation")
    assert {k: getattr(fixed, k) for k in PHONE_VALIDATION} == PHONE_VALIDATION
    with pytest.raises(ValueError, match="unknown degradation"):
        sample_params(rng, "film")


def test_published_train_layout(tmp_path):
    """KeDuSR train layout: LR, HR, Ref_full (not on the 2xLRC grid) + a JSON of boxes."""
    rng = np.random.default_rng(0)
    d = tmp_path / "DuSR" / "train"
    for sub in ("LR", "HR", "Ref_full"):
        (d / sub).mkdir(parents=True)
    lr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(lr).save(d / "LR" / "0001.png")
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(d / "HR" / "0001.png")
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(
        d / "Ref_full" / "0001.png"
    )
    (tmp_path / "DuSR" / "train_center.json").write_text(json.dumps({"0001.png": [16, 48, 24, 72]}))
    (tmp_path / "DuSR" / "notes.json").write_text(json.dumps({"about": "not boxes"}))
    (t,) = load_pairs(tmp_path / "DuSR", "train")
    np.testing.assert_array_equal(t.lrc, lr[8:24, 12:36])
    assert t.ref.shape == (32, 48, 3)
    with pytest.raises(FileNotFoundError, match="LR/ and HR/"):
        load_pairs(tmp_path / "DuSR", "test")


def test_dataset_crops(tmp_path):
    pm = _fake_photo_manifest(tmp_path, n=3)
    prepare_pairs(pm, tmp_path / "pairs", seed=0, train_crops=0)
    pairs = load_pairs(tmp_path / "pairs", "train")
    ds = DualLensDataset(pairs, crop=24, ctx=16, seed=7, p_center=1.0, augment=False)
    a, b = ds[11], ds[11]
    assert a["lr"].shape == (3, 24, 24) and a["hr"].shape == (3, 48, 48)
    assert a["lrc"].shape == (3, 16, 16) and a["ref"].shape == (3, 32, 32)
    assert a["lr"].is_contiguous() and a["lr"].dtype == torch.float32
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(ds[12]["lr"], a["lr"])
    # with p_center=1 and no augmentation the context crop lies inside... the LR crop overlaps it:
    # find the LRC crop inside the LR crop's image by brute force on one sample
    t = pairs[0]
    ds1 = DualLensDataset([t], crop=24, ctx=16, seed=1, p_center=1.0, augment=False)
    for k in range(5):
        it = ds1[k]
        lr = (it["lr"] * 255).round().byte().permute(1, 2, 0).numpy()
        lrc = (it["lrc"] * 255).round().byte().permute(1, 2, 0).numpy()
        H, W = t.lr.shape[:2]
        hits = [
            (y, x)
            for y in range(H - 23)
            for x in range(W - 23)
            if np.array_equal(t.lr[y : y + 24, x : x + 24], lr)
        ]
        chits = [
            (y, x)
            for y in range(H - 15)
            for x in range(W - 15)
            if np.array_equal(t.lr[y : y + 16, x : x + 16], lrc)
        ]
        (y, x), (cy, cx) = hits[0], chits[0]
        assert min(y + 24, cy + 16) - max(y, cy) >= 8 and min(x + 24, cx + 16) - max(x, cx) >= 8
        # both origins even (the whole image's 2-pixel matching cells)
        assert y % 2 == 0 and x % 2 == 0 and cy % 2 == 0 and cx % 2 == 0, (y, x, cy, cx)
    aug = DualLensDataset(pairs, crop=24, ctx=16, seed=7)
    assert aug[3]["hr"].shape == (3, 48, 48)
    # `offset` places the LRC crop inside the LR crop, through every flip and transpose
    overlapping = 0
    for k in range(40):
        it = aug[k]
        dy, dx = it["offset"].tolist()
        assert dy % 2 == 0 and dx % 2 == 0  # LR and LRC cells coincide, through every flip
        ys = range(max(0, -dy), min(16, 24 - dy))
        xs = range(max(0, -dx), min(16, 24 - dx))
        if len(ys) and len(xs):
            overlapping += 1
            lrc = it["lrc"][:, ys.start : ys.stop, xs.start : xs.stop]
            lr = it["lr"][:, ys.start + dy : ys.stop + dy, xs.start + dx : xs.stop + dx]
            torch.testing.assert_close(lr, lrc, rtol=0, atol=0)
    assert overlapping >= 30
    # the true flow travels with the crop: written by prepare_pairs, cropped, flipped, turned
    assert all(t.flow is not None for t in pairs) and aug.with_flow
    for k in range(12):
        plain = DualLensDataset(pairs, crop=24, ctx=16, seed=7, augment=False)[k]
        it = aug[k]
        assert it["flow"].shape == (2, 16, 16)
        # augmentation permutes and negates the plain crop's values, never invents new ones
        torch.testing.assert_close(
            it["flow"].abs().flatten().sort().values, plain["flow"].abs().flatten().sort().values
        )
    with pytest.raises(ValueError, match="smaller than"):
        DualLensDataset(pairs, crop=4096)
    with pytest.raises(ValueError, match="even"):
        DualLensDataset(pairs, crop=24, ctx=15)
    with pytest.raises(ValueError, match="even"):
        DualLensDataset(pairs, crop=25, ctx=16)
