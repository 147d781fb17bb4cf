"""Near-identical photos: `collapse_copies(photos)` groups photos whose perceptual hashes (a
DCT hash of a small grey thumbnail, `dct_hash`) differ in at most `HAMMING_MAX` of 64 bits, and
keeps one photo of each group, the largest, so that no photo reaches two splits as a resized or
re-encoded copy of itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

# On the fetched set (168 files, 2026-12-04) the hashes of resized or re-encoded copies differ in
# 0-6 bits, those of distinct photos in 16 or more (a sea and an eclipse; a stereo pair's two
# views, aloeL/aloeR, differ in 16 too, so second views are left out by name in PHOTO_PACKAGES).
HAMMING_MAX = 10
DEDUP_RULE = (
    f"DCT hash of a 32x32 grey thumbnail (8x8 lowest frequencies vs their median); "
    f"Hamming <= {HAMMING_MAX} of 64 bits -> one group, the largest photo kept"
)


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
            w, h = h, w
    return w, h


def dct_hash(path: Path | str) -> int:
    """64-bit perceptual hash: the signs, against their median, of the 8x8 lowest DCT frequencies
    of the photo's 32x32 grey thumbnail. Resizing and JPEG re-encoding barely change it."""
    with Image.open(path) as im:
        im.draft("L", (128, 128))  # JPEG: decode at a reduced scale, much faster
        grey = ImageOps.exif_transpose(im).convert("L").resize((32, 32), Image.BOX)
    low = cv2.dct(np.asarray(grey, np.float32))[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term is left out of the median: it is the brightness
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _rank(e: dict) -> tuple:
    lossy = Path(e["path"]).suffix.lower() in (".jpg", ".jpeg")
    return (-e["size"][0] * e["size"][1], lossy, e["id"])


def collapse_copies(
    photos: Sequence[dict], hamming_max: int = HAMMING_MAX
) -> tuple[list[dict], list[dict]]:
    """(kept, dropped) from photo entries with `id`, `path` and `size` ([h, w]).

    Every entry gets `phash` (16 hex digits). Photos within `hamming_max` bits of each other,
    directly or through a chain, form one group; the largest (then the first id) is kept and
    lists the others' ids under `copies`; each dropped one names it in `duplicate_of`.
    """
    entries = [dict(e) for e in photos]
    hashes = [dct_hash(e["path"]) for e in entries]
    for e, h in zip(entries, hashes, strict=True):
        e["phash"] = f"{h:016x}"
    parent = list(range(len(entries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            if hamming(hashes[i], hashes[j]) <= hamming_max:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(entries)):
        groups.setdefault(find(i), []).append(i)
    kept, dropped = [], []
    for members in groups.values():
        # the most pixels; on a tie a lossless file before a JPEG; then the first id
        best = min(members, key=lambda i: _rank(entries[i]))
        others = sorted((i for i in members if i != best), key=lambda i: entries[i]["id"])
        if others:
            entries[best]["copies"] = [entries[i]["id"] for i in others]
        kept.append(entries[best])
        for i in others:
            dropped.append(
                {
                    **entries[i],
                    "duplicate_of": entries[best]["id"],
                    "hamming": hamming(hashes[i], hashes[best]),
                }
            )
    kept.sort(key=lambda e: e["id"])
    dropped.sort(key=lambda e: e["id"])
    return kept, dropped
