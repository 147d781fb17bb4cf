"""Pictures of a result: the comparison image a person judges, and the matching maps as images.

`comparison_image` lays out an overview of the whole wide photo (the telephoto's footprint and the
two crops drawn on it) beside crops at 1:1 output pixels (2x nearest-neighbour where they are
small): from the centre (bicubic | SR | the registered telephoto) and from a corner outside the
footprint (bicubic | SR). The crops are placed where the SR has the most detail (`choose_crops`),
so they never show a flat patch of sky. `map_images` turns a run's kept maps (`RunInfo.maps`)
into 8-bit images for `sddusr sr --save-maps`. Arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive

MAX_CROP = (
    256  # crop side in output pixels: enough to judge texture; three side by side fit a screen
)
SMALL_CROP = 160  # crops narrower than this are shown 2x (nearest neighbour)
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
FOOTPRINT = (255, 210, 0)  # yellow
CENTRE = (0, 200, 255)  # cyan
CORNER = (255, 80, 200)  # magenta


def bicubic_x2(img: np.ndarray) -> np.ndarray:
    """`img` enlarged twice by bicubic interpolation."""
    h, w = img.shape[:2]
    return cv2.resize(img, (2 * w, 2 * h), interpolation=cv2.INTER_CUBIC)


def to_u8(img: np.ndarray) -> np.ndarray:
    """A uint16 image rounded to uint8; a uint8 image as it is."""
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return img


# ----------------------------------------------------------------------------- choosing crops


@dataclass(frozen=True)
class Crops:
    """Where the comparison's crops lie in the output image (output pixels) and how they show.

    side: the centre crop's side (the corner's is the same or down to half); zoom: 1 or 2
    (nearest neighbour); centre: inside the centre box when there is one; corner: where `corner_place` says ("corner": in a corner and outside the
    footprint, as wanted; "outside the telephoto": no corner is free of it; "corner, under the
    telephoto": nothing is)."""

    side: int
    zoom: int
    centre: Box
    corner: Box
    corner_place: str = "corner"


def detail_cells(img: np.ndarray, cell: int) -> np.ndarray:
    """Mean gradient magnitude of `img` (RGB) in each `cell` x `cell` block (the incomplete blocks
    at the bottom and right are dropped). Computed in strips of rows, so a 48-megapixel output
    needs a few strips' worth of float memory, not the whole image's."""
    h, w = img.shape[:2]
    hc, wc = h // cell, w // cell
    grey = cv2.cvtColor(np.ascontiguousarray(to_u8(img)), cv2.COLOR_RGB2GRAY)
    out = np.zeros((hc, wc), np.float32)
    step = max(1, 1024 // cell) * cell
    for y in range(0, hc * cell, step):
        y1 = min(y + step, hc * cell)
        lo, hi = max(y - 1, 0), min(y1 + 1, h)  # one row either side: the gradient's support
        a = grey[lo:hi].astype(np.float32)
        mag = cv2.magnitude(cv2.Sobel(a, cv2.CV_32F, 1, 0), cv2.Sobel(a, cv2.CV_32F, 0, 1))
        mag = mag[y - lo : y - lo + (y1 - y), : wc * cell]
        out[y // cell : y1 // cell] = mag.reshape(-1, cell, wc, cell).mean(axis=(1, 3))
    return out


def _window_sums(cells: np.ndarray, k: int) -> np.ndarray:
    """Sum of every k x k window of `cells`, indexed by its top-left cell."""
    s = np.pad(cells.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]


def _best(score: np.ndarray, allowed: list[np.ndarray]) -> tuple[int, int, int]:
    """The top-left of the highest-scoring window in the first non-empty of `allowed` (masks),
    and that mask's index; the whole grid when all are empty."""
    for n, ok in enumerate(allowed):
        if ok.any():
            i, j = np.unravel_index(np.argmax(np.where(ok, score, -np.inf)), score.shape)
            return int(i), int(j), n
    i, j = np.unravel_index(np.argmax(score), score.shape)
    return int(i), int(j), len(allowed)


def _grid(h: int, w: int, side: int) -> tuple[int, int]:
    """(cell, k): an even cell size and the crop side in cells (k * cell == side)."""
    cell = max(2, side // 8 // 2 * 2)
    return cell, max(1, side // cell)


def choose_crops(sr: np.ndarray, box_lr: Box | None = None, corners=None) -> Crops:
    """The centre and corner crops of `sr` with the most detail (mean gradient magnitude).

    The centre crop lies inside the centre box (`box_lr` in wide pixels; the middle half of the
    image without one), so the registered telephoto covers it. The corner crop's middle lies in
    the outer quarter of the image both across and down, and the crop lies outside the
    telephoto's footprint (`corners`, 4x2 in wide pixels, centre-of-pixel convention), as large
    as the centre crop or down to half its side; where no such crop fits, anywhere outside the
    footprint, then any corner. Corners are even output
    pixels, so each crop is the x2 of whole wide pixels."""
    h, w = sr.shape[:2]
    if box_lr is not None:
        y0, y1, x0, x1 = (2 * int(v) for v in box_lr)
    else:  # the middle half, on even pixels
        y0, y1, x0, x1 = h // 4 // 2 * 2, 3 * h // 4, w // 4 // 2 * 2, 3 * w // 4
    side = max(2, min(MAX_CROP, y1 - y0, x1 - x0, h // 2 * 2, w // 2 * 2) // 2 * 2)
    cell, k = _grid(h, w, side)
    side = cell * k

    # centre: the box's own cell grid, anchored at its corner (even, since the box's corner is)
    region = detail_cells(sr[y0:y1, x0:x1], cell)
    if region.shape[0] >= k and region.shape[1] >= k:
        i, j, _ = _best(_window_sums(region, k), [])
        centre = (y0 + i * cell, y0 + i * cell + side, x0 + j * cell, x0 + j * cell + side)
    else:  # a box thinner than one cell grid: its top-left corner
        centre = (y0, y0 + side, x0, x0 + side)

    # corner: the whole image's cell grid; windows touching the footprint are ruled out
    cells = detail_cells(sr, cell)
    mask = None
    if corners is not None:
        # output-pixel edges: wide pixel x spans output [2x, 2x + 2); in cell units, cv2's
        # pixel-centre convention (-0.5); dilated one cell so a cell the edge only grazes counts
        pts = ((2 * np.asarray(corners, float) + 1) / cell - 0.5) * 16
        mask = np.zeros(cells.shape, np.uint8)
        cv2.fillPoly(mask, [np.rint(pts).astype(np.int32).reshape(-1, 1, 2)], 1, cv2.LINE_8, 4)
        mask = cv2.dilate(mask, np.ones((3, 3), np.uint8)).astype(np.float32)

    def windows(kk):
        """Detail of every kk-cell window, whether its middle is in a corner, whether it is
        clear of the footprint."""
        score = _window_sums(cells, kk)
        cy = (np.arange(score.shape[0]) * cell + kk * cell / 2)[:, None]
        cx = (np.arange(score.shape[1]) * cell + kk * cell / 2)[None, :]
        in_corner = (np.abs(cy - h / 2) >= h / 4) & (np.abs(cx - w / 2) >= w / 4)
        clear = np.ones_like(in_corner) if mask is None else _window_sums(mask, kk) == 0
        return score, in_corner, clear

    # in a corner and clear of the footprint, the centre crop's size or down to half of it (a
    # telephoto covering most of the frame leaves narrow margins): the largest that holds at
    # least half the detail the best crop of any size holds, so a big crop on a flat margin does
    # not beat a smaller one on detail; else clear anywhere, else in a corner under the footprint
    found = []
    for kk in range(k, (k + 1) // 2 - 1, -1):
        score, in_corner, clear = windows(kk)
        if (in_corner & clear).any():
            i, j, _ = _best(score, [in_corner & clear])
            found.append((score[i, j], kk, i, j))
    if found:
        top = max(f[0] for f in found)
        _, kk, i, j = next(f for f in found if f[0] >= top / 2)
        n = 0
    else:
        kk = k
        score, in_corner, clear = windows(k)
        i, j, n = _best(score, [clear, in_corner])
        n += 1
    corner = (i * cell, (i + kk) * cell, j * cell, (j + kk) * cell)
    zoom = 2 if side < SMALL_CROP else 1
    place = ("corner", "outside the telephoto", "corner, under the telephoto")[min(n, 2)]
    return Crops(side, zoom, centre, corner, place)


def bicubic_crop(wide: np.ndarray, box: Box) -> np.ndarray:
    """bicubic_x2(wide)[y0:y1, x0:x1] for an even box, from a small piece of `wide` (a margin of
    four wide pixels covers the bicubic's support, so the result is the same)."""
    y0, y1, x0, x1 = box
    h, w = wide.shape[:2]
    m = 4
    a0, a1 = max(y0 // 2 - m, 0), min((y1 + 1) // 2 + m, h)
    b0, b1 = max(x0 // 2 - m, 0), min((x1 + 1) // 2 + m, w)
    up = bicubic_x2(wide[a0:a1, b0:b1])
    return up[y0 - 2 * a0 : y1 - 2 * a0, x0 - 2 * b0 : x1 - 2 * b0]


# ----------------------------------------------------------------------------- drawing


@dataclass
class Panel:
    """One picture in the comparison: `name`, its `label`, where it comes from (`source`, output
    pixels; None for the overview), and where it and its label strip lie in the comparison
    (`at` and `label_at`, (y0, y1, x0, x1))."""

    name: str
    label: str
    source: Box | None
    at: Box
    label_at: Box


@dataclass
class Comparison:
    """The comparison image, its panels, and the crops they show."""

    image: np.ndarray
    crops: Crops
    panels: dict[str, Panel] = field(default_factory=dict)


def _font(size: int):
    try:  # Pillow >= 10.1 scales its bundled font; older ones have one bitmap size
        return ImageFont.load_default(size=max(6, int(size)))
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy, text: str, size: int, width: int, fill=TEXT) -> None:
    """`text` at `xy`, its font shrunk until it fits in `width` pixels."""
    font = _font(size)
    while size > 7 and draw.textlength(text, font=font) > width:
        size -= 1
        font = _font(size)
    draw.text(xy, text, fill=fill, font=font)


def _zoomed(img: np.ndarray, zoom: int) -> np.ndarray:
    img = to_u8(img)
    return img if zoom == 1 else np.repeat(np.repeat(img, zoom, axis=0), zoom, axis=1)


def render_comparison(
    wide: np.ndarray,
    sr: np.ndarray,
    corners=None,
    box_lr: Box | None = None,
    ref: np.ndarray | None = None,
    notes: list[str] | None = None,
) -> Comparison:
    """The comparison of `sr` (x2 of `wide`) with its bicubic x2 and, where `ref` (the registered
    telephoto on the 2x grid of `box_lr`) is given, the telephoto. `notes`: short lines printed
    in the free slot beside the corner crops (the registration's figures, say)."""
    wide, sr = to_u8(np.asarray(wide)), to_u8(np.asarray(sr))
    crops = choose_crops(sr, box_lr, corners)
    z, pw = crops.zoom, crops.side * crops.zoom
    fs = int(np.clip(round(pw / 13), 11, 24))  # font size follows the panel size
    lh = round(fs * 1.6) + 6  # a label strip: text and the row's colour bar
    gap = max(6, pw // 24)
    right_w, right_h = 3 * pw + 2 * gap, 2 * (lh + pw) + gap
    title_h = lh
    # the overview: the whole wide photo, as tall as the crops beside it (not wider than twice
    # the crops, for panoramas)
    h, w = wide.shape[:2]
    scale = min((right_h - lh) / h, 2 * right_w / w)
    ov_h, ov_w = max(1, round(h * scale)), max(1, round(w * scale))
    ov_x = gap
    right_x = ov_x + ov_w + 3 * gap
    top = gap + title_h
    canvas = np.full((top + right_h + gap, right_x + right_w + gap, 3), BACKGROUND, np.uint8)
    panels: dict[str, Panel] = {}

    # overview, with the footprint and the crops drawn in their colours
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    ov = np.ascontiguousarray(cv2.resize(wide, (ov_w, ov_h), interpolation=interp))
    thick = max(1, round(ov_w / 300))
    if corners is not None:
        # wide pixel centre x -> overview pixel centre (x + 0.5) * scale - 0.5; 4-bit sub-pixels
        pts = np.rint(((np.asarray(corners, float) + 0.5) * scale - 0.5) * 16).astype(np.int32)
        cv2.polylines(ov, [pts.reshape(-1, 1, 2)], True, FOOTPRINT, thick, cv2.LINE_AA, 4)
    for box, colour in ((crops.centre, CENTRE), (crops.corner, CORNER)):
        y0, y1, x0, x1 = (round(v * scale / 2) for v in box)  # output pixels -> overview
        cv2.rectangle(ov, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thick + 1)
    oy = top + lh
    canvas[oy : oy + ov_h, ov_x : ov_x + ov_w] = ov
    label = "overview: telephoto footprint (yellow)" if corners is not None else "overview"
    panels["overview"] = Panel(
        "overview", label, None, (oy, oy + ov_h, ov_x, ov_x + ov_w), (top, oy, ov_x, ov_x + ov_w)
    )
    # a divider between the overview and the crops
    dx = right_x - 3 * gap // 2
    canvas[top : top + right_h, dx : dx + max(1, gap // 4)] = (90, 90, 90)

    sources = {
        "bicubic": lambda b: bicubic_crop(wide, b),
        "sr": lambda b: sr[b[0] : b[1], b[2] : b[3]],
    }
    rows = [("centre", crops.centre, CENTRE), ("corner", crops.corner, CORNER)]
    for r, (row, box, colour) in enumerate(rows):
        names = ["bicubic", "sr"]
        if row == "centre" and ref is not None and box_lr is not None:
            names.append("telephoto")
        ly = top + r * (lh + pw + gap)
        for c, name in enumerate(names):
            x = right_x + c * (pw + gap)
            if name == "telephoto":
                by, bx = 2 * int(box_lr[0]), 2 * int(box_lr[2])
                img = ref[box[0] - by : box[1] - by, box[2] - bx : box[3] - bx]
            else:
                img = sources[name](box)
            cs = (box[1] - box[0]) * z  # the corner crop may be smaller than its slot
            canvas[ly + lh : ly + lh + cs, x : x + cs] = _zoomed(img, z)
            canvas[ly + lh - 4 : ly + lh - 1, x : x + cs] = colour  # the row's colour bar
            where = row if row == "centre" else crops.corner_place
            what = {"bicubic": "bicubic x2", "sr": "SR x2", "telephoto": "telephoto (registered)"}
            panels[f"{row}/{name}"] = Panel(
                f"{row}/{name}",
                f"{where}: {what[name]}",
                box,
                (ly + lh, ly + lh + cs, x, x + cs),
                (ly, ly + lh, x, x + pw),
            )

    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    zoom_text = "1:1 output pixels" if z == 1 else "2x nearest neighbour of output pixels"
    _text(draw, (gap, gap), f"crops at {zoom_text}", fs, canvas.shape[1] - 2 * gap)
    pad = max(2, (lh - 4 - fs) // 2)
    for p in panels.values():
        y0, _, x0, x1 = p.label_at
        _text(draw, (x0 + 2, y0 + pad), p.label, fs, x1 - x0 - 4)
    if notes:
        y, x = top + lh + pw + gap + lh, right_x + 2 * (pw + gap)
        for line in notes:
            _text(draw, (x, y), line, max(8, fs - 2), pw)
            y += round(fs * 1.4)
    return Comparison(np.asarray(pil).copy(), crops, panels)


def comparison_image(wide, sr, corners=None, box_lr=None, ref=None, notes=None) -> np.ndarray:
    """The comparison picture (see `render_comparison`) as an RGB uint8 array."""
    return render_comparison(wide, sr, corners, box_lr, ref, notes).image


def comparison_from_run(wide, sr, info) -> np.ndarray:
    """The comparison of one `super_resolve` result from its RunInfo: the footprint, the centre
    box and (when the run kept its maps) the registered telephoto `info.maps["ref"]`."""
    fp = info.footprint
    notes = []
    if fp is not None:
        notes = [
            f"telephoto zoom {fp.zoom:.2f}x",
            f"rotation {fp.rotation_deg:+.1f} deg",
            f"registration confidence {fp.confidence:.2f}",
        ]
    else:
        notes = ["no telephoto: SR without the reference"]
    corners = None if fp is None else fp.corners
    return comparison_image(wide, sr, corners, info.box_lr, info.maps.get("ref"), notes)


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
