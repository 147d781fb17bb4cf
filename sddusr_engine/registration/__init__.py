"""Finding the telephoto's footprint in the wide image, and resampling it onto the 2×LRC grid.

Conventions (DESIGN section 1):

- A homography H maps telephoto pixel coordinates (x, y, 1) to wide pixel coordinates; pixel
  centres are integers. The footprint polygon is the telephoto's outer edge, the image of its
  corners (−0.5, −0.5), (w − 0.5, −0.5), (w − 0.5, h − 0.5), (−0.5, h − 0.5) (TL, TR, BR, BL).
- The centre box `(y0, y1, x0, x1)` is in wide (LR) pixels, half-open, with even y0, x0 and even
  height and width, and lies inside the footprint: LRC = wide[y0:y1, x0:x1].
- Ref has shape (2·(y1−y0), 2·(x1−x0)); its pixel (u, v) sits at wide pixel
  (x0 + (u + 0.5)/2 − 0.5, y0 + (v + 0.5)/2 − 0.5), so a 2×2 block of Ref covers one LRC pixel.

Method: grayscale, percentile contrast stretch, the telephoto downscaled ×2 so both sides have
about the same density; SIFT + Lowe's ratio test + MAGSAC homography; a colour match of the
telephoto to the wide on the coarse alignment; then ECC (MOTION_HOMOGRAPHY) on the half-size
telephoto against the wide image refines to sub-pixel. A homography cannot follow parallax, so
the resampled Ref is finally refined by a smooth dense flow (`dense_refinement`). The result is checked (inlier count, zoom,
rotation, footprint inside the frame) and `FootprintNotFoundError` explains a failure.
"""

from .colour import COLOUR_RIDGE, colour_match, fit_colour_transform
from .common import AlignedPair, Footprint, FootprintNotFoundError, footprint_from_homography
from .common import footprint_corners as _corners
from .locate import align_reference, estimate_footprint, register
from .resample import (
    REFINE_MAX_PX,
    REFINE_MIN_SIDE,
    REFINE_SMOOTH_PX,
    center_crop_box,
    dense_refinement,
    ref_to_tele_matrix,
    resample_reference,
)

__all__ = [
    "AlignedPair",
    "COLOUR_RIDGE",
    "REFINE_MAX_PX",
    "REFINE_MIN_SIDE",
    "REFINE_SMOOTH_PX",
    "Footprint",
    "FootprintNotFoundError",
    "align_reference",
    "dense_refinement",
    "center_crop_box",
    "colour_match",
    "estimate_footprint",
    "fit_colour_transform",
    "footprint_from_homography",
    "ref_to_tele_matrix",
    "register",
    "resample_reference",
]
# `_corners` stays importable under its old private name for the tests that compare corners.
_ = _corners
