"""The batch runner behind `sddusr batch`: find pairs in a folder, super-resolve each once.

- Layouts: `IN/wide` + `IN/tele` (raw pairs, matched by file stem, registered by the engine), or the
  published dataset layout `IN/{LR, LR_center, Ref_SIFT}` (also under `IN/test/`), with or without
  `HR/` (pre-aligned triplets, run as they are). Without `LR_center/`, LRC is cut from LR with the
  centre boxes of the dataset's JSON file.
- Overlap: a reader thread prefetches the next pairs and a writer thread encodes and writes the
  finished ones while the engine computes. Outputs are written atomically (`io.write_image`:
  temporary file, fsync, rename), so an interrupted batch leaves no half-written image and a rerun
  resumes: existing outputs are skipped unless `overwrite=True`.
- Errors are per pair: a missing partner, an unreadable, truncated or too small image, a footprint
  that is not found, even an out-of-memory, is recorded as that pair's failure and the rest go on.
  A transparency flattened onto white is noted in the pair's message.
- Ctrl-C: the pairs already computed are written, then `BatchInterrupted` (a `KeyboardInterrupt`)
  carries the results of every pair that finished, for the report.
- Under torchrun (`WORLD_SIZE` > 1, see `distributed`) the pairs are sorted by name and rank r
  takes `pairs[r::world]`, so each pair is done exactly once; the results are gathered for one
  summary.

No `rich` here: progress goes through a callback.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import images_by_stem, published_dir, read_boxes
from .distributed import DistContext, all_gather
from .errors import DatasetError, memory_advice
from .errors import DatasetLayoutError as BatchUsageError
from .io import atomic_output, check_size, read_image, write_image
from .registration.prior import exif_zoom

__all__ = [
    "BatchInterrupted",
    "BatchUsageError",
    "PairJob",
    "PairResult",
    "discover_pairs",
    "find_boxes",
    "gather_results",
    "run_batch",
    "shard",
]

OUTPUT_SUFFIXES = ("png", "tif", "tiff", "jpg", "jpeg")


@dataclass(frozen=True)
class PairJob:
    """One pair to process. kind "raw": inputs wide, tele; kind "triplet": inputs lr, ref, and lrc
    (or `box`, the centre rect in HR pixels, to cut LRC from LR). `problem`: found at discovery."""

    name: str
    kind: str
    inputs: dict[str, Path]
    box: tuple[int, int, int, int] | None = None
    problem: str | None = None


@dataclass
class PairResult:
    """What happened to one pair: status is "written", "skipped" or "failed"."""

    name: str
    status: str
    output: str | None = None
    message: str | None = None
    seconds: float = 0.0  # engine time
    read_s: float = 0.0
    write_s: float = 0.0
    rank: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_batch`: `results` holds every pair that finished before it."""

    def __init__(self, results: list[PairResult]):
        super().__init__()
        self.results = results


# ----------------------------------------------------------------------------- discovery


def _pick(
    name: str, paths: list[Path] | None, what: str, folder: Path
) -> tuple[Path | None, str | None]:
    if not paths:
        return None, f"no {what} image named {name}.* in {folder}"
    if len(paths) > 1:
        listed = ", ".join(p.name for p in paths)
        return None, f"several {what} images named {name} in {folder} ({listed}); keep one"
    return paths[0], None


find_boxes = read_boxes  # the dataset's centre rects, by stem (see `datasets.read_boxes`)


def discover_pairs(root: str | os.PathLike) -> tuple[str, list[PairJob]]:
    """(layout, jobs sorted by name) for `root`: layout "wide/tele" or "published".

    A pair whose partner is missing becomes a job with `problem` set (reported as failed, never
    silently dropped). Raises `BatchUsageError` (exit 2) when `root` has neither layout,
    `DatasetError` (exit 1, a missing file) when it does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"input folder {str(root)!r} does not exist or is not a directory.")
    jobs: list[PairJob] = []
    if (root / "wide").is_dir() and (root / "tele").is_dir():
        wide, tele = images_by_stem(root / "wide"), images_by_stem(root / "tele")
        for name in sorted(set(wide) | set(tele)):
            w, wp = _pick(name, wide.get(name), "wide", root / "wide")
            t, tp = _pick(name, tele.get(name), "telephoto", root / "tele")
            problem = wp or tp
            inputs = {k: v for k, v in (("wide", w), ("tele", t)) if v is not None}
            jobs.append(PairJob(name, "raw", inputs, problem=problem))
        return "wide/tele", jobs

    d = published_dir(root)
    if d is None:
        raise BatchUsageError(
            f"{str(root)!r} holds neither wide/ + tele/ folders nor the published layout "
            "(LR/, LR_center/, Ref_SIFT/); see `sddusr batch --help`."
        )
    ref_dir = d / "Ref_SIFT" if (d / "Ref_SIFT").is_dir() else d / "Ref"
    lrc_dir = d / "LR_center"
    lr, ref = images_by_stem(d / "LR"), images_by_stem(ref_dir)
    lrc = images_by_stem(lrc_dir) if lrc_dir.is_dir() else {}
    boxes = {} if lrc_dir.is_dir() else find_boxes(root, d, d.parent)
    for name in sorted(set(lr) | set(ref) | set(lrc)):
        lp, problem = _pick(name, lr.get(name), "LR", d / "LR")
        rp, p2 = _pick(name, ref.get(name), "reference", ref_dir)
        problem = problem or p2
        inputs = {k: v for k, v in (("lr", lp), ("ref", rp)) if v is not None}
        box = None
        if lrc_dir.is_dir():
            cp, p3 = _pick(name, lrc.get(name), "LR_center", lrc_dir)
            problem = problem or p3
            if cp is not None:
                inputs["lrc"] = cp
        else:
            box = boxes.get(name)
            if box is None and problem is None:
                problem = (
                    f"no LR_center/ folder and no centre box for {name} in a JSON file of {root}"
                )
        jobs.append(PairJob(name, "triplet", inputs, box=box, problem=problem))
    return "published", jobs


# ----------------------------------------------------------------------------- distribution


def shard(jobs: Sequence[PairJob], rank: int, world: int) -> list[PairJob]:
    """Rank `rank`'s share: the jobs sorted by name, then every `world`-th from `rank`."""
    return sorted(jobs, key=lambda j: j.name)[rank::world]


def gather_results(results: list[PairResult], ctx: DistContext) -> list[PairResult]:
    """Every rank's results (on every rank), sorted by name; the rank's own when not distributed."""
    parts = all_gather(ctx, [r.to_dict() for r in results])
    return sorted((PairResult(**d) for part in parts for d in (part or [])), key=lambda r: r.name)


# ----------------------------------------------------------------------------- running

_DONE = object()


def output_path(out_dir: Path, job: PairJob, ext: str) -> Path:
    return out_dir / f"{job.name}.{ext.lstrip('.').lower()}"


def _read(job: PairJob, notes: list[str]) -> dict[str, np.ndarray]:
    if job.kind == "raw":
        wide = read_image(job.inputs["wide"], notes)
        check_size(wide, job.inputs["wide"])
        return {"wide": wide, "tele": read_image(job.inputs["tele"], notes)}
    lr = read_image(job.inputs["lr"], notes)
    check_size(lr, job.inputs["lr"])
    ref = read_image(job.inputs["ref"], notes)
    if "lrc" in job.inputs:
        lrc = read_image(job.inputs["lrc"], notes)
    else:
        y0, y1, x0, x1 = job.box  # type: ignore[misc]
        lrc = np.ascontiguousarray(lr[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2])
        if lrc.size == 0:
            raise ValueError(
                f"centre box {job.box} lies outside the {lr.shape[0]}x{lr.shape[1]} LR image"
            )
    return {"lr": lr, "lrc": lrc, "ref": ref}


def _message(e: BaseException, tile: int | None = None) -> str:
    memory = memory_advice(e, tile)
    if memory is not None:
        return memory
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError | ValueError | KeyError):
        return text
    return f"{type(e).__name__}: {text}"


def run_batch(
    engine: Any,
    jobs: Sequence[PairJob],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    ext: str = "png",
    missing_reference: str = "error",
    prefetch: int = 2,
    rank: int = 0,
    on_result: Callable[[PairResult], None] | None = None,
) -> list[PairResult]:
    """Process `jobs` with `engine`, writing `<out_dir>/<name>.<ext>`; returns one result per job.

    Reading (thread), computing (this thread) and writing (thread) overlap. `on_result` is called
    once per job as soon as its outcome is known (from the writer thread for written pairs).
    Ctrl-C (KeyboardInterrupt) stops it: the pairs already computed are written, and
    `BatchInterrupted` carries the results so far.
    """
    if ext.lstrip(".").lower() not in OUTPUT_SUFFIXES:
        raise BatchUsageError(
            f"unknown output format {ext!r}; use one of {', '.join(OUTPUT_SUFFIXES)}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[PairResult] = []
    lock = threading.Lock()

    def finish(r: PairResult) -> None:
        r.rank = rank
        with lock:
            results.append(r)
        if on_result is not None:
            on_result(r)

    todo: list[PairJob] = []
    for job in jobs:
        target = output_path(out, job, ext)
        if target.exists() and not overwrite:
            finish(PairResult(job.name, "skipped", str(target), "output exists"))
        elif job.problem:
            finish(PairResult(job.name, "failed", None, job.problem))
        else:
            todo.append(job)

    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    write_q: queue.Queue = queue.Queue(maxsize=2)

    def put(q: queue.Queue, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        for job in todo:
            t0 = time.perf_counter()
            notes: list[str] = []
            try:
                item: Any = (_read(job, notes), notes)
            except Exception as e:  # noqa: BLE001 - recorded as this pair's failure
                item = e
            if not put(read_q, (job, item, time.perf_counter() - t0)):
                return
        put(read_q, _DONE)

    def writer() -> None:
        while True:
            item = write_q.get()
            if item is _DONE:
                return
            job, arr, res = item
            target = output_path(out, job, ext)
            t0 = time.perf_counter()
            try:
                write_image(target, arr)
                res.status, res.output = "written", str(target)
            except Exception as e:  # noqa: BLE001
                msg = _message(e)
                res.status = "failed"
                res.message = msg if msg.startswith("cannot ") else f"cannot write {target}: {msg}"
            res.write_s = time.perf_counter() - t0
            finish(res)

    threads = [
        threading.Thread(target=reader, name="sddusr-reader", daemon=True),
        threading.Thread(target=writer, name="sddusr-writer", daemon=True),
    ]
    for t in threads:
        t.start()
    tile = getattr(engine, "tile", None)
    interrupted = False
    try:
        while True:
            item = read_q.get()
            if item is _DONE:
                break
            job, data, read_s = item
            res = PairResult(job.name, "failed", read_s=read_s)
            if isinstance(data, BaseException):
                res.message = _message(data)
                finish(res)
                continue
            data, read_notes = data
            t0 = time.perf_counter()
            try:
                sr, timings, notes = _compute(engine, job, data, missing_reference)
            except Exception as e:  # noqa: BLE001 - per-pair error capture
                if memory_advice(e) is not None:
                    _empty_cache()
                res.seconds = time.perf_counter() - t0
                res.message = _message(e, tile)
                finish(res)
                continue
            res.seconds = time.perf_counter() - t0
            res.timings = timings
            res.message = "; ".join([*read_notes, *notes]) or None
            write_q.put((job, sr, res))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        write_q.put(_DONE)  # the writer finishes what was computed, then stops
        for t in threads:
            t.join()
    order = {j.name: i for i, j in enumerate(jobs)}
    done = sorted(results, key=lambda r: order.get(r.name, len(order)))
    if interrupted:
        raise BatchInterrupted(done)
    return done


def _compute(
    engine: Any, job: PairJob, data: dict[str, np.ndarray], missing_reference: str
) -> tuple[np.ndarray, dict[str, float], list[str]]:
    """(SR image, stage timings in ms, warnings such as a reference-free fallback)."""
    if job.kind == "raw":
        with warnings.catch_warnings():  # the engine's warnings come back in info.warnings
            warnings.simplefilter("ignore")
            sr, info = engine.super_resolve(
                data["wide"],
                data["tele"],
                missing_reference=missing_reference,
                return_info=True,
                zoom_prior=exif_zoom(
                    job.inputs["wide"], job.inputs["tele"], data["wide"], data["tele"]
                ),
            )
    else:  # a triplet: its info too (a skipped low-band projection is a warning)
        sr, info = engine.run(data["lr"], data["lrc"], data["ref"], return_info=True)
    timings = dict(getattr(info, "timings", {}) or {})
    notes = [str(w) for w in getattr(info, "warnings", []) or []]
    return sr, {k: float(v) for k, v in timings.items()}, notes


def _empty_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def report_payload(
    indir: Path,
    outdir: Path,
    layout: str,
    world: int,
    ensemble: int,
    adapt: int,
    results: list[PairResult],
    jobs: Sequence[PairJob] | None = None,
) -> dict[str, Any]:
    """`sddusr batch --report`'s JSON. `jobs`, given when the run was interrupted: the pairs it was
    to do, those without a result listed as `not_run`."""
    finished = {r.name for r in results}
    return {
        "input": str(indir),
        "output": str(outdir),
        "layout": layout,
        "world": world,
        "ensemble": ensemble,
        "adapt": adapt,
        "interrupted": jobs is not None,
        "not_run": [j.name for j in jobs or () if j.name not in finished],
        "results": [r.to_dict() for r in results],
    }


def write_report(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a JSON report atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(p) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
