"""The `sddusr` command line (typer + rich): demo, sr, batch, eval, profile, convert, train.

Installed as the module `sddusr_engine.cli` (setup.py maps it there), so it uses absolute imports
only. Each command reads its options, calls the engine and prints through `console`; every user
error (missing file, unreadable image, footprint not found, bad weights, out of memory, bad
option) becomes one sentence on stderr and a non-zero exit in `cli_errors.guarded`, and
`sddusr --debug ...` re-raises instead, with the traceback. Heavy modules (torch, the engine) are
imported inside the commands so that `sddusr --help` stays fast.
"""

from __future__ import annotations

import json
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from sddusr_engine import report as html_report  # light: its numpy and cv2 load when used
from sddusr_engine.cli_errors import (
    STATE,
    guarded,
    load_engine,
    plain_help_and_errors,
    refuse_existing,
)
from sddusr_engine.console import (
    StageProgress,
    engine_line,
    err,
    eval_tables,
    json_default,
    out,
    profile_table,
    warn,
)
from sddusr_engine.errors import UsageError
from sddusr_engine.process import releasing, trimming

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
plain_help_and_errors()


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Backend(str, Enum):
    auto = "auto"
    triton = "triton"
    torch = "torch"


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of an error.")
    ] = False,
) -> None:
    STATE["debug"] = debug


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
    int | None,
    typer.Option(
        show_default="auto",
        help="LR tile side in pixels (0 = whole image); a tile given bounds the memory "
        "(on a GPU the whole-image maps then wait in host memory). "
        "Default: picked from the free memory (GPU: the whole image when it fits; CPU: "
        "128-pixel tiles keeping the fusion maps), else 256.",
    ),
]
EnsembleOpt = Annotated[
    int,
    typer.Option(
        "--ensemble",
        help="Average 1, 2, 4 or 8 flipped/transposed passes: N times the time, a cleaner result.",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")
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


# ----------------------------------------------------------------------------- demo


@app.command(epilog="Example: sddusr demo -o ./sddusr-demo")
@guarded
def demo(
    outdir: Annotated[
        Path, typer.Option("--outdir", "-o", help="Folder for sr.png, comparison.png, report.html.")
    ] = Path("sddusr-demo"),
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    backend: BackendOpt = Backend.auto,
    tile: TileOpt = None,
    ensemble: EnsembleOpt = 1,
    adapt: AdaptOpt = 0,
    shrink: Annotated[
        int,
        typer.Option(
            min=1, max=8, help="Shrink the sample pair N times first (a quick look on a CPU)."
        ),
    ] = 1,
    quiet: QuietOpt = False,
) -> None:
    """Super-resolve the bundled sample pair and write the result and a comparison to judge it."""
    import cv2

    from sddusr_engine.compare import comparison_from_run
    from sddusr_engine.io import check_writable, read_image, write_images
    from sddusr_engine.shipped import sample_dir

    check_writable(folders=[outdir])  # the demo replaces its own folder's sr.png, comparison.png
    sample = sample_dir()
    wide, tele = read_image(sample / "wide.jpg"), read_image(sample / "tele.jpg")
    if shrink > 1:
        wide, tele = (
            cv2.resize(
                a, (a.shape[1] // shrink, a.shape[0] // shrink), interpolation=cv2.INTER_AREA
            )
            for a in (wide, tele)
        )
    show = StageProgress(err, quiet)
    with show.loading():
        eng = load_engine(weights, device, precision, backend, tile, ensemble, adapt)
    if not quiet:
        err.print(f"[dim]{engine_line(eng, weights)}[/dim]")
        err.print(
            f"sample pair: wide {wide.shape[1]}x{wide.shape[0]}, tele {tele.shape[1]}x{tele.shape[0]} ({sample})"
        )
    with show, warnings.catch_warnings():  # the warnings are printed below from info.warnings
        warnings.simplefilter("ignore")
        sr, info = eng.super_resolve(
            wide,
            tele,
            return_info=True,
            keep_maps=True,
            progress=trimming(show.tiles),
            on_stage=releasing(show.stage),
        )
    outdir.mkdir(parents=True, exist_ok=True)
    sr_path, cmp_path = outdir / "sr.png", outdir / "comparison.png"
    page = outdir / "report.html"
    html = html_report.pair_html(page, sr_path, wide, sr, info)
    write_images({sr_path: sr, cmp_path: comparison_from_run(wide, sr, info)}, texts={page: html})
    if quiet:
        return
    for w in info.warnings:
        warn(w)
    total = sum(info.timings.values())
    out.print(f"wrote {sr_path} ({sr.shape[1]}x{sr.shape[0]}) in {total / 1e3:.1f} s")
    out.print(f"wrote {cmp_path} (the footprint, and crops: bicubic | SR | telephoto)")
    out.print(f"wrote {page}")


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
    tile: TileOpt = None,
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
    comparison: Annotated[Path | None, typer.Option(help="Also write a comparison image.")] = None,
    html: Annotated[Path | None, typer.Option(help="Also write an HTML report (one file).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the output (and maps) if they exist.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Enlarge one wide photo x2 using its telephoto as the reference."""
    from sddusr_engine.compare import comparison_from_run, map_images
    from sddusr_engine.io import check_size, check_writable, read_image, write_images
    from sddusr_engine.registration.prior import exif_zoom

    for p in (output, comparison or output):
        if p.suffix.lower() not in (".png", ".tif", ".tiff", ".jpg", ".jpeg"):
            raise UsageError(f"output {p} must end in .png, .tif, .tiff, .jpg or .jpeg.")
    names = ("mask_lr", "mask_lrc", "confidence", "index") if save_maps else ()
    check_writable([output, comparison, html], [save_maps])
    maps_out = [save_maps / f"{n}.png" for n in names]
    refuse_existing(output, comparison, html, *maps_out, overwrite=overwrite)
    notes: list[str] = []
    wide_a, tele_a = read_image(wide, notes), read_image(tele, notes)
    check_size(wide_a, wide)
    show = StageProgress(err, quiet)
    with show.loading():
        eng = load_engine(weights, device, precision, backend, tile, ensemble, adapt)
    if not (as_json or quiet):
        err.print(f"[dim]{engine_line(eng, weights)}[/dim]")
    with show, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine's warnings are printed from info.warnings
        result, info = eng.super_resolve(
            wide_a,
            tele_a,
            missing_reference="skip" if no_reference_ok else "error",
            return_info=True,
            keep_maps=(save_maps or comparison or html) is not None,
            progress=trimming(show.tiles),
            on_stage=releasing(show.stage),
            zoom_prior=exif_zoom(wide, tele, wide_a, tele_a),
        )
    maps = map_images(info, wide_a.shape) if save_maps is not None else {}
    images = {save_maps / f"{n}.png": img for n, img in maps.items()}
    cmp = {comparison: comparison_from_run(wide_a, result, info)} if comparison else {}
    for folder in {output.parent, *(p.parent for p in [*images, *cmp, *filter(None, [html])])}:
        folder.mkdir(parents=True, exist_ok=True)
    page = {} if html is None else {html: html_report.pair_html(html, output, wide_a, result,
                                                               info, (wide, tele))}  # fmt: skip
    write_images({output: result, **images, **cmp}, texts=page)  # all of them, or none
    written_maps = [str(p) for p in images]
    for w in [] if quiet else [*notes, *info.warnings]:
        warn(w)
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
            "comparison": None if comparison is None else str(comparison),
            "html": None if html is None else str(html),
            **info.to_dict(),
        }
        sys.stdout.write(json.dumps(summary, indent=2, default=json_default) + "\n")
    if as_json or quiet:
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
    for p in [*written_maps, *map(str, cmp), *map(str, filter(None, [html]))]:
        out.print(f"wrote {p}")


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
    tile: TileOpt = None,
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
    html: Annotated[Path | None, typer.Option(help="Also write an HTML report (one file).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Super-resolve every pair in a folder; bad pairs are reported and skipped."""
    from sddusr_engine.batch_command import run_folder

    run_folder(
        indir, outdir, lambda dev: load_engine(weights, dev, precision, backend, tile, ensemble, adapt),
        weights, device, ensemble, adapt, overwrite, ext, no_reference_ok, report, html, quiet,
    )  # fmt: skip


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
    tile: TileOpt = None,
    ensemble: EnsembleOpt = 1,
    adapt: AdaptOpt = 0,
    boxes: Annotated[
        Path | None, typer.Option(help="JSON: <name>.png -> \\[y0,y1,x0,x1] in HR pixels.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write per-image and mean metrics as JSON.")
    ] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write them as CSV.")] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="Evaluate the first N images only (0 = all).")
    ] = 0,
    only: Annotated[
        str | None,
        typer.Option(metavar="GLOB", help='Only images whose name matches (e.g. "*_0").'),
    ] = None,
    wrong_ref: Annotated[
        bool,
        typer.Option(
            "--wrong-ref/--no-wrong-ref",
            help="Also score each centre with another photo's reference (the control).",
        ),
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """PSNR/SSIM (full, center, corner) of SR, the network without reference, and bicubic."""
    from sddusr_engine.evaluate import evaluate, find_dataset, write_csv, write_json
    from sddusr_engine.io import check_writable

    check_writable([json_path, csv_path])
    items = find_dataset(dataset, boxes)
    show = StageProgress(err, quiet)
    with show.loading():
        eng = load_engine(weights, device, precision, backend, tile, ensemble, adapt)
    with show:
        report = evaluate(
            eng,
            items,
            limit=limit or None,
            only=only,
            wrong_reference=wrong_ref,
            weights=weights,
            progress=show.items,
        )
    report["dataset"] = str(dataset)
    if json_path is not None:
        write_json(report, json_path)
    if csv_path is not None:
        write_csv(report, csv_path)
    if quiet:
        return
    err.print(f"[dim]{engine_line(eng, weights)}; {report['count']} images[/dim]")
    eval_tables(report)
    for p in filter(None, [json_path, csv_path]):
        out.print(f"wrote {p}")


# ----------------------------------------------------------------------------- profile


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
    tile: TileOpt = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per row (median reported).")] = 3,
) -> None:
    """Time the kernels against their PyTorch references and the pipeline stage by stage."""
    import tempfile

    import torch

    from sddusr_engine.io import atomic_output, check_writable
    from sddusr_engine.profiling import parse_size, random_weights
    from sddusr_engine.profiling import profile as run_profile
    from sddusr_engine.weights import DEFAULT_WEIGHTS

    check_writable([json_path])
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
    lr_hw = parse_size(size or ("448x896" if gpu else "64x96"))
    tmp = None
    if weights is None and not DEFAULT_WEIGHTS.is_file():
        err.print(
            Text(
                "default weights not installed: timing a randomly initialised sddusr network.",
                style="yellow",
            ),
            soft_wrap=True,
        )
        tmp = tempfile.TemporaryDirectory()
        weights = random_weights(Path(tmp.name))
    try:
        with err.status("loading the network..."):
            eng = load_engine(weights, device, precision, backend, tile)
        err.print(
            f"[dim]{engine_line(eng, weights if tmp is None else None)}; LR {lr_hw[0]}x{lr_hw[1]}[/dim]"
        )
        rows, meta = run_profile(eng, lr_hw, repeats, status=err.status)
    finally:
        if tmp is not None:
            tmp.cleanup()
    profile_table(rows, meta)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=json_default))
        out.print(f"wrote {json_path}")


# ----------------------------------------------------------------------------- convert, train


@app.command(epilog="Example: sddusr convert KeDuSR_DuSR-Real.pth weights/kedusr_dusr.safetensors")
@guarded
def convert(
    src: Annotated[Path, typer.Argument(help="A KeDuSR checkpoint (.pth).")],
    dst: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace DST if it exists.")
    ] = False,
) -> None:
    """Convert a published KeDuSR checkpoint to this engine's safetensors format."""
    from sddusr_engine.io import check_writable
    from sddusr_engine.weights import convert_kedusr, read_weights

    if dst.suffix.lower() != ".safetensors":
        raise UsageError(f"the output {dst} must end in .safetensors.")
    check_writable([dst])
    refuse_existing(dst, overwrite=overwrite)  # the rule of every output the commands write
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
    """Train a network; every argument goes to the trainer (its options: sddusr train --help)."""
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
    from sddusr_engine.process import keep_freed_memory

    keep_freed_memory()  # the command owns its process: see sddusr_engine/process.py
    app(prog_name="sddusr")


if __name__ == "__main__":
    main()
