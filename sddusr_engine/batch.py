"""The batch runner behind `sddusr batch`: find pairs in a folder, super-resolve each once.

- Layouts: `IN/wide` + `IN/tele` (raw pairs, matched by file stem, registered by the engine), or the
  published dataset layout `IN/{LR, LR_center, Ref_SIFT}` (also under `IN/test/`), with or without
  `HR/` (pre-aligned triplets, run as they are). Without `LR_center/`, LRC is cut from LR with the
  centre boxes of the dataset's JSON file.
- Overlap: a reader thread decodes the next pairs and registers the raw ones
  (`Engine.register_pair`: the telephoto's footprint and its resampling, numpy and OpenCV on the
  CPU), a writer thread encodes and writes the finished ones, and the calling thread only runs the
  network (`Engine.run_registered`, or `Engine.run` for triplets), so the device does not wait
  for a pair's seconds of registration. `BatchStats` measures how well that works: pairs per
  second, and the share of the compute loop's time spent waiting for its next input. On a GPU
  those waits are the device's idle time to a good approximation, since each pair's kernels are
  finished by the copy of its result to the host before the loop asks for the next pair.
- Outputs are written atomically (`io.write_image`: temporary file, fsync, rename), so an
  interrupted batch leaves no half-written image and a rerun resumes: existing outputs are
  skipped unless `overwrite=True`.
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
    "BatchStats",
    "BatchUsageError",
    "PairJob",
    "PairResult",
    "discover_pairs",
    "find_boxes",
    "gather_results",
    "gather_stats",
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
    seconds: float = 0.0  # engine time (the network; a raw pair's registration is register_s)
    read_s: float = 0.0
    register_s: float = 0.0
    write_s: float = 0.0
    rank: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchStats:
    """How well one run overlapped its stages (or, `combined`, every rank's run).

    `computed`: pairs the network finished; `wall_s`: the run, start to last write; `loop_s`: the
    compute loop, from its first request for an input to its last finished pair; `wait_s`: the
    part of `loop_s` spent blocked on the read queue (the device idle, see the module docstring).
    """

    computed: int = 0
    wall_s: float = 0.0
    loop_s: float = 0.0
    wait_s: float = 0.0

    @property
    def pairs_per_s(self) -> float:
        return self.computed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def compute_idle_share(self) -> float | None:
        """wait_s / loop_s, or None when the loop handled no pair."""
        return min(1.0, self.wait_s / self.loop_s) if self.loop_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs_computed": self.computed,
            "wall_s": round(self.wall_s, 3),
            "pairs_per_s": round(self.pairs_per_s, 4),
            "compute_idle_share": (
                None if self.compute_idle_share is None else round(self.compute_idle_share, 4)
            ),
        }

    @classmethod
    def combined(cls, parts: Sequence[BatchStats]) -> BatchStats:
        """Ranks that ran side by side: their pairs over the longest wall time, and their waits
        over their loops' time together."""
        return cls(
            sum(p.computed for p in parts),
            max((p.wall_s for p in parts), default=0.0),
            sum(p.loop_s for p in parts),
            sum(p.wait_s for p in parts),
        )


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


def gather_stats(stats: BatchStats, ctx: DistContext) -> BatchStats:
    """Every rank's `BatchStats`, combined (on every rank); the rank's own when not distributed."""
    return BatchStats.combined([BatchStats(**d) for d in all_gather(ctx, asdict(stats))])


# ----------------------------------------------------------------------------- running

_DONE = object()


class _Stopped(Exception):
    """The batch stopped while the reader was registering: the registration is abandoned."""


@dataclass
class _Input:
    """One job as the reader hands it to the compute loop: its images (a raw pair registered,
    an `Engine.register_pair` result), or the one-sentence reason it cannot be computed."""

    job: PairJob
    data: Any = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    read_s: float = 0.0
    register_s: float = 0.0


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


def _prepare(
    engine: Any,
    job: PairJob,
    missing_reference: str,
    tile: int | None,
    stop: threading.Event,
) -> _Input:
    """Decode `job`'s images and register a raw pair; a failure is the item's `error`. Raises
    `_Stopped` when `stop` is set before or during the registration."""
    item = _Input(job)
    t0 = time.perf_counter()
    try:
        arrays = _read(job, item.notes)
    except Exception as e:  # noqa: BLE001 - recorded as this pair's failure
        item.error = _message(e)
        return item
    finally:
        item.read_s = time.perf_counter() - t0
    if job.kind != "raw":
        item.data = arrays
        return item
    if stop.is_set():
        raise _Stopped

    def step(done: int, total: int) -> None:  # between the registration's steps
        if stop.is_set():
            raise _Stopped

    t0 = time.perf_counter()
    try:
        wide, tele = arrays["wide"], arrays["tele"]
        item.data = engine.register_pair(
            wide,
            tele,
            missing_reference=missing_reference,
            zoom_prior=exif_zoom(job.inputs["wide"], job.inputs["tele"], wide, tele),
            progress=step,
        )
    except _Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - a footprint not found is this pair's failure
        item.error = _message(e, tile)
    finally:
        item.register_s = time.perf_counter() - t0
    return item


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
    stats: BatchStats | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> list[PairResult]:
    """Process `jobs` with `engine`, writing `<out_dir>/<name>.<ext>`; returns one result per job.

    Reading and registering (thread), computing (this thread) and writing (thread) overlap; at
    most `prefetch` prepared pairs wait for the engine. `on_result` is called once per job as soon
    as its outcome is known (from the writer thread for written pairs). `stats`, when given, is
    filled in as the run goes (pairs per second, the compute loop's idle share), interrupted or
    not. Ctrl-C (KeyboardInterrupt) stops it: the pairs already computed are written, and
    `BatchInterrupted` carries the results so far. `progress(done, total)` and `on_stage(name)`
    are passed to each pair's network run (`Engine.run`; the `sddusr batch` command hands the
    heap's free pages back through them, as `sddusr sr` does).
    """
    t_start = time.perf_counter()
    stats = BatchStats() if stats is None else stats
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

    hooks = {k: f for k, f in (("progress", progress), ("on_stage", on_stage)) if f is not None}
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
    tile = getattr(engine, "tile", None)

    def put(q: queue.Queue, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # One reader thread, not a pool: the registration's heavy steps (features, warps, resizes)
    # already run on OpenCV's own worker threads, and on a few cores a second registering thread
    # would only take cores from the network. `prefetch` bounds how far it runs ahead.
    def reader() -> None:
        try:
            for job in todo:
                if stop.is_set():
                    return
                if not put(read_q, _prepare(engine, job, missing_reference, tile, stop)):
                    return
        except _Stopped:
            return
        put(read_q, _DONE)

    def next_input() -> Any:
        # short timed waits: Ctrl-C arrives in this thread as an exception raised between two
        # Python steps (see `interrupt`), which a wait without a timeout would never reach
        while True:
            try:
                return read_q.get(timeout=0.1)
            except queue.Empty:
                if not read_thread.is_alive() and read_q.empty():
                    return _DONE  # the reader died without saying so: nothing more will come

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

    read_thread = threading.Thread(target=reader, name="sddusr-reader", daemon=True)
    write_thread = threading.Thread(target=writer, name="sddusr-writer", daemon=True)
    read_thread.start()
    write_thread.start()
    interrupted = False
    loop_t0: float | None = None
    try:
        while True:
            t_wait = time.perf_counter()
            item = next_input()
            if item is _DONE:
                break
            stats.wait_s += time.perf_counter() - t_wait
            loop_t0 = t_wait if loop_t0 is None else loop_t0
            res = PairResult(
                item.job.name, "failed", read_s=item.read_s, register_s=item.register_s
            )
            if item.error is not None:
                res.message = item.error
                finish(res)
            else:
                t0 = time.perf_counter()
                try:
                    sr, timings, notes = _compute(engine, item, hooks)
                except Exception as e:  # noqa: BLE001 - per-pair error capture
                    if memory_advice(e) is not None:
                        _empty_cache()
                    res.seconds = time.perf_counter() - t0
                    res.message = _message(e, tile)
                    finish(res)
                else:
                    res.seconds = time.perf_counter() - t0
                    res.timings = timings
                    res.message = "; ".join([*item.notes, *notes]) or None
                    stats.computed += 1
                    write_q.put((item.job, sr, res))
            now = time.perf_counter()
            stats.loop_s, stats.wall_s = now - loop_t0, now - t_start
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        write_q.put(_DONE)  # the writer finishes what was computed, then stops
        write_thread.join()
        # After Ctrl-C the reader is not waited for: it writes nothing, and it may be inside one
        # registration step of seconds that cannot be interrupted; it ends at its next step.
        if not interrupted:
            read_thread.join()
        stats.wall_s = time.perf_counter() - t_start
    order = {j.name: i for i, j in enumerate(jobs)}
    done = sorted(results, key=lambda r: order.get(r.name, len(order)))
    if interrupted:
        raise BatchInterrupted(done)
    return done


def _compute(engine: Any, item: _Input, hooks: dict) -> tuple[np.ndarray, dict, list[str]]:
    """(SR image, stage timings in ms, warnings such as a reference-free fallback); `hooks`: the
    run's progress and on_stage callbacks, those given."""
    if item.job.kind == "raw":
        sr, info = engine.run_registered(item.data, return_info=True, **hooks)
    else:  # a triplet: its info too (a skipped low-band projection is a warning)
        d = item.data
        sr, info = engine.run(d["lr"], d["lrc"], d["ref"], return_info=True, **hooks)
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
    stats: BatchStats | None = None,
) -> dict[str, Any]:
    """`sddusr batch --report`'s JSON. `jobs`, given when the run was interrupted: the pairs it was
    to do, those without a result listed as `not_run`. `stats`: the run's `BatchStats` (pairs
    computed, wall seconds, pairs per second, the compute loop's idle share)."""
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
        **(stats or BatchStats()).to_dict(),
        "results": [r.to_dict() for r in results],
    }


def write_report(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a JSON report atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(p) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
