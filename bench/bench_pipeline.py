"""Benchmark the whole engine on one pair: total time, peak device memory, per-stage breakdown.

On CUDA it runs a CameraFusion-Real-sized pre-aligned triplet (LR 1280x1792, LRC 640x896, Ref
1280x1792) through the `sddusr` network (full preset: 64 channels, 3x8 trunk blocks, N=128) and
the `kedusr` network, each with the same random weights for both backends, and reports:

- the engine (tiled, chosen backend and precision): median wall time over `--repeats` runs
  (`sddusr_engine.timing.time_ms`), peak `torch.cuda.max_memory_allocated`, and the per-stage
  breakdown the engine measures itself;
- the plain network's whole-image forward on the torch backend in fp32 (the arithmetic of the
  published code) where it fits, as an in-run baseline;
- for `kedusr`, the ratio to KeDuSR's official inference as recorded in DESIGN.md section 5 on one
  H100 (2375 ms, 15.4 GiB). That number is not measured by this script.

`--shipped` adds the network the default weights configure (smaller than the full preset), with
those weights; `--ensemble N` adds each network again with the geometric self-ensemble of N passes;
`--adapt N` (with `--shipped`) adds the shipped weights with N steps of self-adaptation per pair.
Each network runs in three modes: `fast` (the engine's default plan: on a GPU the whole image
where it fits; on the CPU small tiles that keep the fusion maps), `bounded` (`--bounded-tile`,
default 256: LR tiles and the reference context in bands of Ref rows, the 2x stage twice for the
fusion statistic: the memory-bounded mode; on a GPU its whole-image maps wait in host memory,
`host_maps`) and `kept` (the same tiles keeping the fusion input and gated map for the whole
output, so that the 2x stage runs once: `keep_fusion_maps`); on a GPU `bounded-device` is the
bounded mode with its maps on the GPU (`host_maps=False`), to show what host memory costs. With the
triton backend each network's first layout runs once more with the fusion input's reference detail
in PyTorch ops instead of the `fused_detail` kernel ("unfused detail"), which shows what the kernel
saves. Every row carries `network`, `mode`, `ms`, `peak_gib`, the work
counted by torch's FLOP counter (`gflop`, the matching counted from its evaluated pairs), `tflops`,
its `share_of_peak` of the matrix-product rate measured in the same run (`meta.peak_tflops`; on
CUDA also `meta.peak_fp16_tflops`) and the per-stage ms.
Weights do not change the work, so random weights are used for the presets. `--pair WIDE TELE`
instead runs a raw pair (a 12 MP phone pair) through the shipped weights, registration included,
once in each mode. `--cpu` runs a small
size on the CPU to show the harness works; those numbers are CPU numbers. The table is printed
last; `--json PATH` writes the rows beside the device (`card`), versions, date, commit and
measured peaks, all at the top level. The rows run headline first (each network's default plan,
then bounded, then kept maps, then the variations and baselines); the JSON is rewritten after
each row (`complete`: false until the last), and a row that raises is recorded with its `error`
while the others run, so a run cut short or partly failing still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import harness
import torch

from sddusr_engine import build_model
from sddusr_engine.engine import Engine
from sddusr_engine.profiling import count_work
from sddusr_engine.timing import measured_peaks, sync, time_ms

KEDUSR_OFFICIAL_H100 = {"ms": 2375.0, "peak_gib": 15.4}  # DESIGN.md section 5


def _measure(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median ms after one warm-up run, peak GiB allocated during the timed runs)."""
    fn()  # warm-up: kernel compilation, cuDNN algorithm choice
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_ms(fn, device, repeats, warmup=0)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )
    return ms, peak


def _profile(fn, device: torch.device, path: Path, rows: int = 30) -> None:
    """One run under torch.profiler: the kernels that took the device's time, most first."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    avg = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()
    for key in (*keys, "self_cpu_time_total"):
        try:
            table = avg.table(sort_by=key, row_limit=rows, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(table)


def _layout(eng: Engine) -> str:
    """The engine's memory layout as the table names it (the default differs by device)."""
    return "nhwc" if eng.channels_last else "nchw"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="small size on the CPU (harness check)")
    ap.add_argument("--size", default=None, help="LR size HxW (default 1280x1792; --cpu: 96x128)")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--backend", default="triton", choices=["triton", "torch"])
    ap.add_argument(
        "--tile",
        type=int,
        default=None,
        help="LR tile side (default: the engine's, the whole image when it fits the free memory)",
    )
    ap.add_argument(
        "--bounded-tile",
        type=int,
        default=256,
        metavar="TILE",
        help="also time each network in the bounded-memory mode: LR tiles of TILE pixels and the "
        "reference context in bands (0: skip)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="sddusr,kedusr")
    ap.add_argument(
        "--layouts",
        default="nchw,nhwc",
        help="engine memory layouts to time: nchw (the default) and/or nhwc (channels_last)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32 whole-image baseline")
    ap.add_argument(
        "--ensemble",
        type=int,
        default=1,
        choices=[1, 2, 4, 8],
        help="also time each network with the geometric self-ensemble of N passes",
    )
    ap.add_argument(
        "--shipped",
        action="store_true",
        help="also time the shipped default weights' network (its own, smaller configuration)",
    )
    ap.add_argument(
        "--adapt",
        type=int,
        default=0,
        metavar="STEPS",
        help="with --shipped: also time the shipped weights with STEPS of self-adaptation",
    )
    ap.add_argument(
        "--pair",
        nargs=2,
        metavar=("WIDE", "TELE"),
        default=None,
        help="instead of the synthetic triplet, a raw wide/telephoto pair (a 12 MP phone pair) "
        "through the shipped weights' `super_resolve`, registration included, in the bounded "
        "mode and then the fast one (once each)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also profile one engine run per variant (torch.profiler, CUDA kernels by self time) "
        "and write DIR/profile_<variant>.txt",
    )
    args = ap.parse_args(argv)

    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    precision = "fp32" if cpu else args.precision
    backend = "torch" if cpu and args.backend == "triton" else args.backend
    if args.pair:
        return _raw_pair(args, device, precision, backend)
    h, w = map(int, (args.size or ("96x128" if cpu else "1280x1792")).lower().split("x"))
    hc, wc = (h // 4) * 2, (w // 4) * 2
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, h, w, generator=g)
    lrc = lr[..., (h - hc) // 2 // 2 * 2 :][..., :hc, (w - wc) // 2 // 2 * 2 :][
        ..., :wc
    ].contiguous()
    ref = torch.nn.functional.interpolate(lrc, scale_factor=2, mode="bicubic").clamp(0, 1)

    def engine_row(
        variant: str, eng: Engine, what: str, profile: bool = False, mode: str = "fast"
    ) -> dict:
        infos = []

        def run(eng=eng, infos=infos):
            out, info = eng.run(lr, lrc, ref, return_info=True)
            infos.append(info)
            return out

        ms, peak = _measure(run, device, args.repeats)
        info = infos[-1]
        if profile:
            _profile(run, device, Path(args.profile) / f"profile_{variant}.txt")
        flop, _, _ = count_work(eng, lr, lrc, ref)
        row = {"variant": variant, "network": variant, "mode": mode,
               "what": f"engine {backend} {precision} tile {info.tile}"
                       f"{' kept maps' if info.fusion_maps else ''}"
                       f"{' host maps' if info.host_maps else ''} {what}",
               "fusion_maps": info.fusion_maps, "host_maps": info.host_maps,
               "ms": ms, "peak_gib": peak, "gflop": flop / 1e9,
               "tflops": flop / ms / 1e9 if flop else float("nan"),
               "stages_ms": info.timings}  # fmt: skip
        if variant == "kedusr" and device.type == "cuda" and "ensemble" not in what:
            # the recorded number is an H100's, for one pass
            row["speedup_vs_kedusr_official_h100"] = KEDUSR_OFFICIAL_H100["ms"] / ms
            row["memory_vs_kedusr_official_h100"] = peak / KEDUSR_OFFICIAL_H100["peak_gib"]
        return row

    # the device's matrix-product rate in the run's precision, measured now: each row's share
    peaks = measured_peaks(device, {"fp32": torch.float32, "fp16": torch.float16,
                                    "bf16": torch.bfloat16}[precision])  # fmt: skip
    meta = {**harness.stamp(device), "card": harness.stamp(device)["device"],
            "size": f"LR {h}x{w}, LRC {hc}x{wc}, Ref {2 * hc}x{2 * wc}",
            "peak_dtype": precision, "peak_tflops": peaks["matmul_tflops"]}  # fmt: skip
    if device.type == "cuda":
        meta["peak_fp16_tflops"] = measured_peaks(device, torch.float16)["matmul_tflops"]
    rows: list[dict] = []

    def save(complete: bool) -> None:
        """The rows so far to --json after every row (`complete` false until the last), so
        that a run cut short by its time limit still leaves what it measured."""
        for r in rows:
            tflops = r.get("tflops")
            if tflops is not None and tflops == tflops:  # measured, not NaN (baselines: none)
                r["share_of_peak"] = tflops / meta["peak_tflops"]
        if args.json:
            Path(args.json).write_text(
                json.dumps({**meta, "complete": complete, "rows": rows}, indent=2)
            )

    models: dict[str, torch.nn.Module] = {}

    def preset(variant: str) -> torch.nn.Module:  # the same random weights for every row
        if variant not in models:
            torch.manual_seed(0)
            models[variant] = build_model(variant)
        return models[variant]

    def shipped(**kw) -> Engine:
        return Engine.from_pretrained(None, device, precision, backend, **kw)

    def built(variant: str, **kw) -> Engine:
        return Engine(preset(variant), device, precision, backend, **kw)

    variants, layouts = args.variants.split(","), args.layouts.split(",")
    first_nhwc = layouts[0] == "nhwc"
    # Rows in the order of what they are for, so that a run cut short keeps the headline ones:
    # each network's default plan, then the bounded mode, the kept maps, then the variations.
    # A job: (network, mode, the engine to time (None: the plain baseline), what it adds to the
    # engine's layout in the row's name, profile it, with the fused detail off).
    jobs: list[tuple[str, str, Callable[[], Engine] | None, str, bool, bool]] = []
    if args.shipped:
        make = lambda: shipped(tile=args.tile)  # noqa: E731
        jobs.append(("shipped", "fast", make, "ensemble 1", False, False))
    for v in variants:
        fast = lambda v=v: built(v, tile=args.tile, channels_last=first_nhwc)  # noqa: E731
        jobs.append((v, "fast", fast, "", bool(args.profile), False))
    tile = args.bounded_tile
    for mode, keep in (("bounded", False), ("kept", True)) if tile else ():
        if args.shipped:
            make = lambda keep=keep: shipped(tile=tile, keep_fusion_maps=keep)  # noqa: E731
            jobs.append(("shipped", mode, make, mode, False, False))
        for v in variants:
            make = lambda v=v, keep=keep: built(v, tile=tile, keep_fusion_maps=keep)  # noqa: E731
            jobs.append((v, mode, make, mode, False, False))
    if tile and device.type == "cuda":  # what keeping the bounded maps in host memory costs
        for v in (["shipped"] if args.shipped else []) + variants:
            if v == "shipped":
                make = lambda: shipped(tile=tile, host_maps=False)  # noqa: E731
            else:
                make = lambda v=v: built(v, tile=tile, host_maps=False)  # noqa: E731
            jobs.append((v, "bounded-device", make, "bounded device maps", False, False))
    if args.shipped and args.ensemble > 1:
        make = lambda: shipped(tile=args.tile, ensemble=args.ensemble)  # noqa: E731
        jobs.append(("shipped", "fast", make, f"ensemble {args.ensemble}", False, False))
    if args.shipped and args.adapt:
        make = lambda: shipped(tile=args.tile, adapt=args.adapt)  # noqa: E731
        jobs.append(("shipped", "fast", make, f"adapt {args.adapt}", False, False))
    for v in variants:
        fast = lambda v=v: built(v, tile=args.tile, channels_last=first_nhwc)  # noqa: E731
        jobs.append((v, "fast", fast, "unfused detail", False, True))
        for layout in layouts[1:]:
            nhwc = layout == "nhwc"
            make = lambda v=v, nhwc=nhwc: built(v, tile=args.tile, channels_last=nhwc)  # noqa: E731
            jobs.append((v, "fast", make, "", False, False))
        if args.ensemble > 1:
            make = lambda v=v: built(v, tile=args.tile, ensemble=args.ensemble)  # noqa: E731
            jobs.append((v, "fast", make, f"ensemble {args.ensemble}", False, False))
        if not args.no_baseline:
            jobs.append((v, "baseline", None, "", False, False))
    for network, mode, make, suffix, profile, unfused in jobs:
        try:
            if make is None:
                row = _baseline_row(preset(network), network, device, lr, lrc, ref)
            else:
                eng = make()
                if unfused and eng.model.ops.fused_detail is None:
                    continue  # no kernel to compare against (the torch backend)
                if unfused:  # the fusion input's detail in PyTorch ops: what the kernel saves
                    eng.model.ops = eng.model.ops._replace(fused_detail=None)
                what = f"{_layout(eng)} {suffix}".strip()
                row = engine_row(network, eng, what, profile=profile, mode=mode)
                del eng
        except Exception as e:  # noqa: BLE001 -- one failing row must not lose the others
            row = {"variant": network, "network": network, "mode": mode, "what": "failed",
                   "ms": float("nan"), "peak_gib": float("nan"),
                   "error": f"{type(e).__name__}: {e}"}  # fmt: skip
            print(f"bench_pipeline: a {network} {mode} row failed: {row['error']}", file=sys.stderr)
        rows.append(row)
        save(complete=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save(complete=True)
    print_table(rows, meta)
    return 0


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (VmHWM): it never falls, hence the order of
    `_raw_pair`'s runs, the smaller first."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2**20


def _raw_pair(args, device: torch.device, precision: str, backend: str) -> int:
    """`--pair`: the shipped weights on a raw pair, bounded mode then fast, one run each."""
    import time

    from sddusr_engine.io import read_image

    wide, tele = (read_image(p) for p in args.pair)
    rows = []
    for mode, tile in (("bounded", args.bounded_tile or 256), ("fast", args.tile)):
        eng = Engine.from_pretrained(None, device, precision, backend, tile)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        _, info = eng.super_resolve(wide, tele, return_info=True)
        sync(device)
        ms = 1e3 * (time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                else _peak_rss_gib())  # fmt: skip
        rows.append({"variant": "shipped", "network": "shipped", "mode": mode, "ms": ms,
                     "what": f"engine {backend} {precision} tile {info.tile}"
                             f"{' host maps' if info.host_maps else ''} raw pair",
                     "host_maps": info.host_maps, "peak_gib": peak,
                     "stages_ms": info.timings})  # fmt: skip
        del eng
    h, w = wide.shape[:2]
    th, tw = tele.shape[:2]
    meta = {**harness.stamp(device), "card": harness.stamp(device)["device"],
            "size": f"raw pair: wide {w}x{h}, telephoto {tw}x{th}",
            "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "the process's peak RSS (VmHWM)"}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print_table(rows, meta)
    return 0


def _baseline_row(model, variant: str, device: torch.device, lr, lrc, ref) -> dict:
    """The plain network's whole-image forward on the torch backend in fp32 (the published
    code's arithmetic), one timed run; NaN and a note when it does not fit."""
    base_model = build_model(variant).to(device).eval()
    base_model.load_state_dict(model.state_dict())

    def baseline():
        with torch.no_grad():
            return base_model(lr.to(device), lrc.to(device), ref.to(device))

    row = {"variant": variant, "what": "plain network torch fp32 whole image"}
    try:
        bms, bpeak = _measure(baseline, device, 1)
        return {**row, "ms": bms, "peak_gib": bpeak}
    except torch.cuda.OutOfMemoryError:
        return {**row, "ms": float("nan"), "peak_gib": float("nan"), "note": "out of memory"}


def print_table(rows: list[dict], meta: dict) -> None:
    """The rows as a table, with the KeDuSR ratios and the per-stage times after it."""
    body = []
    for r in rows:
        ratio = ""
        if "speedup_vs_kedusr_official_h100" in r:
            ratio = (
                f"{r['speedup_vs_kedusr_official_h100']:.2f}x faster, "
                f"{r['memory_vs_kedusr_official_h100']:.2f}x the memory"
            )
        body.append([r["variant"], r.get("mode", "-"), r["what"], harness.fmt(r["ms"], ".1f"),
                     harness.fmt(r["peak_gib"], ".2f"), harness.fmt(r.get("tflops"), ".2f"),
                     harness.fmt(r.get("share_of_peak"), ".1%"), ratio or "-"])  # fmt: skip
    heading = harness.title(meta, f"pipeline, {meta['size']}")
    harness.print_table(
        heading,
        ["variant", "mode", "what", "ms", "peak GiB", "TFLOP/s", "of peak",
         "vs KeDuSR official (H100)"],
        body,
    )  # fmt: skip
    for r in rows:
        if r.get("stages_ms"):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items())
            print(f"  {r['variant']} {r['what']}: {stages} (ms)")


if __name__ == "__main__":
    sys.exit(main())
