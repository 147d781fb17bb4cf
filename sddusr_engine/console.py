"""What the `sddusr` commands print: the two consoles (results on stdout, everything else on
stderr), progress bars, the engine's one-line description and the tables of batch, eval and
profile."""

from __future__ import annotations

import math
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


def progress(console: Console, transient: bool = True) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=transient,
    )


def tile_progress(progress: Progress, task):
    def cb(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return cb


def json_default(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def batch_summary(results, wall: float) -> None:
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
    for c in ("written", "skipped", "failed", "mean s/pair", "wall s"):
        s.add_column(c, justify="right")
    s.add_row(
        str(counts["written"]),
        str(counts["skipped"]),
        f"[red]{counts['failed']}[/red]" if counts["failed"] else "0",
        f"{mean:.2f}",
        f"{wall:.1f}",
    )
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
