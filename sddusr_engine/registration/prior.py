"""The zoom prior from the photos' EXIF focal lengths: the telephoto's field of view relative to
the wide's, which narrows the registration's zoom search.

With `FocalLengthIn35mmFilm` in both files the ratio is the ratio of fields of view, whatever the
sensors; with only `FocalLength` it is that only when both lenses have the same sensor size, so
the search window around it is wider. The zoom in pixels also scales with the two images' widths
(a telephoto saved at a smaller size has fewer pixels per degree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

_EXIF_IFD = 0x8769
_FOCAL_LENGTH = 0x920A
_FOCAL_35MM = 0xA405
WINDOW_35MM = 0.08  # EXIF values are rounded to whole millimetres: ±8 % around the ratio
WINDOW_FOCAL = 0.25  # sensor sizes differ between lenses


@dataclass(frozen=True)
class ZoomPrior:
    """`zoom` (telephoto pixels per wide pixel), the window `(low, high)` to search, and `note`,
    the sentence the footprint carries."""

    zoom: float
    window: tuple[float, float]
    note: str


def focal_lengths(source) -> tuple[float | None, float | None]:
    """(FocalLength in mm, FocalLengthIn35mmFilm in mm) of an image file or PIL image; None where
    absent or unreadable."""
    try:
        if isinstance(source, Image.Image):
            exif = source.getexif()
        elif isinstance(source, (str, os.PathLike)):
            with Image.open(source) as im:
                exif = im.getexif()
        else:
            return None, None
        sub = exif.get_ifd(_EXIF_IFD)
    except (OSError, ValueError, SyntaxError):
        return None, None

    def number(tag):
        v = sub.get(tag, exif.get(tag))
        try:
            v = float(v)
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        return v if v > 0 else None

    return number(_FOCAL_LENGTH), number(_FOCAL_35MM)


def zoom_prior(wide_source, tele_source, wide_width: int, tele_width: int) -> ZoomPrior | None:
    """The prior from both photos' EXIF, or None when either lacks a focal length."""
    fw, fw35 = focal_lengths(wide_source)
    ft, ft35 = focal_lengths(tele_source)
    if fw35 and ft35:
        ratio, window, what = ft35 / fw35, WINDOW_35MM, f"{ft35:g} mm / {fw35:g} mm (35 mm equiv.)"
    elif fw and ft:
        ratio, window, what = ft / fw, WINDOW_FOCAL, f"{ft:g} mm / {fw:g} mm"
    else:
        return None
    zoom = ratio * tele_width / wide_width
    note = f"EXIF focal lengths {what} give a zoom prior of x{zoom:.2f}, searched within ±{window:.0%}."
    return ZoomPrior(zoom, (zoom * (1 - window), zoom * (1 + window)), note)


def exif_zoom(wide_file, tele_file, wide, tele) -> ZoomPrior | None:
    """The zoom prior of two image files whose pixels are the arrays `wide` and `tele` (their
    widths scale it), or None when either file has no focal length."""
    return zoom_prior(wide_file, tele_file, wide.shape[1], tele.shape[1])
