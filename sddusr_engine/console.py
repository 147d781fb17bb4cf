"""What the `sddusr` commands print: the two consoles (results on stdout, everything else on
stderr), progress bars, the engine's one-line description and the tables of batch, eval and
profile."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str, console: Console = err) -> None:
    """One yellow line on stderr."""
    console.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


def _tile_words(tile: int | None) -> str:
    return "auto" if tile is None else str(tile or "whole")


def engine_line(eng, weights: Path | None) -> str:
    dt = str(eng.dtype).replace("torch.", "")
    name = weights.name if weights else "default weights"
    passes = f", ensemble of {eng.ensemble} passes" if eng.ensemble > 1 else ""
    passes += f", self-adaptation {eng.adapt.steps} steps" if eng.adapt.steps else ""
    return f"{eng.config.variant} ({name}) on {eng.device}, {dt}, {eng.backend} kernels, tile {_tile_words(eng.tile)}{passes}"


def wide() -> Console:
    """The console for tables: stdout, at least 160 columns wide when it is not a terminal."""
    return out if out.is_terminal else Console(highlight=False, width=max(out.width, 160))


def progress(console: Console, transient: bool = True, remaining: bool = False) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *([TimeRemainingColumn()] if remaining else []),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=transient,
    )


# The engine's stage names as a person reads them; the tile-counting stages say "tiles".
STAGE_LABELS = {
    "registration": "registration (locating the telephoto)",
    "reference": "reference context",
    "trunk": "tiles: feature trunk",
    "match_features": "tiles: matching features",
    "matching": "matching",
    "fusion_statistics": "tiles: fusion statistics",
    "fusion_input": "tiles: fusion input",
    "decode": "tiles: 2x stage",
    "adapt": "self-adaptation",
    "low_band": "low band",
}


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


class StageProgress:
    """One run's progress on stderr: each stage by name with its elapsed time, and for the
    tile-counting stages the tiles done and the time left. On a terminal a rich display; with
    stderr piped (or in CI) plain lines without ANSI codes: one per stage start and one about
    every 10 % of the tiles; `quiet`: nothing. `stage` and `tiles` are the engine's `on_stage`
    and `progress` callbacks."""

    def __init__(self, console: Console, quiet: bool = False, transient: bool = True):
        self.console, self.quiet = console, quiet
        self.live = not quiet and console.is_terminal
        self._prog = progress(console, transient, remaining=True) if self.live else None
        self._task = None
        self._t0 = self._run_t0 = time.perf_counter()
        self._tile_t0: tuple[float, int] | None = None  # (time, done) where the rate counts from
        self._decile = self._last_done = 0
        self._unit = "tiles"  # what the counts count: "steps" in the stages before the tiles

    def __enter__(self) -> StageProgress:
        self._run_t0 = time.perf_counter()  # the items' rate leaves out loading the network
        if self._prog is not None:
            self._prog.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._prog is not None:
            self._prog.__exit__(*exc)

    def _line(self, text: str) -> None:
        # plain text: no markup, no colour, never wrapped into the next line's columns
        self.console.print(
            Text(f"[{_clock(time.perf_counter() - self._t0)}] {text}"), soft_wrap=True
        )

    def stage(self, name: str) -> None:
        label = STAGE_LABELS.get(name, name.replace("_", " "))
        self._unit = "tiles" if label.startswith("tiles") else "steps"
        if self.quiet:
            return
        # the time left counts from this stage's start: the stages' steps cost very different
        # times (a 12 MP pair's matching takes minutes in a few steps, its tiles seconds each)
        self._tile_t0 = (time.perf_counter(), self._last_done)
        if self._prog is None:
            self._line(label)
            return
        if self._task is not None:  # the finished stage stays shown, its clock stopped
            self._prog.stop_task(self._task)
        self._task = self._prog.add_task(label, total=None, note="")

    def tiles(self, done: int, total: int) -> None:
        if self.quiet or total <= 0:
            return
        now = time.perf_counter()
        if done < self._last_done:  # a second pass (self-adaptation's) counts from 1 again
            self._tile_t0, self._decile = None, 0
        self._last_done = done
        if self._tile_t0 is None:  # a caller without stages: the rate counts from this report
            self._tile_t0 = (now, done)
        if self._prog is not None:
            if self._task is None:
                self._task = self._prog.add_task("tiles", total=None, note="")
            self._prog.update(self._task, completed=done, total=total)
            return
        decile = 10 * done // total
        if decile <= self._decile and done < total:
            return
        self._decile = decile
        t, d0 = self._tile_t0
        rate = (now - t) / (done - d0) if done > d0 else None
        left = f", about {_clock(rate * (total - done))} left" if rate and done < total else ""
        self._line(f"{self._unit} {done}/{total} ({100 * done // total} %){left}")

    def items(self, done: int, total: int, name: str) -> None:
        """After each of `total` items (eval's images): a bar on a terminal, a line each else."""
        if self.quiet:
            return
        if self._prog is not None:
            if self._task is None:
                self._task = self._prog.add_task("evaluating", total=total, note="")
            self._prog.update(self._task, completed=done, total=total, note=name)
            return
        rate = (time.perf_counter() - self._run_t0) / max(done, 1)
        left = f", about {_clock(rate * (total - done))} left" if done < total else ""
        self._line(f"{done}/{total} {name}{left}")

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Around loading the network: a spinner on a terminal; piped, one line once it has
        loaded (a line before it would stand above a failure's one-sentence error)."""
        if self.quiet:
            yield
        elif self.live:
            with self.console.status("loading the network..."):
                yield
        else:
            t0 = time.perf_counter()
            yield
            self._line(f"loaded the network ({time.perf_counter() - t0:.1f} s)")


def json_default(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def batch_summary(results, wall: float, stats=None) -> None:
    """The failed pairs' table and the summary; `stats` (batch.BatchStats) adds the pairs per
    second and the share of the compute loop spent waiting for its next input."""
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    done = [r for r in results if r.status == "written"]
    if any(r.status != "skipped" for r in results):
        t = Table(title="failed pairs")
        t.add_column("pair")
        t.add_column("status")
        t.add_column("s", justify="right")
        t.add_column("message", overflow="fold")
        for r in results:
            if r.status == "failed":
                t.add_row(r.name, "[red]failed[/red]", f"{r.seconds:.2f}", r.message or "")
        if t.row_count:
            wide().print(t)
    mean = sum(r.seconds for r in done) / len(done) if done else 0.0
    s = Table(title="summary")
    columns = ["written", "skipped", "failed", "mean s/pair", "wall s"]
    row = [
        str(counts["written"]),
        str(counts["skipped"]),
        f"[red]{counts['failed']}[/red]" if counts["failed"] else "0",
        f"{mean:.2f}",
        f"{wall:.1f}",
    ]
    if stats is not None:
        idle = stats.compute_idle_share
        columns += ["pairs/s", "compute idle"]
        row += [f"{stats.pairs_per_s:.3f}", "-" if idle is None else f"{idle:.1%}"]
    for c in columns:
        s.add_column(c, justify="right")
    s.add_row(*row)
    wide().print(s)


_LABELS = {"sr": "SR", "no_ref": "SR, no reference", "bicubic": "bicubic"}


def eval_tables(report: dict[str, Any]) -> None:
    f = lambda v, p: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
    per = Table(title="per image: PSNR (dB) full / center / corner, SSIM full")
    per.add_column("image")
    for m in report["methods"]:
        per.add_column(_LABELS[m], justify="right")
    for r in report["images"]:
        per.add_row(
            r["name"],
            *(
                f"{f(r[m]['psnr'], 2)} / {f(r[m]['psnr_center'], 2)} / {f(r[m]['psnr_corner'], 2)}"
                f"  {f(r[m]['ssim'], 4)}"
                for m in report["methods"]
            ),
        )
    wide().print(per)
    passes = report.get("ensemble", 1)
    of = f", both network rows averaged over {passes} flipped passes" if passes > 1 else ""
    of += f", self-adaptation {report['adapt']} steps" if report.get("adapt") else ""
    mean = Table(title=f"mean over {report['count']} images{of}")
    mean.add_column("method")
    for c in ("PSNR", "PSNR center", "PSNR corner", "SSIM", "SSIM center", "SSIM corner"):
        mean.add_column(c, justify="right")
    for m in report["methods"]:
        v = report["mean"][m]
        mean.add_row(
            _LABELS[m],
            f(v["psnr"], 2), f(v["psnr_center"], 2), f(v["psnr_corner"], 2),
            f(v["ssim"], 4), f(v["ssim_center"], 4), f(v["ssim_corner"], 4),
        )  # fmt: skip
    wide().print(mean)
    summary = report.get("summary") or {}
    rows = [
        ("SR over bicubic, full image (dB)", "gain_db", 2),
        ("no reference over bicubic, full image (dB)", "no_ref_gain_db", 2),
        ("true over wrong reference, centre (dB)", "ref_gain_db", 2),
        ("SFM mask active, LR", "mask_fraction_lr", 3),
        ("SFM mask active, LRC", "mask_fraction_lrc", 3),
        ("seconds per image", "seconds", 2),
    ]
    rows = [(label, summary.get(k), p) for label, k, p in rows if k in summary]
    if rows:
        t = Table(title="what the reference and the network add (means over images)")
        t.add_column("")
        t.add_column("value", justify="right")
        for label, v, p in rows:
            t.add_row(label, f(v, p))
        wide().print(t)


def profile_table(rows: list[dict], meta: dict) -> None:
    p = meta["peaks"]
    title = (
        f"{meta['device_name']} ({meta['device']}), {meta['dtype']}, LR {meta['lr_size'][0]}x{meta['lr_size'][1]}; "
        f"measured peaks: {p['matmul_tflops']:.2f} TFLOP/s matmul, {p['copy_gbs']:.0f} GB/s copy"
    )
    t = Table(title=title)
    for c, j in (("", "left"), ("name", "left"), ("impl", "left"), ("ms", "right"), ("TFLOP/s", "right"),
                 ("GB/s", "right"), ("of peak", "right"), ("share of time", "right"), ("memory MiB", "right")):  # fmt: skip
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    f = lambda r, k, spec: "-" if r.get(k) is None else format(r[k], spec)  # noqa: E731
    for r in rows:
        t.add_row(
            r["kind"], r["name"], r["impl"], f(r, "ms", ".3f"), f(r, "tflops", ".3f"), f(r, "gbs", ".1f"),
            f(r, "share_of_peak", ".1%"), f(r, "share_of_time", ".0%"), f(r, "memory_mib", ".0f"),
        )  # fmt: skip
    wide().print(t)
    m = meta.get("matching") or {}
    if m:
        out.print(
            f"matching: {m.get('active_queries')}/{m.get('queries')} queries, "
            f"{m.get('active_keys')}/{m.get('keys')} keys active; work saved {m.get('work_saved', 0):.0%}"
        )
