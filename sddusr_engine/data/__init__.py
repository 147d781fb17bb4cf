"""Training data: photos from Debian packages, a dual-lens camera simulator, the writer of the
published layout, and training crops.

- `photos.fetch_photos(cache)`: the photos and their licences, in a cache outside the repository;
- `camera.make_pair(photo, rng)`: one wide / telephoto triplet with its truth;
- `prepare.prepare_pairs(photo_manifest, out)`: a dataset in KeDuSR's layout, split by photo;
- `crops.DualLensDataset(triplets)`: random training crops, deterministic in (seed, index).

`python -m sddusr_engine.data {fetch,prepare,all}` runs the first three. The layout is read by
`sddusr_engine.datasets`.
"""

from .camera import REF_ALIGNMENTS, PairParams, make_pair, sample_params
from .crops import DualLensDataset
from .photos import DEFAULT_CACHE, PHOTO_PACKAGES, fetch_photos, license_for, parse_dep5
from .prepare import BOX_FILE, SPLITS, prepare_pairs

__all__ = [
    "BOX_FILE",
    "DEFAULT_CACHE",
    "PHOTO_PACKAGES",
    "REF_ALIGNMENTS",
    "SPLITS",
    "DualLensDataset",
    "PairParams",
    "fetch_photos",
    "license_for",
    "make_pair",
    "parse_dep5",
    "prepare_pairs",
    "sample_params",
]
