"""The one reader of the published dataset layout: its folders, its centre boxes, its triplets.

Layout (KeDuSR's, and what `python -m sddusr_engine.data prepare` writes): `ROOT/<split>/` (or
`ROOT/` itself) holds `LR/`, `HR/`, optionally `LR_center/`, a reference folder (`Ref_SIFT/`,
else `Ref/`, else `Ref_full/`) and, for synthetic pairs, `Flow/<name>.npy`. Any `*.json` file
mapping `<name>.png` (or `<name>`) to `[y0, y1, x0, x1]` gives the centre rect in HR pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import DatasetError
from .io import IMAGE_SUFFIXES, read_image

__all__ = [
    "ALIGNED_REF_DIRS",
    "Triplet",
    "images_by_stem",
    "load_boxes",
    "load_pairs",
    "load_triplets",
    "published_dir",
    "read_boxes",
    "read_boxes_file",
]

ALIGNED_REF_DIRS = ("Ref_SIFT", "Ref")  # references already on LR_center's 2x grid
Box = tuple[int, int, int, int]


def images_by_stem(folder: Path | str) -> dict[str, list[Path]]:
    """The image files in `folder` (not hidden), grouped by name without suffix, sorted; {} when
    the folder does not exist. A stem with two files is a doubled image the caller reports."""
    found: dict[str, list[Path]] = {}
    d = Path(folder)
    if not d.is_dir():
        return found
    for p in sorted(d.iterdir(), key=lambda q: q.name):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            found.setdefault(p.stem, []).append(p)
    return found


def _is_box_table(obj: object) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(v, list | tuple) and len(v) == 4 for v in obj.values()
    )


def _stem_keys(obj: dict) -> dict[str, Box]:
    return {Path(str(k)).stem: tuple(int(x) for x in v) for k, v in obj.items()}  # type: ignore[misc]


def read_boxes(*folders: Path | str) -> dict[str, Box]:
    """Centre rects `<stem> -> (y0, y1, x0, x1)` (HR pixels) from the JSON files in `folders`.

    Keys are stored by stem, so `"0001.png"` and `"0001"` both match image `0001.png`. JSON files
    that are unreadable or not a non-empty table of 4-number lists are ignored; later folders
    override earlier ones.
    """
    boxes: dict[str, Box] = {}
    for d in map(Path, folders):
        if not d.is_dir():
            continue
        for j in sorted(d.glob("*.json")):
            try:
                obj = json.loads(j.read_text())
            except (OSError, ValueError):
                continue
            if obj and _is_box_table(obj):
                boxes.update(_stem_keys(obj))
    return boxes


def read_boxes_file(path: Path | str, error: type[DatasetError] = DatasetError) -> dict[str, Box]:
    """The centre rects of one explicit boxes file; raises `error` (a `DatasetError`) if unusable."""
    path = Path(path)
    if not path.is_file():
        raise error(f"boxes file {str(path)!r} does not exist.")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"boxes file {str(path)!r} is not readable JSON ({e}).") from None
    if not _is_box_table(obj):
        raise error(
            f"boxes file {str(path)!r} must map each image name to [y0, y1, x0, x1] in HR pixels."
        )
    return _stem_keys(obj)


def published_dir(
    root: Path | str, required: tuple[str, ...] = ("LR",), aligned_ref: bool = True
) -> Path | None:
    """`root` or `root/test`, the first that holds every `required` folder and (with
    `aligned_ref`) one of ALIGNED_REF_DIRS; else None."""
    root = Path(root)
    for d in (root, root / "test"):
        if all((d / r).is_dir() for r in required) and (
            not aligned_ref or any((d / r).is_dir() for r in ALIGNED_REF_DIRS)
        ):
            return d
    return None


def load_boxes(root: Path | str, split: str | None = None) -> dict[str, Box]:
    """The centre rects of the JSON files of `root` and `root/split` (see `read_boxes`)."""
    root = Path(root)
    return read_boxes(root, *([root / split] if split else []))


@dataclass
class Triplet:
    """One pair as uint8 HWC arrays: LR, HR, LRC, Ref (on the 2xLRC grid) and the centre rect."""

    name: str
    lr: np.ndarray
    hr: np.ndarray
    lrc: np.ndarray
    ref: np.ndarray
    box_hr: list[int]  # [y0, y1, x0, x1] in HR pixels
    flow: np.ndarray | None = None  # true Ref->LRC flow [hc,wc,2] (dx, dy), synthetic pairs only


def _find_image(folder: Path, name: str) -> Path | None:
    stem = Path(name).stem
    for ext in IMAGE_SUFFIXES:
        p = folder / (stem + ext)
        if p.is_file():
            return p
    return None


def load_triplets(
    root: Path | str, split: str = "train", limit: int | None = None
) -> list[Triplet]:
    """Read `root/split` in either layout: ours/KeDuSR test (`LR, HR, LR_center, Ref_SIFT`) or
    KeDuSR train (`LR, HR, Ref_full`). LRC falls back to the LR crop by the box; Ref to
    `Ref_full` resized (bicubic) onto the 2xLRC grid when its size differs."""
    root = Path(root)
    d = root / split
    if not (d / "LR").is_dir() or not (d / "HR").is_dir():
        raise FileNotFoundError(f"{d} has no LR/ and HR/ folders (expected the KeDuSR layout)")
    boxes = load_boxes(root, split)
    names = [paths[0].name for paths in images_by_stem(d / "LR").values()]
    if limit:
        names = names[:limit]
    out = []
    for name in names:
        box = boxes.get(Path(name).stem)
        if box is None:
            raise KeyError(f"no centre box for {name} in the JSON files of {root} or {d}")
        y0, y1, x0, x1 = box
        if (y1 - y0) % 4 or (x1 - x0) % 4 or y0 % 2 or x0 % 2:
            raise ValueError(
                f"{name}: box {list(box)} must give an even-sized LRC (sides % 4 == 0)"
            )
        lr = read_image(d / "LR" / name)
        hr_p = _find_image(d / "HR", name)
        if hr_p is None:
            raise FileNotFoundError(f"{d / 'HR'} has no image for {name}")
        hr = read_image(hr_p)
        if hr.shape[0] != 2 * lr.shape[0] or hr.shape[1] != 2 * lr.shape[1]:
            raise ValueError(f"{name}: HR {hr.shape[:2]} is not twice LR {lr.shape[:2]}")
        lrc_p = _find_image(d / "LR_center", name) if (d / "LR_center").is_dir() else None
        lrc = read_image(lrc_p) if lrc_p else lr[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
        ref_p = None
        for sub in ("Ref_SIFT", "Ref_full", "Ref"):
            if (d / sub).is_dir():
                ref_p = _find_image(d / sub, name)
                if ref_p:
                    break
        if ref_p is None:
            raise FileNotFoundError(f"no Ref_SIFT/, Ref_full/ or Ref/ image for {name} in {d}")
        ref = read_image(ref_p)
        rh, rw = 2 * lrc.shape[0], 2 * lrc.shape[1]
        if ref.shape[:2] != (rh, rw):
            ref = cv2.resize(ref, (rw, rh), interpolation=cv2.INTER_CUBIC)
        flow = None
        flow_p = d / "Flow" / (Path(name).stem + ".npy")
        if flow_p.is_file():  # written by prepare_pairs; a resized Ref would invalidate it
            flow = np.load(flow_p)
            if flow.shape != (*lrc.shape[:2], 2) or ref_p.parent.name != "Ref_SIFT":
                flow = None
        out.append(Triplet(name, lr, hr, np.ascontiguousarray(lrc), ref, list(box), flow))
    return out


load_pairs = load_triplets
