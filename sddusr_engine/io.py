"""Image I/O at the edge of the engine: files in, RGB arrays and tensors out, and back.

Contract:

- `read_image` returns RGB H×W×3, `uint8`, or `uint16` for 16-bit PNG/TIFF (never silently cut to
  8 bits). Grayscale is replicated to 3 channels, palette and CMYK are converted, EXIF orientation
  is applied. Alpha is composited on white (a transparent pixel shows white, as a viewer shows it,
  rather than whatever colour the encoder left under it); when any pixel is not opaque,
  `read_image(path, notes)` appends a sentence saying so to `notes`, for the caller to warn with.
- Anything that is not a complete, decodable image (missing, a directory, a text file named
  `.png`, a truncated JPEG or PNG) raises `ImageReadError`, a `ValueError` whose one sentence names
  the file. Truncation is detected: Pillow's `LOAD_TRUNCATED_IMAGES` is forced off for our decode,
  and PNG chunk CRCs and the IEND chunk are checked.
- `write_image` is atomic: a temporary file in the target folder, fsync, then `os.replace`, so a
  failure never leaves a half-written or clobbered target. `write_images` writes several so: all
  are encoded and written to temporary files first, and renamed only when every one succeeded.
- `check_writable(files, folders)` raises `OutputError` naming the first output that cannot be
  written (a read-only folder, a path under a file), before any work is done.
- Float images are in [0, 1]; integer images are in [0, 2**bits − 1].
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, OutputError
from .interrupt import OUTPUT_LOCK

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "MIN_SIDE",
    "as_rgb_array",
    "check_size",
    "check_writable",
    "from_tensor",
    "list_images",
    "read_image",
    "to_tensor",
    "write_image",
    "write_images",
]

# The smallest wide (LR) image the commands take: the network's features at half the LR's size
# need 2 pixels a side, its matching 2 of the centre crop's; 8 is a round floor above both.
MIN_SIDE = 8
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_WRITE_SUFFIXES = {".png": 16, ".tif": 16, ".tiff": 16, ".jpg": 8, ".jpeg": 8}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_EXIF_ORIENTATION = 0x0112
_truncation_lock = threading.Lock()


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _strict_truncation():
    # A global flag someone else may have flipped; hold it False for our decode only.
    with _truncation_lock:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: signature(8) length(4) type(4) width(4) height(4) depth(1).
    return data[24] if len(data) > 24 else 8


def _apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation on an H×W(×C) array, matching `PIL.ImageOps.exif_transpose`."""
    if orientation == 2:
        a = a[:, ::-1]
    elif orientation == 3:
        a = a[::-1, ::-1]
    elif orientation == 4:
        a = a[::-1]
    elif orientation == 5:
        a = a.swapaxes(0, 1)
    elif orientation == 6:
        a = np.rot90(a, -1)
    elif orientation == 7:
        a = a[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        a = np.rot90(a, 1)
    return np.ascontiguousarray(a)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    top = 65535 if rgb.dtype == np.uint16 else 255
    a = alpha.astype(np.float64)[..., None] / top
    out = rgb.astype(np.float64) * a + top * (1.0 - a)
    return np.clip(np.rint(out), 0, top).astype(rgb.dtype)


def _flatten(rgb: np.ndarray, alpha: np.ndarray, notes: list[str] | None) -> np.ndarray:
    top = 65535 if alpha.dtype == np.uint16 else 255
    if notes is not None and int(alpha.min()) < top:
        share = float(np.mean(alpha < top))
        notes.append(
            f"{share:.0%} of the pixels are transparent or translucent; they were flattened onto "
            "white (the output has no alpha channel)"
        )
    return _composite_on_white(rgb, alpha)


def _pil_to_rgb(im: Image.Image, notes: list[str] | None = None) -> np.ndarray:
    """A loaded PIL image (any mode) as RGB uint8/uint16 H×W×3, alpha composited on white."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        g = np.asarray(im).astype(np.uint16)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "I":  # 16-bit grayscale PNG on some Pillow versions; values 0..65535
        g = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":  # float TIFF: taken as [0, 1]
        g = np.clip(np.rint(np.asarray(im, dtype=np.float64) * 65535), 0, 65535).astype(np.uint16)
        return np.repeat(g[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"))
        return _flatten(np.ascontiguousarray(rgba[..., :3]), rgba[..., 3], notes)
    return np.asarray(im.convert("RGB")).copy()


def _cv2_16bit(data: bytes, notes: list[str] | None = None) -> np.ndarray | None:
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None or a.dtype != np.uint16:
        return None
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 3:
        return np.ascontiguousarray(a[..., ::-1])
    if a.shape[2] == 4:
        return _flatten(np.ascontiguousarray(a[..., 2::-1]), a[..., 3], notes)
    return None


def read_image(path: str | os.PathLike, notes: list[str] | None = None) -> np.ndarray:
    """Read an image file as RGB H×W×3 uint8 (uint16 for 16-bit PNG/TIFF), EXIF orientation applied.

    Raises `ImageReadError` (a `ValueError`) naming the file when it is missing or not a complete,
    decodable image. `notes`, if given, receives a sentence about what the conversion dropped (a
    transparency flattened onto white).
    """
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ImageReadError(f"cannot read image {str(p)!r}: the path {what}.")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageReadError(f"cannot read image {str(p)!r}: {e.strerror or e}.") from e
    if not data:
        raise ImageReadError(f"cannot read image {str(p)!r}: the file is empty.")

    try:
        with _strict_truncation():
            im = Image.open(_io.BytesIO(data))
            im.load()
        fmt = im.format
        if fmt == "PNG":
            # Pillow decodes a PNG that lost its tail (last IDAT CRC, IEND) without complaint.
            if not data.rstrip(b"\x00").endswith(_PNG_IEND):
                raise OSError("the PNG file is truncated (no IEND chunk at its end)")
            check = Image.open(_io.BytesIO(data))
            check.verify()  # walks every chunk and checks its CRC
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except UnidentifiedImageError as e:
        kinds = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        raise ImageReadError(
            f"cannot read image {str(p)!r}: it is not in an image format that can be decoded "
            f"({kinds})."
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"cannot read image {str(p)!r}: it declares more pixels than can be decoded safely."
        ) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        raise ImageReadError(
            f"cannot read image {str(p)!r}: the data is damaged or incomplete ({msg})."
        ) from e

    dropped: list[str] = []
    rgb = None
    sixteen = (fmt == "PNG" and _png_bit_depth(data) == 16) or (
        fmt == "TIFF" and max(_as_tuple(getattr(im, "tag_v2", {}).get(258, 8))) > 8
    )
    if sixteen:
        # Pillow decodes 16-bit RGB as 8 bits; OpenCV keeps the 16 (but ignores EXIF: applied below).
        rgb = _cv2_16bit(data, dropped)
        if rgb is not None and fmt == "PNG":
            # OpenCV's TIFF decoder applies the orientation tag itself; its PNG decoder does not.
            rgb = _apply_orientation(rgb, orientation)
    if rgb is None:
        try:
            im = ImageOps.exif_transpose(im)
            rgb = _pil_to_rgb(im, dropped)
        except (OSError, ValueError) as e:
            raise ImageReadError(
                f"cannot read image {str(p)!r}: its pixel format ({im.mode}) cannot be converted to RGB ({e})."
            ) from e
    if notes is not None:
        notes.extend(f"{str(p)!r}: {d}" for d in dropped)
    return np.ascontiguousarray(rgb)


def check_size(image: np.ndarray, path: str | os.PathLike, min_side: int = MIN_SIDE) -> None:
    """`ImageReadError` if `image` (read from `path`) is smaller than min_side on either side."""
    h, w = image.shape[:2]
    if min(h, w) < min_side:
        raise ImageReadError(
            f"image {str(path)!r} is {w}x{h} pixels, too small to enlarge: the network needs at "
            f"least {min_side}x{min_side}."
        )


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, tuple | list) else (int(v),)


# ----------------------------------------------------------------------------- conversions


def as_rgb_array(x: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image or array (H×W, H×W×1, H×W×3, H×W×4) as RGB H×W×3.

    uint8 and uint16 stay as they are; bool becomes uint8 {0, 255}; floats become float32 clipped
    to [0, 1]. Alpha is composited on white. Other dtypes raise `ValueError`.
    """
    if isinstance(x, Image.Image):
        x.load()
        return _pil_to_rgb(x)
    if isinstance(x, torch.Tensor):
        raise TypeError(
            "as_rgb_array takes a PIL image or numpy array; use from_tensor for tensors"
        )
    a = np.asarray(x)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)
    elif a.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"image dtype {a.dtype} is not supported: use uint8, uint16 or float in [0, 1]"
        )
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image shape {a.shape} is not H×W, H×W×1, H×W×3 or H×W×4")
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        if a.dtype == np.float32:
            alpha = a[..., 3:4]
            return (a[..., :3] * alpha + (1.0 - alpha)).astype(np.float32)
        return _composite_on_white(np.ascontiguousarray(a[..., :3]), a[..., 3])
    return np.ascontiguousarray(a)


def _peak(dtype: np.dtype) -> float:
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """An image (see `as_rgb_array`) as float32 [1, 3, H, W] in [0, 1] (uint8 / 255, uint16 / 65535)."""
    a = as_rgb_array(img)
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)).astype(np.float32))
    return (t / _peak(a.dtype)).unsqueeze(0)  # [1, 3, H, W]


TO_ARRAY_BAND_VALUES = 1 << 22  # `from_tensor` converts this many values at a time


def from_tensor(t: torch.Tensor, bit_depth: int = 8) -> np.ndarray:
    """A [1, 3, H, W] or [3, H, W] tensor in [0, 1] as an RGB H×W×3 uint8 (or uint16) array."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"from_tensor takes one image, got a batch of shape {tuple(t.shape)}")
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"tensor shape {tuple(t.shape)} is not [1, 3, H, W] or [3, H, W]")
    peak = 255.0 if bit_depth == 8 else 65535.0
    t = t.detach()
    h = t.shape[1]
    out = np.empty((h, t.shape[2], 3), dtype=np.uint8 if bit_depth == 8 else np.uint16)
    # in bands of rows: the float maps of the conversion exist for one band, not the image
    rows = max(1, TO_ARRAY_BAND_VALUES // max(3 * t.shape[2], 1))
    for y0 in range(0, h, rows):
        band = t[:, y0 : y0 + rows].to("cpu", torch.float32).clamp(0, 1).mul_(peak).round_()
        out[y0 : y0 + rows] = band.permute(1, 2, 0).numpy()
    return out


# ----------------------------------------------------------------------------- writing


def write_image(
    path: str | os.PathLike,
    array: np.ndarray,
    bit_depth: int | None = None,
    *,
    jpeg_quality: int = 95,
) -> None:
    """Write an RGB image atomically; the format comes from the suffix (png, jpg, jpeg, tif, tiff).

    `bit_depth` None keeps 16 bits for a uint16 array where the format allows it (PNG, TIFF) and
    writes 8 bits otherwise (float input: 8). JPEG is 8-bit only.
    """
    write_images({path: array}, bit_depth, jpeg_quality=jpeg_quality)


def write_images(
    images: dict[str | os.PathLike, np.ndarray],
    bit_depth: int | None = None,
    *,
    jpeg_quality: int = 95,
    texts: dict[str | os.PathLike, str] | None = None,
) -> None:
    """Write several images (see `write_image`), and `texts` (UTF-8 files such as an HTML
    report), all or none: every one is encoded and written to a temporary file beside its
    target, and the renames happen only once all have succeeded."""
    encoded = [(Path(p), _encode(Path(p), a, bit_depth, jpeg_quality)) for p, a in images.items()]
    encoded += [(Path(p), t.encode("utf-8")) for p, t in (texts or {}).items()]
    with contextlib.ExitStack() as stack:
        for p, data in encoded:
            tmp = stack.enter_context(atomic_output(p))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OutputError:
                raise
            except OSError as e:  # a full disk, a quota: about the target, not the temporary file
                raise _cannot_write(p, p.parent, e) from None


def _encode(p: Path, array: np.ndarray, bit_depth: int | None, jpeg_quality: int) -> bytes:
    suffix = p.suffix.lower()
    if suffix not in _WRITE_SUFFIXES:
        raise ValueError(
            f"cannot write {str(p)!r}: unknown suffix {p.suffix!r} (use .png, .jpg, .jpeg, .tif or .tiff)"
        )
    a = as_rgb_array(array)
    if bit_depth is None:
        bit_depth = 16 if a.dtype == np.uint16 and _WRITE_SUFFIXES[suffix] == 16 else 8
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8, 16 or None, got {bit_depth}")
    if bit_depth > _WRITE_SUFFIXES[suffix]:
        raise ValueError(f"cannot write {str(p)!r} with {bit_depth} bits: {suffix} holds 8 bits")
    a = _to_depth(a, bit_depth)

    params: list[int] = []
    if suffix in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
    ok, buf = cv2.imencode(suffix, np.ascontiguousarray(a[..., ::-1]), params)  # OpenCV wants BGR
    if not ok:
        raise OSError(f"cannot encode {str(p)!r} as {suffix}")
    return buf.tobytes()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; when the block succeeds, give it the mode a plain
    open() would (or the old file's) and rename it over `path`. On failure nothing is left behind
    and an existing file is untouched: nothing is ever half-written."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    # held while the temporary file exists: a hard exit on Ctrl-C waits for the rename
    with OUTPUT_LOCK:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise _cannot_write(p, folder, e) from None
        os.close(fd)
        try:
            yield Path(tmp)
            # mkstemp creates 0600; give the file the mode a plain open() would (or the old file's).
            os.chmod(tmp, p.stat().st_mode & 0o7777 if p.exists() else 0o666 & ~_umask())
            try:
                os.replace(tmp, p)
            except OSError as e:
                raise _cannot_write(p, folder, e) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _cannot_write(target: Path, folder: Path, e: OSError) -> OutputError:
    """One sentence about `target`, never about the hidden temporary file that failed."""
    if target.is_dir():
        return OutputError(f"cannot write {str(target)!r}: it is a folder.")
    why = (e.strerror or str(e)).lower()
    return OutputError(f"cannot write {str(target)!r} in the folder {str(folder)!r} ({why}).")


def check_writable(
    files: Iterable[str | os.PathLike | None] = (),
    folders: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Raise `OutputError` for the first output that could not be written: a file path that is a
    folder or lies under a file, a folder that is a file, a folder (or, for one that does not exist
    yet, its nearest existing parent) where no file can be created. None entries are ignored.
    Nothing is left behind: the probe file is removed."""
    targets = [(Path(f), Path(f).parent, True) for f in files if f is not None]
    targets += [(Path(d), Path(d), False) for d in folders if d is not None]
    for target, folder, is_file in targets:
        if is_file and target.is_dir():
            raise OutputError(f"cannot write {str(target)!r}: it is a folder.")
        folder = folder if str(folder) else Path(".")
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            what = "it" if existing == target else repr(str(existing))
            raise OutputError(f"cannot write {str(target)!r}: {what} is a file, not a folder.")
        try:
            fd, probe = tempfile.mkstemp(prefix=".sddusr-probe.", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            why = (e.strerror or str(e)).lower()
            raise OutputError(
                f"cannot write {str(target)!r}: the folder {str(existing)!r} is not writable "
                f"({why})."
            ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _to_depth(a: np.ndarray, bit_depth: int) -> np.ndarray:
    if bit_depth == 8:
        if a.dtype == np.uint8:
            return a
        if a.dtype == np.uint16:
            return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return np.rint(a * 255.0).astype(np.uint8)
    if a.dtype == np.uint16:
        return a
    if a.dtype == np.uint8:
        return a.astype(np.uint16) * 257
    return np.rint(a * 65535.0).astype(np.uint16)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder` (by suffix, case-insensitive), sorted by name."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder {str(d)!r} does not exist or is not a directory")
    return sorted(
        (f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda f: f.name,
    )
