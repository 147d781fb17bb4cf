"""`sddusr eval`: PSNR and SSIM on a dataset in the published layout, as the papers report them.

Protocol (DESIGN section 1, `metrics.py` for the formulas): RGB in [0, 255], no border shave, the
network's float output clamped to [0, 1] and scaled by 255 without rounding; full image, centre
rect and corner region (everything outside it, pooled by area). Three rows per image:

- `sr`: the network with its reference (`Engine.run(LR, LRC, Ref)`);
- `no_ref`: the same network with the reference switched off (`Engine.run_without_reference`);
- `bicubic`: LR enlarged ×2 by PyTorch's bicubic (align_corners=False), clamped, not rounded.

Layout: `DATASET/test/{LR, HR, LR_center, Ref_SIFT}/<name>.png` (or `DATASET/{LR, ...}`), and a JSON
file mapping `<name>.png` to the centre rect `[y0, y1, x0, x1]` in HR pixels (any `*.json` in the
dataset root, its `test/` folder or the folder above, or an explicit `boxes` file). Without
`LR_center/`, LRC is cut from LR with the rect halved.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batch import find_boxes
from .errors import EvalError
from .io import IMAGE_SUFFIXES, read_image, to_tensor
from .low_band import lr_box
from .metrics import region_metrics
from .model.network import upsample_bicubic

__all__ = [
    "METHODS",
    "METRICS",
    "EvalError",
    "EvalItem",
    "bicubic_x2",
    "evaluate",
    "find_dataset",
    "write_csv",
    "write_json",
]

METHODS = ("sr", "no_ref", "bicubic")
METRICS = ("psnr", "psnr_center", "psnr_corner", "ssim", "ssim_center", "ssim_corner")


@dataclass(frozen=True)
class EvalItem:
    name: str
    lr: Path
    hr: Path
    ref: Path
    lrc: Path | None
    box: tuple[int, int, int, int]  # HR pixels


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    }


def _load_boxes_file(path: Path) -> dict[str, tuple[int, int, int, int]]:
    if not path.is_file():
        raise EvalError(f"boxes file {str(path)!r} does not exist.")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"boxes file {str(path)!r} is not readable JSON ({e}).") from None
    if not isinstance(obj, dict) or not all(
        isinstance(v, list | tuple) and len(v) == 4 for v in obj.values()
    ):
        raise EvalError(
            f"boxes file {str(path)!r} must map each image name to [y0, y1, x0, x1] in HR pixels."
        )
    boxes = {Path(str(k)).stem: tuple(int(x) for x in v) for k, v in obj.items()}
    return boxes  # type: ignore[return-value]


def find_dataset(
    root: str | os.PathLike, boxes_file: str | os.PathLike | None = None, limit: int | None = None
) -> list[EvalItem]:
    """The test images of the dataset at `root`, sorted by name (the first `limit` of them)."""
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"dataset folder {str(root)!r} does not exist or is not a directory.")
    d = next(
        (c for c in (root / "test", root) if (c / "LR").is_dir() and (c / "HR").is_dir()), None
    )
    if d is None:
        raise EvalError(
            f"{str(root)!r} is not in the published layout: expected test/LR/ and test/HR/ "
            "(with LR_center/ and Ref_SIFT/) under it."
        )
    ref_dir = next((d / s for s in ("Ref_SIFT", "Ref") if (d / s).is_dir()), None)
    if ref_dir is None:
        raise EvalError(f"{str(d)!r} has no Ref_SIFT/ folder of aligned references.")
    boxes = (
        _load_boxes_file(Path(boxes_file))
        if boxes_file is not None
        else find_boxes(root, d, root.parent if d == root else root)
    )
    lr, hr, ref, lrc = (_images(d / s) for s in ("LR", "HR", ref_dir.name, "LR_center"))
    if not lr:
        raise EvalError(f"{str(d / 'LR')!r} holds no images.")
    names = sorted(lr)[: limit if limit and limit > 0 else None]
    items = []
    for n in names:
        for what, table, folder in (("HR", hr, "HR"), ("reference", ref, ref_dir.name)):
            if n not in table:
                raise EvalError(f"image {n}: no {what} image in {str(d / folder)!r}.")
        if n not in boxes:
            where = str(boxes_file) if boxes_file else f"a *.json file of {str(root)!r}"
            raise EvalError(
                f"image {n}: no centre rect in {where}; pass the dataset's JSON with --boxes."
            )
        items.append(EvalItem(n, lr[n], hr[n], ref[n], lrc.get(n), boxes[n]))
    return items


def bicubic_x2(lr: torch.Tensor) -> torch.Tensor:
    """[1,3,H,W] in [0,1] -> [1,3,2H,2W], PyTorch bicubic (align_corners=False), clamped."""
    return upsample_bicubic(lr).clamp(0, 1)


def _to_255(t: torch.Tensor) -> np.ndarray:
    # [1,3,H,W] in [0,1] -> H×W×3 float64 in [0,255], not rounded (KeDuSR evaluates float output).
    return (
        t.detach().float().clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy().astype(np.float64) * 255.0
    )


def _load(item: EvalItem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    lr = read_image(item.lr)
    hr = read_image(item.hr)
    ref = read_image(item.ref)
    y0, y1, x0, x1 = item.box
    if hr.shape[:2] != (2 * lr.shape[0], 2 * lr.shape[1]):
        raise EvalError(
            f"image {item.name}: HR is {hr.shape[0]}x{hr.shape[1]}, not twice LR "
            f"({lr.shape[0]}x{lr.shape[1]})."
        )
    if not (0 <= y0 < y1 <= hr.shape[0] and 0 <= x0 < x1 <= hr.shape[1]):
        raise EvalError(f"image {item.name}: centre rect {item.box} lies outside its HR image.")
    lrc = read_image(item.lrc) if item.lrc else lr[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
    if ref.shape[:2] != (2 * lrc.shape[0], 2 * lrc.shape[1]):
        raise EvalError(
            f"image {item.name}: the reference is {ref.shape[0]}x{ref.shape[1]}, not twice LR_center "
            f"({lrc.shape[0]}x{lrc.shape[1]})."
        )
    if hr.dtype == np.uint16:
        hr = hr.astype(np.float64) / 257.0
    return to_tensor(lr), to_tensor(lrc), to_tensor(ref), hr


def evaluate(
    engine: Any,
    items: list[EvalItem],
    *,
    methods: tuple[str, ...] = METHODS,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Metrics per image and their means: {"images": [{"name", "box", "<method>": {metric: v}}],
    "mean": {method: {metric: v}}, "count": n}. `progress(done, total, name)` after each image."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise EvalError(f"unknown methods {sorted(unknown)}; use {METHODS}")
    rows = []
    for i, item in enumerate(items):
        lr, lrc, ref, hr = _load(item)
        row: dict[str, Any] = {"name": item.name, "box": list(item.box)}
        with torch.inference_mode():
            for m in methods:
                if m == "sr":  # the LR box: where the low-band projection stops
                    out = engine.run(lr, lrc, ref, box=lr_box(item.box))
                elif m == "no_ref":
                    out = engine.run_without_reference(lr)
                else:
                    out = bicubic_x2(lr)
                row[m] = region_metrics(_to_255(out), hr, item.box)
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(items), item.name)
    mean = {m: {k: _mean([r[m][k] for r in rows]) for k in METRICS} for m in methods}
    return {"count": len(rows), "methods": list(methods), "images": rows, "mean": mean}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """The report as JSON (nan -> null, inf -> "inf")."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_jsonable(report), indent=2) + "\n")


def write_csv(report: dict[str, Any], path: str | os.PathLike) -> None:
    """One row per (image, method), then one per method for the mean (image = "mean")."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "method", *METRICS])
        for r in report["images"]:
            for m in report["methods"]:
                w.writerow([r["name"], m, *(f"{r[m][k]:.6f}" for k in METRICS)])
        for m in report["methods"]:
            w.writerow(["mean", m, *(f"{report['mean'][m][k]:.6f}" for k in METRICS)])
