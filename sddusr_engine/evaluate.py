"""`sddusr eval`: PSNR and SSIM on a dataset in the published layout, as the papers report them,
with the controls that show what the reference contributes.

Protocol (DESIGN section 1, `metrics.py` for the formulas): RGB in [0, 255], no border shave, the
network's float output clamped to [0, 1] and scaled by 255 without rounding; full image, centre
rect and corner region (everything outside it, pooled by area). Every network output comes from
the engine as configured (ensemble, self-adaptation, low-band projection, channel order), so these
are the numbers `sddusr sr` gives. Per image:

- `sr`: the network with its reference (`Engine.run(LR, LRC, Ref)`, given the rect's LR box);
- `no_ref`: the same network with the reference switched off (`Engine.run_without_reference`);
- `bicubic`: LR enlarged x2 by PyTorch's bicubic (align_corners=False), clamped, not rounded;
- `wrong_ref`, the control: the centre's PSNR and SSIM with another photo's reference, that of the
  next image in name order (the last image takes the first one's), resized bicubic onto this
  image's Ref grid; LR and LRC stay the image's own. `ref_gain_db`, the true reference's centre
  PSNR minus this one, measures how much the network uses the reference. The engine blends a
  self-adapted copy in outside the rect only, so the centre does not depend on it and the control
  runs without adaptation. It needs two images or more;
- `mask_fraction_lr` / `_lrc`: the active fraction of the SFM masks in the `sr` run (the plain
  pass's under an ensemble), and `mask_fraction`, their mean;
- `gain_db` (full-image PSNR, sr minus bicubic), `no_ref_gain_db` (no_ref minus bicubic), and
  `seconds` (the `sr` call, adaptation included).

Means are over images, PSNR averaged in dB; undefined values (a region that is empty, a network
without masks) are left out of them.

Layout: `DATASET/test/{LR, HR, LR_center, Ref_SIFT}/<name>.png` (or `DATASET/{LR, ...}`), and a JSON
file mapping `<name>.png` to the centre rect `[y0, y1, x0, x1]` in HR pixels (any `*.json` in the
dataset root, its `test/` folder or the folder above, or an explicit `boxes` file). Without
`LR_center/`, LRC is cut from LR with the rect halved.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import ALIGNED_REF_DIRS, images_by_stem, published_dir, read_boxes, read_boxes_file
from .engine import Engine
from .errors import EvalError, EvalUsageError
from .geometry import lr_box
from .io import atomic_output, read_image, to_tensor
from .metrics import region_metrics
from .model.network import upsample_bicubic

__all__ = [
    "CONTROL_METRICS",
    "METHODS",
    "METRICS",
    "SUMMARY",
    "EvalError",
    "EvalItem",
    "evaluate",
    "find_dataset",
    "write_csv",
    "write_json",
]

METHODS = ("sr", "no_ref", "bicubic")
METRICS = ("psnr", "psnr_center", "psnr_corner", "ssim", "ssim_center", "ssim_corner")
CONTROL_METRICS = ("psnr_center", "ssim_center")  # what the wrong-reference control scores
# per-image scalars, averaged into the report's "summary"
SUMMARY = (
    "gain_db",
    "no_ref_gain_db",
    "ref_gain_db",
    "wrong_ref_psnr_center",
    "wrong_ref_ssim_center",
    "mask_fraction_lr",
    "mask_fraction_lrc",
    "mask_fraction",
    "seconds",
)


@dataclass(frozen=True)
class EvalItem:
    """One image of the dataset to score, as file paths, and its centre rect."""

    name: str
    lr: Path
    hr: Path
    ref: Path
    lrc: Path | None
    box_hr: tuple[int, int, int, int]  # the centre rect, HR pixels


def _images(folder: Path) -> dict[str, Path]:
    return {stem: paths[0] for stem, paths in images_by_stem(folder).items()}


def find_dataset(
    root: str | os.PathLike, boxes_file: str | os.PathLike | None = None, limit: int | None = None
) -> list[EvalItem]:
    """The test images of the dataset at `root`, sorted by name (the first `limit` of them)."""
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"dataset folder {str(root)!r} does not exist or is not a directory.")
    d = published_dir(root, ("LR", "HR"), aligned_ref=False)
    if d is None:
        raise EvalUsageError(
            f"{str(root)!r} is not in the published layout: expected test/LR/ and test/HR/ "
            "(with LR_center/ and Ref_SIFT/) under it."
        )
    ref_dir = next((d / s for s in ALIGNED_REF_DIRS if (d / s).is_dir()), None)
    if ref_dir is None:
        raise EvalError(f"{str(d)!r} has no Ref_SIFT/ folder of aligned references.")
    boxes = (
        read_boxes_file(boxes_file, EvalError)
        if boxes_file is not None
        else read_boxes(root, d, root.parent if d == root else root)
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


def _bicubic(lr: torch.Tensor) -> torch.Tensor:
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
    y0, y1, x0, x1 = item.box_hr
    if hr.shape[:2] != (2 * lr.shape[0], 2 * lr.shape[1]):
        raise EvalError(
            f"image {item.name}: HR is {hr.shape[0]}x{hr.shape[1]}, not twice LR "
            f"({lr.shape[0]}x{lr.shape[1]})."
        )
    if not (0 <= y0 < y1 <= hr.shape[0] and 0 <= x0 < x1 <= hr.shape[1]):
        raise EvalError(f"image {item.name}: centre rect {item.box_hr} lies outside its HR image.")
    lrc = read_image(item.lrc) if item.lrc else lr[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
    if ref.shape[:2] != (2 * lrc.shape[0], 2 * lrc.shape[1]):
        raise EvalError(
            f"image {item.name}: the reference is {ref.shape[0]}x{ref.shape[1]}, not twice LR_center "
            f"({lrc.shape[0]}x{lrc.shape[1]})."
        )
    if hr.dtype == np.uint16:
        hr = hr.astype(np.float64) / 257.0
    return to_tensor(lr), to_tensor(lrc), to_tensor(ref), hr


def _other_reference(item: EvalItem, ref_hw: tuple[int, int]) -> torch.Tensor:
    """`item`'s reference resized bicubic (align_corners=False, clamped) onto an `ref_hw` grid:
    the wrong reference of the control."""
    ref = to_tensor(read_image(item.ref))
    if tuple(ref.shape[-2:]) == tuple(ref_hw):
        return ref
    return F.interpolate(ref, size=tuple(ref_hw), mode="bicubic", align_corners=False).clamp(0, 1)


def _select(
    dataset: str | os.PathLike | Sequence[EvalItem],
    boxes: str | os.PathLike | None,
    limit: int | None,
    only: str | None,
) -> list[EvalItem]:
    """The items to evaluate: found under a dataset folder (or given), matching the `only` glob
    on their names, the first `limit` of them."""
    limit = limit if limit and limit > 0 else None
    if isinstance(dataset, str | os.PathLike):
        items = find_dataset(dataset, boxes, None if only else limit)
    else:
        if boxes is not None:
            raise EvalError("a boxes file applies to a dataset folder, not to a list of items.")
        items = list(dataset)
    if only:
        items = [it for it in items if fnmatch.fnmatchcase(it.name, only)]
        if not items:
            raise EvalError(f"no image name matches {only!r}.")
    return items[:limit]


def _without_adaptation(engine: Engine) -> Engine:
    """An engine on the same network and settings, adaptation off (for the control's centre)."""
    if not engine.adapt.steps:
        return engine
    return Engine(
        engine.model,
        device=engine.device,
        dtype=engine.dtype,
        backend=engine.backend,
        tile=engine.tile,
        channels_last=engine.channels_last,
        ensemble=engine.ensemble,
    )


def _scalars(row: dict[str, Any]) -> dict[str, float | None]:
    """The per-image differences the summary averages (None where a part is missing)."""

    def diff(a, ka, b, kb):
        return row[a][ka] - row[b][kb] if a in row and b in row else None

    wrong = row.get("wrong_ref")
    out = {
        "gain_db": diff("sr", "psnr", "bicubic", "psnr"),
        "no_ref_gain_db": diff("no_ref", "psnr", "bicubic", "psnr"),
        "ref_gain_db": diff("sr", "psnr_center", "wrong_ref", "psnr_center") if wrong else None,
        "wrong_ref_psnr_center": wrong["psnr_center"] if wrong else None,
        "wrong_ref_ssim_center": wrong["ssim_center"] if wrong else None,
    }
    lr, lrc = row.get("mask_fraction_lr"), row.get("mask_fraction_lrc")
    out["mask_fraction"] = None if lr is None or lrc is None else 0.5 * (lr + lrc)
    return out


def evaluate(
    engine: Engine,
    dataset: str | os.PathLike | Sequence[EvalItem],
    *,
    boxes: str | os.PathLike | None = None,
    limit: int | None = None,
    only: str | None = None,
    methods: Sequence[str] = METHODS,
    wrong_reference: bool = True,
    weights: str | os.PathLike | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Score `engine` on a dataset folder in the published layout (or on items already found).

    `boxes`: a JSON file of centre rects (default: the dataset's own); `only`: a glob on the image
    names (e.g. "*_0"); `limit`: the first N images (after `only`); `methods`: a subset of
    METHODS; `wrong_reference=False` leaves out the control (one network pass per image fewer);
    `weights`: only recorded. `progress(done, total, name)` after each image.

    Returns {"count", "methods", "images": [{"name", "box_hr", "<method>": {metric: v},
    "wrong_ref": {"other", "psnr_center", "ssim_center"} | None, "mask_fraction_lr",
    "mask_fraction_lrc", "seconds", and the SUMMARY differences}], "mean": {method: {metric: v}},
    "summary": {key of SUMMARY: mean over images}, and how it ran: "dataset", "weights",
    "variant", "dtype", "device", "backend", "tile", "ensemble", "adapt", "low_band_sigma",
    "machine", "torch", "date"}. The module docstring defines every value.
    """
    methods = tuple(methods)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise EvalUsageError(f"unknown methods {sorted(unknown)}; use {METHODS}.")
    items = _select(dataset, boxes, limit, only)
    control = (
        _without_adaptation(engine)
        if wrong_reference and "sr" in methods and len(items) > 1
        else None
    )
    rows = []
    for i, item in enumerate(items):
        lr, lrc, ref, hr = _load(item)
        box_lr = lr_box(item.box_hr)  # where the low-band projection and adaptation stop
        row: dict[str, Any] = {"name": item.name, "box_hr": list(item.box_hr)}
        with torch.inference_mode():
            for m in methods:
                if m == "sr":
                    t0 = time.perf_counter()
                    out, info = engine.run(lr, lrc, ref, box_lr=box_lr, return_info=True)
                    row["seconds"] = time.perf_counter() - t0
                    row["mask_fraction_lr"] = info.mask_fraction_lr
                    row["mask_fraction_lrc"] = info.mask_fraction_lrc
                elif m == "no_ref":
                    out = engine.run_without_reference(lr)
                else:
                    out = _bicubic(lr)
                row[m] = region_metrics(_to_255(out), hr, item.box_hr)
            if control is not None:
                other = items[(i + 1) % len(items)]
                out = control.run(lr, lrc, _other_reference(other, ref.shape[-2:]), box_lr=box_lr)
                got = region_metrics(_to_255(out), hr, item.box_hr)
                row["wrong_ref"] = {"other": other.name, **{k: got[k] for k in CONTROL_METRICS}}
            else:
                row["wrong_ref"] = None
        row.update(_scalars(row))
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(items), item.name)
    mean = {m: {k: _mean([r[m][k] for r in rows]) for k in METRICS} for m in methods}
    summary = {k: _mean([r.get(k) for r in rows]) for k in SUMMARY}
    return {
        "count": len(rows),
        "methods": list(methods),
        "images": rows,
        "mean": mean,
        "summary": summary,
        **_run_record(engine, dataset, weights),
    }


def _run_record(engine: Engine, dataset: Any, weights: str | os.PathLike | None) -> dict[str, Any]:
    """How and where the numbers were measured."""
    dev = engine.device
    machine = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    return {
        "dataset": str(dataset) if isinstance(dataset, str | os.PathLike) else None,
        "weights": str(weights) if weights else "default",
        "variant": engine.config.variant,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "device": str(dev),
        "backend": engine.backend,
        "tile": engine.tile,
        "ensemble": engine.ensemble,
        "adapt": engine.adapt.steps,  # self-adaptation steps per image (0: off)
        # sigma of the weights' low-band projection outside the centre rect (None: none)
        "low_band_sigma": engine.config.low_band_sigma or None,
        "machine": machine,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
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
    with atomic_output(p) as tmp:  # never half-written
        tmp.write_text(json.dumps(_jsonable(report), indent=2) + "\n")


# CSV columns after the metrics: per image, filled on its `sr` row only
_CSV_EXTRA = ("wrong_ref", *SUMMARY)


def write_csv(report: dict[str, Any], path: str | os.PathLike) -> None:
    """One row per (image, method), then one per method for the mean (image = "mean"). The
    control, masks, gains and time (columns after the metrics) are on the `sr` rows only; the
    `wrong_ref` column names the photo whose reference the control used."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def fmt(v: Any) -> str:
        return "" if v is None else v if isinstance(v, str) else f"{v:.6f}"

    def extra(m: str, values: dict[str, Any]) -> list[str]:
        return [fmt(values.get(k)) if m == "sr" else "" for k in _CSV_EXTRA]

    with atomic_output(p) as tmp, tmp.open("w", newline="") as f:  # never half-written
        w = csv.writer(f)
        w.writerow(["image", "method", *METRICS, *_CSV_EXTRA])
        for r in report["images"]:
            flat = {**r, "wrong_ref": (r.get("wrong_ref") or {}).get("other")}
            for m in report["methods"]:
                w.writerow([r["name"], m, *(fmt(r[m][k]) for k in METRICS), *extra(m, flat)])
        for m in report["methods"]:
            mean = report["mean"][m]
            summary = report.get("summary", {})
            w.writerow(["mean", m, *(fmt(mean[k]) for k in METRICS), *extra(m, summary)])
