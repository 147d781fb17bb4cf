"""Image I/O: formats, bit depths, modes, EXIF orientation, damaged files, atomic writes."""

import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sddusr_engine.errors import OutputError
from sddusr_engine.io import (
    ImageReadError,
    _apply_orientation,
    as_rgb_array,
    check_size,
    check_writable,
    from_tensor,
    list_images,
    read_image,
    to_tensor,
    write_image,
    write_images,
)


def _rgb8(h=24, w=36, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rgb16(h=24, w=36, seed=0):
    return np.random.default_rng(seed).integers(0, 65536, (h, w, 3), dtype=np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_16bit_roundtrip_exact(tmp_path, suffix):
    a = _rgb16()
    p = tmp_path / f"x{suffix}"
    write_image(p, a)
    b = read_image(p)
    assert b.dtype == np.uint16 and b.shape == a.shape
    np.testing.assert_array_equal(b, a)


def test_16bit_png_written_by_opencv_keeps_channel_order(tmp_path):
    a = _rgb16()
    p = tmp_path / "cv.png"
    cv2.imwrite(str(p), a[..., ::-1].copy())  # BGR on disk
    np.testing.assert_array_equal(read_image(p), a)


def test_16bit_gray_png(tmp_path):
    g = np.random.default_rng(1).integers(0, 65536, (10, 14), dtype=np.uint16)
    p = tmp_path / "g16.png"
    cv2.imwrite(str(p), g)
    b = read_image(p)
    assert b.dtype == np.uint16 and b.shape == (10, 14, 3)
    for c in range(3):
        np.testing.assert_array_equal(b[..., c], g)


def test_8bit_png_roundtrip_exact(tmp_path):
    a = _rgb8()
    write_image(tmp_path / "x.png", a)
    b = read_image(tmp_path / "x.png")
    assert b.dtype == np.uint8
    np.testing.assert_array_equal(b, a)


def test_jpeg_roundtrip_close(tmp_path):
    a = cv2.GaussianBlur(_rgb8(64, 64), (0, 0), 3)
    write_image(tmp_path / "x.jpg", a)
    b = read_image(tmp_path / "x.jpg")
    assert b.dtype == np.uint8 and b.shape == a.shape
    assert np.abs(b.astype(int) - a.astype(int)).mean() < 3.0


def test_uint16_to_jpeg_becomes_8bit(tmp_path):
    a = np.full((8, 8, 3), 65535, np.uint16)
    a[..., 1] = 257 * 100
    write_image(tmp_path / "x.jpeg", a)
    b = read_image(tmp_path / "x.jpeg")
    assert b.dtype == np.uint8
    assert abs(int(b[4, 4, 1]) - 100) <= 2 and b[4, 4, 0] >= 250
    with pytest.raises(ValueError, match="8 bits"):
        write_image(tmp_path / "y.jpg", a, bit_depth=16)


def test_bit_depth_conversion_on_write(tmp_path):
    a = _rgb8()
    write_image(tmp_path / "x.png", a, bit_depth=16)
    b = read_image(tmp_path / "x.png")
    assert b.dtype == np.uint16
    np.testing.assert_array_equal(b, a.astype(np.uint16) * 257)
    write_image(tmp_path / "y.png", b, bit_depth=8)
    np.testing.assert_array_equal(read_image(tmp_path / "y.png"), a)


def test_grayscale_palette_cmyk_rgba_come_back_rgb(tmp_path):
    rgb = _rgb8()
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    g = read_image(tmp_path / "g.png")
    assert g.shape == (24, 36, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[..., 2], rgb[..., 0])

    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    p = read_image(tmp_path / "p.png")
    assert p.shape == (24, 36, 3)
    np.testing.assert_array_equal(p, np.asarray(pal.convert("RGB")))

    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg")
    cmyk.save(tmp_path / "c.tif")
    for name in ("c.jpg", "c.tif"):
        c = read_image(tmp_path / name)
        assert c.shape == (24, 36, 3) and c.dtype == np.uint8
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif"), np.asarray(cmyk.convert("RGB")))

    rgba = np.dstack([rgb, np.zeros((24, 36), np.uint8)])
    rgba[:12, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = read_image(tmp_path / "a.png")
    assert a.shape == (24, 36, 3)
    np.testing.assert_array_equal(a[:12], rgb[:12])  # opaque: unchanged
    assert (a[12:] == 255).all()  # transparent: composited on white


def test_exif_orientation_rotates(tmp_path):
    a = _rgb8(20, 30)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    im.save(tmp_path / "o.png", exif=exif)
    b = read_image(tmp_path / "o.png")
    assert b.shape == (30, 20, 3)
    np.testing.assert_array_equal(b, np.rot90(a, -1))
    assert read_image(tmp_path / "o.jpg").shape == (30, 20, 3)


def _png_with_exif_orientation(png: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()
    payload = payload[6:] if payload.startswith(b"Exif\x00\x00") else payload
    body = b"eXIf" + payload
    chunk = struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))
    i = png.index(b"IDAT") - 4
    return png[:i] + chunk + png[i:]


def test_exif_orientation_16bit_png_and_tiff(tmp_path):
    a = _rgb16(20, 30)
    ok, buf = cv2.imencode(".png", a[..., ::-1].copy())
    (tmp_path / "e.png").write_bytes(_png_with_exif_orientation(buf.tobytes(), 6))
    b = read_image(tmp_path / "e.png")
    assert b.dtype == np.uint16
    np.testing.assert_array_equal(b, np.rot90(a, -1))

    g16 = (np.random.default_rng(0).integers(0, 256, (20, 30)) * 257).astype(np.uint16)
    for o in (3, 6, 8):
        for arr, name in ((g16, "16"), ((g16 // 257).astype(np.uint8), "8")):
            im = Image.fromarray(arr)
            exif = im.getexif()
            exif[0x0112] = o
            im.save(tmp_path / f"o{name}.tif", exif=exif)
        r16, r8 = read_image(tmp_path / "o16.tif"), read_image(tmp_path / "o8.tif")
        assert r16.dtype == np.uint16
        np.testing.assert_array_equal(r16[..., 0], _apply_orientation(g16, o))
        np.testing.assert_array_equal(r16 // 257, r8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_pil(orientation):
    a = _rgb8(5, 7)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    want = np.asarray(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(_apply_orientation(a, orientation), want)


def _damaged_files(tmp_path):
    a = cv2.GaussianBlur(_rgb8(120, 160), (0, 0), 1)
    write_image(tmp_path / "ok.jpg", a)
    write_image(tmp_path / "ok.png", a)
    jb = (tmp_path / "ok.jpg").read_bytes()
    pb = (tmp_path / "ok.png").read_bytes()
    files = {
        "trunc_half.jpg": jb[: len(jb) // 2],
        "trunc_tail.jpg": jb[:-300],
        "trunc_half.png": pb[: len(pb) // 2],
        "trunc_end.png": pb[:-2],
        "trunc_iend.png": pb[:-20],
        "text.png": b"this is not an image\n",
        "empty.jpg": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return list(files)


def test_damaged_files_raise_image_read_error(tmp_path):
    for name in _damaged_files(tmp_path):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    assert issubclass(ImageReadError, ValueError)


def test_truncation_detected_even_if_flag_was_set(tmp_path, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _damaged_files(tmp_path)
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "trunc_tail.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_atomic_write_leaves_no_temp_and_does_not_clobber(tmp_path, monkeypatch):
    a = _rgb8()
    p = tmp_path / "x.png"
    write_image(p, a)
    assert [f.name for f in tmp_path.iterdir()] == ["x.png"]
    before = p.read_bytes()

    import sddusr_engine.io as sio

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_image(p, 255 - a)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["x.png"]

    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "x.gif", a)


def test_from_tensor_in_bands_of_rows_leaves_its_input_alone(monkeypatch):
    from sddusr_engine import io as imageio

    monkeypatch.setattr(imageio, "TO_ARRAY_BAND_VALUES", 3 * 9 * 2)  # 2 rows per band
    t = torch.rand(1, 3, 7, 9) * 1.4 - 0.2
    before = t.clone()
    want = (t[0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    got = from_tensor(t)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    assert torch.equal(t, before)


def test_tensor_conversions():
    a8 = _rgb8(6, 9)
    t = to_tensor(a8)
    assert t.shape == (1, 3, 6, 9) and t.dtype == torch.float32
    assert torch.allclose(t[0, 1], torch.from_numpy(a8[..., 1] / 255.0).float())
    np.testing.assert_array_equal(from_tensor(t), a8)

    a16 = _rgb16(6, 9)
    t16 = to_tensor(a16)
    assert float(t16.max()) <= 1.0
    np.testing.assert_array_equal(from_tensor(t16, bit_depth=16), a16)
    np.testing.assert_array_equal(from_tensor(t16[0], bit_depth=16), a16)
    assert from_tensor(torch.full((1, 3, 2, 2), 2.0)).max() == 255  # clamped

    f = np.random.default_rng(0).random((4, 5, 3)).astype(np.float64)
    assert torch.allclose(to_tensor(f)[0].permute(1, 2, 0), torch.from_numpy(f).float())
    with pytest.raises(ValueError):
        from_tensor(torch.zeros(2, 3, 4, 4))


def test_as_rgb_array_inputs():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_rgb_array(g).shape == (3, 4, 3)
    assert as_rgb_array(g[..., None]).shape == (3, 4, 3)
    rgba = np.zeros((3, 4, 4), np.uint16)
    rgba[..., 3] = 65535
    rgba[..., 0] = 1000
    out = as_rgb_array(rgba)
    assert out.dtype == np.uint16 and (out[..., 0] == 1000).all() and (out[..., 1] == 0).all()
    fa = np.zeros((3, 4, 4), np.float32)  # fully transparent float: white
    assert (as_rgb_array(fa) == 1.0).all()
    pil = Image.fromarray(_rgb8(5, 6)).convert("L")
    assert as_rgb_array(pil).shape == (5, 6, 3)
    assert as_rgb_array(Image.fromarray(_rgb8(5, 6))).dtype == np.uint8
    with pytest.raises(ValueError):
        as_rgb_array(np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError):
        as_rgb_array(np.zeros((3, 4, 2), np.uint8))


def test_list_images(tmp_path):
    for n in ["b.PNG", "a.jpg", "c.tiff", "notes.txt", "d.jpeg"]:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.tiff", "d.jpeg"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


def test_unreadable_image_sentence_names_no_internal_object(tmp_path):
    (tmp_path / "t.png").write_text("text")
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "t.png")
    msg = str(e.value)
    assert "not in an image format that can be decoded (png, jpg" in msg
    assert "BytesIO" not in msg and "0x" not in msg and msg.endswith(".")


def test_alpha_dropped_is_noted_opaque_and_gray_are_not(tmp_path):
    rgba = np.full((10, 10, 4), 200, np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    rgba[:5, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    Image.fromarray(rgba[..., 0], "L").save(tmp_path / "gray.png")
    notes: list[str] = []
    assert read_image(tmp_path / "opaque.png", notes).shape == (10, 10, 3) and notes == []
    gray = read_image(tmp_path / "gray.png", notes)
    assert gray.shape == (10, 10, 3) and notes == []  # three equal channels: nothing dropped
    half = read_image(tmp_path / "half.png", notes)
    assert (half[:5] == 255).all() and (half[5:] == 200).all()  # flattened onto white
    assert len(notes) == 1 and "half.png': 50% of the pixels are transparent" in notes[0]
    deep = np.full((4, 4, 4), 40000, np.uint16)
    deep[..., 3] = 65535
    deep[0, 0, 3] = 0
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    read_image(tmp_path / "deep.png", notes)
    assert len(notes) == 2 and "deep.png': 6% of the pixels" in notes[1]


def test_check_size_says_the_minimum():
    check_size(np.zeros((8, 8, 3), np.uint8), "ok.png")
    with pytest.raises(ImageReadError, match=r"'dot.png' is 1x2 pixels.*at least 8x8\."):
        check_size(np.zeros((2, 1, 3), np.uint8), "dot.png")


def test_write_images_is_all_or_none(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    (tmp_path / "file").write_text("a file where a folder should be")
    (tmp_path / "kept.png").write_text("old")
    with pytest.raises(OutputError, match="cannot write"):
        write_images({tmp_path / "new.png": a, tmp_path / "kept.png": a,
                      tmp_path / "file" / "x.png": a})  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept.png"]  # no temporaries
    assert (tmp_path / "kept.png").read_text() == "old"
    write_images({tmp_path / "new.png": a, tmp_path / "kept.png": a})
    assert read_image(tmp_path / "kept.png").shape == (4, 4, 3)


def test_check_writable_before_the_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    check_writable([tmp_path / "a" / "b" / "o.png", None], [tmp_path / "new" / "maps"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # made nothing
    check_writable(
        folders=[tmp_path / "dir"]
    )  # an existing output folder is fine (a resumed batch)
    with pytest.raises(OutputError, match=r"/file' is a file, not a folder\."):
        check_writable([tmp_path / "file" / "o.png"])
    with pytest.raises(OutputError, match=r"dir': it is a folder\."):
        check_writable([tmp_path / "dir"])
    with pytest.raises(OutputError, match=r"file': it is a file, not a folder\."):
        check_writable(folders=[tmp_path / "file"])


def test_unwritable_folder_names_the_target_not_the_temporary(tmp_path, monkeypatch):
    """A folder where no file can be made (read-only; root ignores the mode, so the refusal is
    simulated): the sentence names the output, not the hidden temporary file."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".o.png.x1.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError) as e:
        check_writable([tmp_path / "o.png"])
    assert "is not writable (permission denied)" in str(e.value) and ".tmp" not in str(e.value)
    with pytest.raises(OutputError) as e:
        write_image(tmp_path / "o.png", np.zeros((4, 4, 3), np.uint8))
    assert str(e.value).startswith(f"cannot write {str(tmp_path / 'o.png')!r}")
    assert ".tmp" not in str(e.value) and "(permission denied)" in str(e.value)
