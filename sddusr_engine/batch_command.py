"""The run behind `sddusr batch`: the pairs shared out over torchrun's ranks, the network
started on every rank, progress on stderr, the JSON and HTML reports, and the summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from . import report as html_report
from .cli_errors import describe
from .console import batch_summary, engine_line, err, progress
from .errors import UsageError
from .interrupt import on_abandon
from .process import releasing, trimming


def run_folder(
    indir: Path,
    outdir: Path,
    load: Callable[[str], Any],
    weights: Path | None,
    device: str,
    ensemble: int,
    adapt: int,
    overwrite: bool,
    ext: str,
    no_reference_ok: bool,
    report: Path | None,
    html: Path | None,
    quiet: bool = False,
) -> None:
    """Every pair of `indir` into `outdir`; `load(device)` starts the engine on a rank's device.
    Exits 1 when a pair failed, and re-raises Ctrl-C once what finished is reported. Progress:
    a bar on a terminal, a plain line per pair when stderr is piped, nothing with `quiet`
    (which prints the summary only when interrupted)."""
    from sddusr_engine.batch import (
        OUTPUT_SUFFIXES,
        BatchInterrupted,
        BatchStats,
        discover_pairs,
        gather_results,
        gather_stats,
        report_payload,
        run_batch,
        shard,
        write_report,
    )
    from sddusr_engine.distributed import close_dist, dist_context, rank_device, start_on_every_rank
    from sddusr_engine.io import check_writable

    if ext.lower().lstrip(".") not in OUTPUT_SUFFIXES:
        raise UsageError(f"--ext {ext!r} is not one of {', '.join(OUTPUT_SUFFIXES)}.")
    layout, jobs = discover_pairs(indir)
    if not jobs:
        raise UsageError(f"{indir} holds no image pairs ({layout} layout found, but empty).")
    check_writable([report, html], [outdir])
    ctx = dist_context(device)
    gathered = interrupted = False
    try:
        mine = shard(jobs, ctx.rank, ctx.world)
        dev = rank_device(device, ctx)
        lead = ctx.rank == 0
        console = err if lead and not quiet else Console(stderr=True, quiet=True)
        # piped stderr (or CI): plain lines, since a live bar there is only escape codes
        plain = not console.quiet and not console.is_terminal
        t_load = time.perf_counter()
        with console.status("loading the network...") if not plain else nullcontext():
            eng = start_on_every_rank(
                ctx,
                lambda: load(dev),
                describe,
            )
        where = (
            f" (rank {ctx.rank}/{ctx.world}: {len(mine)} of {len(jobs)} pairs)"
            if ctx.world > 1
            else ""
        )
        if plain:  # after loading: a failure's error stays the only line
            console.print(f"loaded the network ({time.perf_counter() - t_load:.1f} s)")
        console.print(
            f"[dim]{engine_line(eng, weights)}; {layout} layout, {len(jobs)} pairs{where}[/dim]"
        )
        t0 = time.perf_counter()
        bar = Console(stderr=True, quiet=True) if plain else console
        with progress(bar, transient=False, remaining=True) as prog:
            task = prog.add_task("batch", total=len(mine), note="")
            count, finished, stats = [0], [], BatchStats()

            def on_result(r):
                finished.append(r)
                note = {
                    "written": f"{r.name}: {r.seconds:.2f} s",
                    "skipped": f"{r.name}: exists, skipped",
                    "failed": f"{r.name}: failed",
                }[r.status]
                count[0] += 1
                if plain:
                    console.print(Text(f"pair {count[0]}/{len(mine)} {note}"), soft_wrap=True)
                note = f"[red]{note}[/red]" if r.status == "failed" else note
                prog.update(task, advance=1, note=note)

            # for --html, an engine that keeps what the page shows
            pages = html_report.BatchPages(eng, html if lead else None)

            def rank_report(results, interrupted: bool) -> None:
                """Under torchrun, each rank's own results beside the gathered report."""
                write_report(
                    report.with_name(f"{report.stem}.rank{ctx.rank}{report.suffix or '.json'}"),
                    {"rank": ctx.rank, "world": ctx.world, "interrupted": interrupted,
                     **stats.to_dict(), "results": [r.to_dict() for r in results]},
                )  # fmt: skip

            def abandoned() -> None:
                """Ctrl-C while one pair's long operation would not yield: what finished, written
                as an interrupted run writes it."""
                done = list(finished)
                prog.stop()
                batch_summary(done, time.perf_counter() - t0, stats)
                if report is not None and ctx.world > 1:
                    rank_report(done, True)
                elif report is not None:
                    write_report(report, report_payload(indir, outdir, layout, ctx.world,
                                                        ensemble, adapt, done, jobs=mine,
                                                        stats=stats))  # fmt: skip

            try:
                with on_abandon(abandoned):
                    results = run_batch(
                        pages.engine,
                        mine,
                        outdir,
                        overwrite=overwrite,
                        ext=ext,
                        missing_reference="skip" if no_reference_ok else "error",
                        rank=ctx.rank,
                        on_result=on_result,
                        stats=stats,
                        # a batch of 12 MP pairs fragments the heap as one pair's stages do
                        progress=trimming(None),
                        on_stage=releasing(lambda _stage: None),
                    )
            except BatchInterrupted as stop:  # Ctrl-C: report what finished, then exit 130
                results, interrupted = stop.results, True
        wall = time.perf_counter() - t0
        if report is not None and ctx.world > 1:
            rank_report(results, interrupted)
        everything = results if interrupted else gather_results(results, ctx)
        overall = stats if interrupted else gather_stats(stats, ctx)
        gathered = not interrupted
    finally:
        close_dist(ctx, finished=gathered)
    failed = [r for r in everything if r.status == "failed"]
    if lead or interrupted:
        if interrupted or not quiet:
            batch_summary(everything, wall, overall)
        if report is not None and (ctx.world == 1 or not interrupted):
            write_report(
                report,
                report_payload(
                    indir, outdir, layout, ctx.world, ensemble, adapt, everything,
                    jobs=mine if interrupted else None, stats=overall,
                ),
            )  # fmt: skip
        pages.write(everything, jobs)  # after the JSON: a page that fails leaves it written
    if interrupted:
        raise KeyboardInterrupt
    if failed:
        if lead:
            err.print(
                Text(
                    f"error: {len(failed)} of {len(everything)} pairs failed (listed above).",
                    style="bold red",
                ),
                soft_wrap=True,
            )
        raise typer.Exit(1)
