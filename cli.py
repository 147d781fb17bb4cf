"""The `sddusr` command line (typer + rich): demo, sr, batch, eval, profile, convert, train.

This file is the module `sddusr_engine.cli` (sddusr_engine/cli.py links here): absolute imports only.
Every user error (missing file, unreadable image, footprint not found, bad weights, out of memory,
bad option) prints one sentence in red on stderr and exits non-zero; `sddusr --debug ...` re-raises
instead, with the traceback. Heavy modules (torch, the engine) are imported inside the commands so
that `sddusr --help` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
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

app = typer.Typer(
    name="sddusr",
    help="Dual-lens x2 super-resolution: enlarge a wide photo using its telephoto twin as a "
    "high-resolution reference.",
    epilog="Example: sddusr sr wide.jpg tele.jpg -o wide_x2.png",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Backend(str, Enum):
    auto = "auto"
    triton = "triton"
    torch = "torch"


# ----------------------------------------------------------------------------- error boundary


class CLIError(Exception):
    """A user error found by the CLI itself; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 1) -> None:
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _user_message(e: BaseException) -> tuple[str, int] | None:
    """(sentence, exit code) for an error a user can act on; None for a bug."""
    from sddusr_engine.io import ImageReadError

    if isinstance(e, CLIError):
        return str(e), e.code
    name = type(e).__name__
    if name == "OutOfMemoryError":
        return (
            "out of GPU memory; try a smaller --tile (e.g. --tile 128), --precision fp16, "
            "or --device cpu.",
            1,
        )
    user_types: tuple[type, ...] = (ImageReadError, FileNotFoundError, PermissionError, OSError)
    for mod, cls in (
        ("sddusr_engine.weights", "WeightsError"),
        ("sddusr_engine.engine", "EngineError"),
        ("sddusr_engine.registration", "FootprintNotFoundError"),
        ("sddusr_engine.batch", "BatchUsageError"),
        ("sddusr_engine.evaluate", "EvalError"),
    ):
        t = getattr(sys.modules.get(mod), cls, None)
        if t is not None:
            user_types += (t,)
    if isinstance(e, user_types):
        msg = str(e).strip() or name
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg} ({e.filename})"
        if name == "FootprintNotFoundError":
            msg = msg.rstrip(".") + "; pass --no-reference-ok to enlarge the wide photo without it."
        code = 2 if name == "BatchUsageError" else 1
        return msg, code
    if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
        return "out of memory; try a smaller --tile or a smaller image.", 1
    return None


_STATE = {"debug": False}  # set by the root callback for the command that follows


def _describe(e: BaseException) -> str:
    known = _user_message(e)
    return known[0] if known else f"{type(e).__name__}: {e}"


def guarded(fn):
    """Turn the project's user errors into one red sentence on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = _STATE["debug"] or os.environ.get("SDDUSR_DEBUG", "") not in ("", "0")
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            err.print(Text("interrupted.", style="red"))
            raise typer.Exit(130) from None
        except Exception as e:
            if debug:
                raise
            known = _user_message(e)
            if known is None:
                first = (str(e).strip().splitlines() or [""])[0]
                _fail(
                    f"internal error ({type(e).__name__}: {first}); rerun with `sddusr --debug ...` "
                    "for the traceback and report it.",
                    3,
                )
            msg, code = known
            lines = msg.splitlines()
            err.print(Text(f"error: {lines[0]}", style="bold red"), soft_wrap=True)
            for line in lines[1:]:  # e.g. the list of missing weight keys
                err.print(Text(line, style="red"), soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an error.")
    ] = False,
) -> None:
    _STATE["debug"] = debug


# ----------------------------------------------------------------------------- shared helpers

WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        "-w",
        envvar="SDDUSR_WEIGHTS",
        help="Weights file (.safetensors, or a KeDuSR .pth); default: the shipped weights.",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", "-p", help="Compute precision.")]
BackendOpt = Annotated[Backend, typer.Option(help="Kernels: triton (GPU) or torch (reference).")]
TileOpt = Annotated[
    int, typer.Option(help="LR tile side in pixels (0 = whole image); smaller uses less memory.")
]
EnsembleOpt = Annotated[
    int,
    typer.Option(
        "--ensemble",
        help="Average 1, 2, 4 or 8 flipped/transposed passes: N times the time, a cleaner result.",
    ),
]


AdaptOpt = Annotated[
    int,
    typer.Option(
        "--adapt",
        metavar="STEPS",
        help="Self-adaptation: fine-tune a copy of the network on each pair's telephoto footprint "
        "for STEPS steps (100 measured; 0 = off), sharper corners, seconds per pair on a GPU.",
    ),
]


def _load_engine(
    weights: Path | None,
    device: str,
    precision: Precision,
    backend: Backend,
    tile: int,
    ensemble: int = 1,
    adapt: int = 0,
):
    from sddusr_engine.engine import ENSEMBLE_SIZES, MAX_ADAPT_STEPS, Engine
    from sddusr_engine.weights import DEFAULT_WEIGHTS

    if ensemble not in ENSEMBLE_SIZES:
        sizes = ", ".join(map(str, ENSEMBLE_SIZES))
        raise CLIError(f"--ensemble must be one of {sizes}, not {ensemble}.", 2)
    if not 0 <= adapt <= MAX_ADAPT_STEPS:
        raise CLIError(f"--adapt must be 0 (off) to {MAX_ADAPT_STEPS} steps, not {adapt}.", 2)
    if weights is None and not DEFAULT_WEIGHTS.is_file():
        raise CLIError(
            f"the default weights are not installed ({DEFAULT_WEIGHTS}); pass a weights file "
            "with --weights FILE (or set SDDUSR_WEIGHTS)."
        )
    if weights is not None and not weights.is_file():
        raise CLIError(f"weights file not found: {weights}")
    return Engine.from_pretrained(
        weights,
        device=device,
        dtype=precision.value,
        backend=backend.value,
        tile=tile,
        ensemble=ensemble,
        adapt=adapt,
    )


def _engine_line(eng, weights: Path | None) -> str:
    dt = str(eng.dtype).replace("torch.", "")
    name = weights.name if weights else "default weights"
    passes = f", ensemble of {eng.ensemble} passes" if eng.ensemble > 1 else ""
    passes += f", self-adaptation {eng.adapt.steps} steps" if eng.adapt.steps else ""
    return f"{eng.config.variant} ({name}) on {eng.device}, {dt}, {eng.backend} kernels, tile {eng.tile or 'whole'}{passes}"


def _wide() -> Console:
    """The console for tables: stdout, at least 160 columns wide when it is not a terminal."""
    return out if out.is_terminal else Console(highlight=False, width=max(out.width, 160))


def _progress(console: Console, transient: bool = True) -> Progress:
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


def _tile_progress(progress: Progress, task):
    def cb(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return cb


def _bicubic_x2(img):
    import cv2

    h, w = img.shape[:2]
    return cv2.resize(img, (2 * w, 2 * h), interpolation=cv2.INTER_CUBIC)


def _to_u8(img):
    import numpy as np

    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return img


def comparison_image(wide, sr, corners=None, box=None):
    """Side by side: bicubic x2 of `wide` (footprint polygon in yellow, centre box in cyan) | SR."""
    import cv2
    import numpy as np

    left = np.ascontiguousarray(_to_u8(_bicubic_x2(wide)))
    right = np.ascontiguousarray(_to_u8(sr))
    thick = max(1, round(left.shape[1] / 400))
    if corners is not None:
        # LR pixel x -> 2x pixel 2x + 0.5 (pixel-centre convention); drawn with 4-bit sub-pixels
        pts = np.rint((2 * np.asarray(corners, float) + 0.5) * 16).astype(np.int32)
        cv2.polylines(left, [pts.reshape(-1, 1, 2)], True, (255, 220, 0), thick, cv2.LINE_AA, 4)
    if box is not None:
        y0, y1, x0, x1 = (2 * int(v) for v in box)
        cv2.rectangle(left, (x0, y0), (x1 - 1, y1 - 1), (0, 220, 255), thick)
    gap = np.full((left.shape[0], max(4, thick * 4), 3), 255, np.uint8)
    both = np.concatenate([left, gap, right], axis=1)
    scale = max(0.4, left.shape[1] / 900)
    for text, x in (("bicubic x2", 8), ("SR x2", left.shape[1] + gap.shape[1] + 8)):
        org = (x, int(24 * scale) + 4)
        cv2.putText(
            both, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3 * thick, cv2.LINE_AA
        )
        cv2.putText(
            both, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA
        )
    return both


def _map_images(info, lr_shape) -> dict[str, Any]:
    """Figure-4 style PNGs from info.maps, upsampled (nearest) to the LR size."""
    import cv2
    import numpy as np

    maps = info.maps
    h, w = lr_shape[:2]

    def big(a):
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST)

    images: dict[str, Any] = {}
    for name in ("mask_lr", "mask_lrc"):
        if name in maps:
            m = (np.asarray(maps[name], np.float32) > 0.5).astype(np.uint8) * 255
            if name == "mask_lrc" and info.box_lr is not None:
                y0, y1, x0, x1 = info.box_lr
                images[name] = cv2.resize(m, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
            else:
                images[name] = big(m)
    if "confidence" in maps:
        c = np.clip(np.asarray(maps["confidence"], np.float32), 0, 1)
        images["confidence"] = big(np.rint(c * 255).astype(np.uint8))
    if "index" in maps:
        idx = np.asarray(maps["index"]).astype(np.int64)
        wk = int(np.asarray(maps.get("key_grid_width", 0)))
        if wk <= 0 and info.box_lr is not None:
            wk = max(1, (info.box_lr[3] - info.box_lr[2]) // 2)
        wk = max(wk, 1)
        valid = idx >= 0
        if info.box_lr is not None:
            hk = max(1, (info.box_lr[1] - info.box_lr[0]) // 2)
        else:
            hk = max(1, int(idx.max()) // wk + 1) if valid.any() else 1
        rgb = np.zeros((*idx.shape, 3), np.uint8)
        # red = matched key's x, green = its y across the LRC grid, blue = 128 where matched
        rgb[..., 0] = np.where(valid, np.rint(255 * (idx % wk) / max(wk - 1, 1)), 0)
        rgb[..., 1] = np.where(valid, np.rint(255 * (idx // wk) / max(hk - 1, 1)), 0)
        rgb[..., 2] = np.where(valid, 128, 0)
        images["index"] = big(rgb)
    return images


# ----------------------------------------------------------------------------- demo


def _sample_dir() -> Path:
    from sddusr_engine.shipped import sample_dir

    return sample_dir()


@app.command(epilog="Example: sddusr demo -o ./sddusr-demo")
@guarded
def demo(
    outdir: Annotated[
        Path, typer.Option("--outdir", "-o", help="Folder for sr.png and comparison.png.")
    ] = Path("sddusr-demo"),
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    backend: BackendOpt = Backend.auto,
    tile: TileOpt = 256,
    ensemble: EnsembleOpt = 1,
    adapt: AdaptOpt = 0,
    shrink: Annotated[
        int,
        typer.Option(
            min=1, max=8, help="Shrink the sample pair N times first (a quick look on a CPU)."
        ),
    ] = 1,
) -> None:
    """Super-resolve the bundled sample pair and write the result and a side-by-side comparison."""
    import cv2

    from sddusr_engine.io import read_image, write_image

    sample = _sample_dir()
    wide, tele = read_image(sample / "wide.jpg"), read_image(sample / "tele.jpg")
    if shrink > 1:
        wide, tele = (
            cv2.resize(
                a, (a.shape[1] // shrink, a.shape[0] // shrink), interpolation=cv2.INTER_AREA
            )
            for a in (wide, tele)
        )
    with err.status("loading the network..."):
        eng = _load_engine(weights, device, precision, backend, tile, ensemble, adapt)
    err.print(f"[dim]{_engine_line(eng, weights)}[/dim]")
    err.print(
        f"sample pair: wide {wide.shape[1]}x{wide.shape[0]}, tele {tele.shape[1]}x{tele.shape[0]} ({sample})"
    )
    with _progress(err) as prog:
        task = prog.add_task("super-resolving", total=None, note="")
        with warnings.catch_warnings():  # printed below from info.warnings
            warnings.simplefilter("ignore")
            sr, info = eng.super_resolve(
                wide, tele, return_info=True, progress=_tile_progress(prog, task)
            )
    outdir.mkdir(parents=True, exist_ok=True)
    sr_path, cmp_path = outdir / "sr.png", outdir / "comparison.png"
    write_image(sr_path, sr)
    corners = None if info.footprint is None else info.footprint.corners
    write_image(cmp_path, comparison_image(wide, sr, corners, info.box_lr))
    for w in info.warnings:
        err.print(Text(f"warning: {w}", style="yellow"), soft_wrap=True)
    total = sum(info.timings.values())
    out.print(f"wrote {sr_path} ({sr.shape[1]}x{sr.shape[0]}) in {total / 1e3:.1f} s")
    out.print(f"wrote {cmp_path} (left: bicubic x2 with the telephoto's footprint; right: SR)")


# ----------------------------------------------------------------------------- sr


@app.command(epilog="Example: sddusr sr wide.jpg tele.jpg -o wide_x2.png --save-maps maps/ --json")
@guarded
def sr(
    wide: Annotated[Path, typer.Argument(help="The wide-angle photo (the image to enlarge).")],
    tele: Annotated[Path, typer.Argument(help="The telephoto photo taken with it.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output image (.png/.tif keep 16 bits).")
    ],
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    backend: BackendOpt = Backend.auto,
    tile: TileOpt = 256,
    ensemble: EnsembleOpt = 1,
    adapt: AdaptOpt = 0,
    no_reference_ok: Annotated[
        bool,
        typer.Option(
            "--no-reference-ok",
            help="If the telephoto cannot be located, enlarge without it (warns).",
        ),
    ] = False,
    save_maps: Annotated[
        Path | None, typer.Option(help="Folder for mask_lr/mask_lrc/confidence/index PNGs.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout.")
    ] = False,
) -> None:
    """Enlarge one wide photo x2 using its telephoto as the reference."""
    from sddusr_engine.io import read_image, write_image

    if output.suffix.lower() not in (".png", ".tif", ".tiff", ".jpg", ".jpeg"):
        raise CLIError(f"output {output} must end in .png, .tif, .tiff, .jpg or .jpeg.", 2)
    wide_a, tele_a = read_image(wide), read_image(tele)
    with err.status("loading the network..."):
        eng = _load_engine(weights, device, precision, backend, tile, ensemble, adapt)
    if not as_json:
        err.print(f"[dim]{_engine_line(eng, weights)}[/dim]")
    with _progress(err) as prog, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine's warnings are printed from info.warnings
        task = prog.add_task("super-resolving", total=None, note="")
        result, info = eng.super_resolve(
            wide_a,
            tele_a,
            missing_reference="skip" if no_reference_ok else "error",
            return_info=True,
            keep_maps=save_maps is not None,
            progress=_tile_progress(prog, task),
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    write_image(output, result)
    written_maps = []
    if save_maps is not None:
        save_maps.mkdir(parents=True, exist_ok=True)
        for name, img in _map_images(info, wide_a.shape).items():
            p = save_maps / f"{name}.png"
            write_image(p, img)
            written_maps.append(str(p))
    for w in info.warnings:
        err.print(Text(f"warning: {w}", style="yellow"), soft_wrap=True)
    if as_json:
        summary = {
            "output": str(output),
            "input_size": [int(wide_a.shape[0]), int(wide_a.shape[1])],
            "output_size": [int(result.shape[0]), int(result.shape[1])],
            "bit_depth": 16 if str(result.dtype) == "uint16" else 8,
            "variant": eng.config.variant,
            "device": str(eng.device),
            "dtype": str(eng.dtype).replace("torch.", ""),
            "backend": eng.backend,
            "maps": written_maps,
            **info.to_dict(),
        }
        sys.stdout.write(json.dumps(summary, indent=2, default=_json_default) + "\n")
        return
    total = sum(info.timings.values())
    out.print(f"wrote {output} ({result.shape[1]}x{result.shape[0]}) in {total / 1e3:.2f} s")
    if info.matching:
        m = info.matching
        frac = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        out.print(
            f"active LR {frac(info.mask_fraction_lr)}, active LRC {frac(info.mask_fraction_lrc)}, "
            f"matching work saved {frac(m.get('work_saved'))}"
        )
    for p in written_maps:
        out.print(f"wrote {p}")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


# ----------------------------------------------------------------------------- batch


@app.command(
    epilog="Example: sddusr batch photos/ -o photos_x2/   (photos/wide/*.jpg + photos/tele/*.jpg); "
    "torchrun --nproc_per_node 4 -m sddusr_engine.cli batch DuSR-Real/test -o out/"
)
@guarded
def batch(
    indir: Annotated[
        Path,
        typer.Argument(help="IN/wide + IN/tele, or the published LR/LR_center/Ref_SIFT layout."),
    ],
    outdir: Annotated[
        Path, typer.Option("--output", "-o", help="Output folder (<name>.png per pair).")
    ],
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    backend: BackendOpt = Backend.auto,
    tile: TileOpt = 256,
    ensemble: EnsembleOpt = 1,
    adapt: AdaptOpt = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo pairs whose output exists.")
    ] = False,
    ext: Annotated[str, typer.Option(help="Output format: png, tif or jpg.")] = "png",
    no_reference_ok: Annotated[
        bool,
        typer.Option(
            "--no-reference-ok", help="Enlarge pairs whose telephoto cannot be located without it."
        ),
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write a JSON report of every pair here (and one per rank under torchrun)."
        ),
    ] = None,
) -> None:
    """Super-resolve every pair in a folder; bad pairs are reported and skipped."""
    from sddusr_engine.batch import (
        OUTPUT_SUFFIXES,
        close_dist,
        discover_pairs,
        dist_context,
        first_error,
        gather_results,
        run_batch,
        shard,
        write_report,
    )

    if ext.lower().lstrip(".") not in OUTPUT_SUFFIXES:
        raise CLIError(f"--ext {ext!r} is not one of {', '.join(OUTPUT_SUFFIXES)}.", 2)
    layout, jobs = discover_pairs(indir)
    if not jobs:
        raise CLIError(f"{indir} holds no image pairs ({layout} layout found, but empty).", 2)
    ctx = dist_context(device)
    gathered = False
    try:
        mine = shard(jobs, ctx.rank, ctx.world)
        dev = device
        if ctx.world > 1 and device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                dev = f"cuda:{ctx.local_rank}"
        lead = ctx.rank == 0
        console = err if lead else Console(stderr=True, quiet=True)
        eng, load_error = None, None
        with console.status("loading the network..."):
            try:
                eng = _load_engine(weights, dev, precision, backend, tile, ensemble, adapt)
            except Exception as e:  # noqa: BLE001 - shared with the other ranks below
                if ctx.world <= 1:
                    raise
                load_error = e
        # Under torchrun a rank that cannot load must not leave the others waiting in a gather.
        problem = first_error(ctx, None if load_error is None else _describe(load_error))
        if problem is not None:
            if load_error is not None:
                raise load_error
            raise CLIError(f"another rank could not start: {problem}")
        where = (
            f" (rank {ctx.rank}/{ctx.world}: {len(mine)} of {len(jobs)} pairs)"
            if ctx.world > 1
            else ""
        )
        console.print(
            f"[dim]{_engine_line(eng, weights)}; {layout} layout, {len(jobs)} pairs{where}[/dim]"
        )
        t0 = time.perf_counter()
        with _progress(console, transient=False) as prog:
            task = prog.add_task("batch", total=len(mine), note="")

            def on_result(r):
                note = {
                    "written": f"{r.name}: {r.seconds:.2f} s",
                    "skipped": f"{r.name}: exists, skipped",
                    "failed": f"[red]{r.name}: failed[/red]",
                }[r.status]
                prog.update(task, advance=1, note=note)

            results = run_batch(
                eng,
                mine,
                outdir,
                overwrite=overwrite,
                ext=ext,
                missing_reference="skip" if no_reference_ok else "error",
                rank=ctx.rank,
                on_result=on_result,
            )
        wall = time.perf_counter() - t0
        if report is not None and ctx.world > 1:
            write_report(
                report.with_name(f"{report.stem}.rank{ctx.rank}{report.suffix or '.json'}"),
                {"rank": ctx.rank, "world": ctx.world, "results": [r.to_dict() for r in results]},
            )
        everything = gather_results(results, ctx)
        gathered = True
    finally:
        close_dist(ctx, finished=gathered)
    failed = [r for r in everything if r.status == "failed"]
    if lead:
        _batch_summary(everything, wall)
        if report is not None:
            write_report(
                report,
                {
                    "input": str(indir),
                    "output": str(outdir),
                    "layout": layout,
                    "world": ctx.world,
                    "ensemble": ensemble,
                    "adapt": adapt,
                    "results": [r.to_dict() for r in everything],
                },
            )
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


def _batch_summary(results, wall: float) -> None:
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
            _wide().print(t)
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
    _wide().print(s)


# ----------------------------------------------------------------------------- eval


@app.command(
    "eval", epilog="Example: sddusr eval DuSR-Real --json dusr.json --csv dusr.csv --limit 10"
)
@guarded
def eval_(
    dataset: Annotated[
        Path,
        typer.Argument(
            help="Dataset root holding test/{LR,HR,LR_center,Ref_SIFT} and the boxes JSON."
        ),
    ],
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        Precision,
        typer.Option("--precision", "-p", help="Compute precision (fp32 for reported numbers)."),
    ] = Precision.fp32,
    backend: BackendOpt = Backend.auto,
    tile: TileOpt = 256,
    ensemble: EnsembleOpt = 1,
    adapt: AdaptOpt = 0,
    boxes: Annotated[
        Path | None, typer.Option(help="JSON: <name>.png -> [y0,y1,x0,x1] in HR pixels.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write per-image and mean metrics as JSON.")
    ] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write them as CSV.")] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="Evaluate the first N images only (0 = all).")
    ] = 0,
) -> None:
    """PSNR/SSIM (full, center, corner) of SR, the network without reference, and bicubic."""
    from sddusr_engine.evaluate import evaluate, find_dataset, write_csv, write_json

    items = find_dataset(dataset, boxes, limit or None)
    with err.status("loading the network..."):
        eng = _load_engine(weights, device, precision, backend, tile, ensemble, adapt)
    err.print(f"[dim]{_engine_line(eng, weights)}; {len(items)} images[/dim]")
    with _progress(err) as prog:
        task = prog.add_task("evaluating", total=len(items), note="")
        report = evaluate(
            eng,
            items,
            progress=lambda d, n, name: prog.update(task, completed=d, note=name),
        )
    report.update(
        dataset=str(dataset),
        weights=str(weights) if weights else "default",
        variant=eng.config.variant,
        dtype=str(eng.dtype).replace("torch.", ""),
        ensemble=eng.ensemble,
        adapt=eng.adapt.steps,  # self-adaptation steps per pair (0: off)
        # sigma of the weights' low-band projection outside the centre rect (None: none)
        low_band_sigma=eng.config.low_band_sigma or None,
    )
    _eval_tables(report)
    if json_path is not None:
        write_json(report, json_path)
        out.print(f"wrote {json_path}")
    if csv_path is not None:
        write_csv(report, csv_path)
        out.print(f"wrote {csv_path}")


_LABELS = {"sr": "SR", "no_ref": "SR, no reference", "bicubic": "bicubic"}


def _eval_tables(report: dict[str, Any]) -> None:
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
    _wide().print(per)
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
    _wide().print(mean)


# ----------------------------------------------------------------------------- profile


def _parse_size(size: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise CLIError(f"--size {size!r} is not HxW (e.g. 448x896).", 2) from None
    if h < 32 or w < 32 or h % 4 or w % 4:
        raise CLIError(f"--size {size}: both sides must be multiples of 4 and at least 32.", 2)
    return h, w


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, repeats: int, warmup: int = 1, best: bool = False) -> float:
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return min(times) if best else statistics.median(times)


def _measured_peaks(device, dtype) -> dict[str, float]:
    """Matrix-product FLOP/s and copy bandwidth of this device, measured now."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _time_ms(lambda: a @ b, device, 5, 2, best=True)
    src = torch.empty(
        64 * 2**20 if device.type == "cuda" else 8 * 2**20, dtype=torch.uint8, device=device
    )
    dst = torch.empty_like(src)
    cms = _time_ms(lambda: dst.copy_(src), device, 5, 2, best=True)
    return {
        "matmul_tflops": 2 * n**3 / ms / 1e9,
        "copy_gbs": 2 * src.numel() / cms / 1e6,
        "matmul_n": n,
    }


def _kernel_rows(device, dtype, lr_hw, repeats: int, backends: list[str], peaks) -> list[dict]:
    """Each kernel at the pipeline's shapes for an LR image of lr_hw, on each backend."""
    import torch

    from sddusr_engine.kernels import get_ops, patch_grid

    h, w = lr_hw
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    hq, wq, hk, wk = h // 2, w // 2, h // 4, w // 4  # LR and LRC (half LR) matching grids
    q, k = r(16, hq, wq), r(16, hk, wk)
    n_patch = patch_grid(h)[0] * patch_grid(w)[0]  # Ref-feature grid = LR size
    value = r(64, h, w)
    index = torch.randint(-1, n_patch, (hq, wq), generator=g).to(device)
    nq, nk = 4 * h * w, 128  # TDL learning: every output position against 128 tokens
    aq, ak, av = r(nq, 64), r(nk, 64), r(nk, 64)
    uq, uk, uv = (
        r(128, 64),
        r(h * w, 64),
        r(h * w, 64),
    )  # TDL update: 128 tokens vs all Ref positions
    x = r(1, 64, h, w)
    off = r(1, 144, h, w) * 3
    msk = torch.rand(1, 72, h, w, generator=g).to(device=device, dtype=dtype)
    wt, bias = r(64, 64, 3, 3) / 24, r(64)
    es = torch.tensor([], dtype=dtype).element_size()
    cases = [
        ("patch_match", "patch_match", (q, k), 2 * hq * wq * hk * wk * 144, None),
        ("patch_warp", "patch_warp", (value, index), None,
         (64 * 16 * hq * wq + value.numel()) * es + index.numel() * 8),
        ("attention (TDL learn)", "attention", (aq, ak, av, 0.125), 4 * nq * nk * 64, None),
        ("attention (TDL update)", "attention", (uq, uk, uv, 0.125), 4 * 128 * h * w * 64, None),
        ("deform_conv2d", "deform_conv2d", (x, off, msk, wt, bias), 2 * h * w * 64 * 64 * 9, None),
    ]  # fmt: skip
    rows = []
    for backend in backends:
        ops = get_ops(backend)
        for label, op, args, flops, nbytes in cases:
            fn = getattr(ops, op)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            ms = _time_ms(lambda fn=fn, args=args: fn(*args), device, repeats)
            mem = (
                (torch.cuda.max_memory_allocated(device) - base) / 2**20
                if device.type == "cuda"
                else None
            )
            row = {"kind": "kernel", "name": label, "impl": backend, "ms": ms, "memory_mib": mem}
            if flops:
                row["tflops"] = flops / ms / 1e9
                row["share_of_peak"] = row["tflops"] / peaks["matmul_tflops"]
            if nbytes:
                row["gbs"] = nbytes / ms / 1e6
                row["share_of_peak"] = row["gbs"] / peaks["copy_gbs"]
            rows.append(row)
    return rows


def _per_stage_counts(fc, device, flops: dict, memory: dict):
    """A stage hook for `Engine.run`: records each stage's FLOPs (from the counter `fc`) and, on
    CUDA, its peak memory."""
    import torch

    @contextlib.contextmanager
    def hook(stage):
        f0 = fc.get_total_flops()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        yield
        flops[stage] = flops.get(stage, 0) + fc.get_total_flops() - f0
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            memory[stage] = max(memory.get(stage, 0.0), peak)

    return hook


def _pipeline_rows(eng, lr_hw, repeats: int, peaks) -> tuple[list[dict], dict]:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = lr_hw
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    hc, wc = h // 2, w // 2
    y0, x0 = (h - hc) // 2 // 2 * 2, (w - wc) // 2 // 2 * 2
    lrc = np.ascontiguousarray(lr[y0 : y0 + hc, x0 : x0 + wc])
    ref = np.ascontiguousarray(np.repeat(np.repeat(lrc, 2, 0), 2, 1))
    dev = eng.device
    eng.run(lr, lrc, ref)  # warm-up
    timings: list[dict[str, float]] = []
    peak_mib = None
    infos = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        t0 = time.perf_counter()
        _, info = eng.run(lr, lrc, ref, return_info=True)
        _sync(dev)
        infos.append(info)
        timings.append({**info.timings, "total": 1e3 * (time.perf_counter() - t0)})
        if dev.type == "cuda":
            peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    flops: dict[str, float] = {}
    memory: dict[str, float] = {}
    # The FLOP counter's module tracker hooks parameters that require grad; none are needed here.
    for p in eng.model.parameters():
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as fc:
            eng.run(lr, lrc, ref, stage_hook=_per_stage_counts(fc, dev, flops, memory))
        total_flops = float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - the FLOP counter is best effort
        flops, total_flops = {}, 0.0
    m = infos[-1].matching
    if m.get("pairs_evaluated"):
        # the kernels are not counted by the FLOP counter (Triton) or counted densely (reference)
        total_flops += 2.0 * 144 * m["pairs_evaluated"] - flops.get("matching", 0.0)
        flops["matching"] = 2.0 * 144 * m["pairs_evaluated"]
    stages = list(timings[0])
    rows = []
    med = lambda vals: float(np.median(vals))  # noqa: E731
    total_ms = med([t["total"] for t in timings])
    for s in stages:
        ms = med([t.get(s, 0.0) for t in timings])
        row = {
            "kind": "stage",
            "name": s,
            "impl": eng.backend,
            "ms": ms,
            "share_of_time": ms / total_ms,
        }
        f = total_flops if s == "total" else flops.get(s)
        if f:
            row["gflop"] = f / 1e9
            row["tflops"] = f / ms / 1e9
            row["share_of_peak"] = row["tflops"] / peaks["matmul_tflops"]
        row["memory_mib"] = peak_mib if s == "total" else memory.get(s)
        rows.append(row)
    return rows, {"matching": m, "mask_fraction_lr": infos[-1].mask_fraction_lr,
                  "mask_fraction_lrc": infos[-1].mask_fraction_lrc}  # fmt: skip


@app.command(epilog="Example: sddusr profile --size 448x896 --json profile.json")
@guarded
def profile(
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write all rows and the device description here.")
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="LR size HxW (default 448x896 on a GPU, 64x96 on the CPU).")
    ] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    backend: BackendOpt = Backend.auto,
    tile: TileOpt = 256,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per row (median reported).")] = 3,
) -> None:
    """Time the kernels against their PyTorch references and the pipeline stage by stage."""
    import platform

    import torch

    from sddusr_engine.weights import DEFAULT_WEIGHTS

    gpu = torch.cuda.is_available() and device != "cpu"
    if not gpu:
        err.print(
            Text(
                "no CUDA GPU in use: profiling the torch path on the CPU at a small size "
                "(these are not GPU numbers).",
                style="yellow",
            ),
            soft_wrap=True,
        )
        device = "cpu"
    lr_hw = _parse_size(size or ("448x896" if gpu else "64x96"))
    tmp = None
    if weights is None and not DEFAULT_WEIGHTS.is_file():
        import tempfile

        from sddusr_engine.model.network import build_model
        from sddusr_engine.weights import save_weights

        err.print(
            Text(
                "default weights not installed: timing a randomly initialised sddusr network.",
                style="yellow",
            ),
            soft_wrap=True,
        )
        tmp = tempfile.TemporaryDirectory()
        weights = save_weights(build_model("sddusr"), Path(tmp.name) / "random.safetensors")
    try:
        with err.status("loading the network..."):
            eng = _load_engine(weights, device, precision, backend, tile)
        err.print(
            f"[dim]{_engine_line(eng, weights if tmp is None else None)}; LR {lr_hw[0]}x{lr_hw[1]}[/dim]"
        )
        with err.status("measuring the device's matmul and copy peaks..."):
            peaks = _measured_peaks(eng.device, eng.dtype)
        backends = (
            ["triton", "torch"]
            if eng.device.type == "cuda" and eng.backend == "triton"
            else ["torch"]
        )
        with err.status("timing the kernels..."):
            krows = _kernel_rows(eng.device, eng.dtype, lr_hw, repeats, backends, peaks)
        with err.status("timing the pipeline..."):
            prows, extra = _pipeline_rows(eng, lr_hw, repeats, peaks)
    finally:
        if tmp is not None:
            tmp.cleanup()
    dev_name = (
        torch.cuda.get_device_name(eng.device)
        if eng.device.type == "cuda"
        else platform.processor() or "CPU"
    )
    meta = {
        "device": str(eng.device),
        "device_name": dev_name,
        "gpu": eng.device.type == "cuda",
        "dtype": str(eng.dtype).replace("torch.", ""),
        "backend": eng.backend,
        "lr_size": list(lr_hw),
        "torch": torch.__version__,
        "peaks": peaks,
        **extra,
    }
    _profile_table(krows + prows, meta)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(
            json.dumps({"meta": meta, "rows": krows + prows}, indent=2, default=_json_default)
            + "\n"
        )
        out.print(f"wrote {json_path}")


def _profile_table(rows: list[dict], meta: dict) -> None:
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
    _wide().print(t)
    m = meta.get("matching") or {}
    if m:
        out.print(
            f"matching: {m.get('active_queries')}/{m.get('queries')} queries, "
            f"{m.get('active_keys')}/{m.get('keys')} keys active; work saved {m.get('work_saved', 0):.0%}"
        )


# ----------------------------------------------------------------------------- convert, train


@app.command(epilog="Example: sddusr convert KeDuSR_DuSR-Real.pth weights/kedusr_dusr.safetensors")
@guarded
def convert(
    src: Annotated[Path, typer.Argument(help="A KeDuSR checkpoint (.pth).")],
    dst: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
) -> None:
    """Convert a published KeDuSR checkpoint to this engine's safetensors format."""
    from sddusr_engine.weights import convert_kedusr, read_weights

    if dst.suffix.lower() != ".safetensors":
        raise CLIError(f"the output {dst} must end in .safetensors.", 2)
    with err.status("converting..."):
        path = convert_kedusr(src, dst)
    tensors, config = read_weights(path)
    n = sum(t.numel() for t in tensors.values())
    out.print(f"wrote {path}: {config.variant}, {len(tensors)} tensors, {n:,} parameters")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
    epilog="Example: sddusr train --data data/pairs --out runs/sddusr",
)
@guarded
def train(ctx: typer.Context) -> None:
    """Train a network (arguments go to `python -m sddusr_engine.train`; see its --help)."""
    from sddusr_engine import train as trainer

    args = list(ctx.args)
    if any(a in ("-h", "--help") for a in args):
        out.print("Train a network; every argument goes to `python -m sddusr_engine.train`.")
        out.print("Example: sddusr train --data data/pairs --out runs/sddusr")
        out.print("The trainer's own options:\n")
    parser = trainer.build_parser()
    parser.prog = "sddusr train"
    try:
        trainer.main(args, parser=parser)
    except SystemExit as e:  # argparse: --help, or a usage error (already printed)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.print(Text(e.code, style="red"), soft_wrap=True)
        if code:
            raise typer.Exit(code) from None


# ----------------------------------------------------------------------------- entry point


def main() -> None:
    """Console-script entry point (`sddusr`)."""
    app(prog_name="sddusr")


if __name__ == "__main__":
    main()
