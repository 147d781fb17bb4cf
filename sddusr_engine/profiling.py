"""`sddusr profile`'s library function: time the kernels and the pipeline, stage by stage.

`profile(engine, lr_hw, repeats)` returns rows (one dict per kernel per backend, one per pipeline
stage) and a description of the device and run; the CLI prints them as a table and writes them as
JSON. Every "share of peak" is measured against the device's own matmul and copy peaks
(`timing.measured_peaks`), measured in the same run.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UsageError
from .kernels import get_ops, patch_grid
from .timing import measured_peaks, sync, time_ms

Status = Callable[[str], AbstractContextManager]


def parse_size(size: str) -> tuple[int, int]:
    """`--size HxW` as (H, W): multiples of 4, at least 32 each."""
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {size!r} is not HxW (e.g. 448x896).") from None
    if h < 32 or w < 32 or h % 4 or w % 4:
        raise UsageError(f"--size {size}: both sides must be multiples of 4 and at least 32.")
    return h, w


def random_weights(folder: Path) -> Path:
    """A randomly initialised sddusr network saved in `folder` (timing does not need training)."""
    from .model.network import build_model
    from .weights import save_weights

    return save_weights(build_model("sddusr"), Path(folder) / "random.safetensors")


def kernel_rows(device, dtype, lr_hw, repeats: int, backends: list[str], peaks) -> list[dict]:
    """Each kernel at the pipeline's shapes for an LR image of lr_hw, on each backend."""
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
            ms = time_ms(lambda fn=fn, args=args: fn(*args), device, repeats)
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


def per_stage_counts(fc, device, flops: dict, memory: dict):
    """A stage hook for `Engine.run`: records each stage's FLOPs (from the counter `fc`) and, on
    CUDA, its peak memory."""

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


def count_work(eng, lr, lrc, ref) -> tuple[float, dict[str, float], dict[str, float]]:
    """(FLOPs of one `eng.run`, FLOPs per stage, peak MiB per stage on CUDA) from one run under
    torch's FLOP counter; the matching's work is counted from the pairs it evaluated (the
    counter does not see the Triton kernels and counts the reference densely). Best effort:
    zero where the counter fails."""
    from torch.utils.flop_counter import FlopCounterMode

    flops: dict[str, float] = {}
    memory: dict[str, float] = {}
    # The FLOP counter's module tracker hooks parameters that require grad; none are needed here.
    for p in eng.model.parameters():
        p.requires_grad_(False)
    info = None
    try:
        with FlopCounterMode(display=False) as fc:
            _, info = eng.run(
                lr, lrc, ref, stage_hook=per_stage_counts(fc, eng.device, flops, memory),
                return_info=True,
            )  # fmt: skip
        total = float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - the FLOP counter is best effort
        flops, total = {}, 0.0
    m = info.matching if info is not None else {}
    if m.get("pairs_evaluated"):
        total += 2.0 * 144 * m["pairs_evaluated"] - flops.get("matching", 0.0)
        flops["matching"] = 2.0 * 144 * m["pairs_evaluated"]
    return total, flops, memory


def pipeline_rows(eng, lr_hw, repeats: int, peaks) -> tuple[list[dict], dict]:
    """One row per pipeline stage (and "total") of `eng.run` on a random LR image of lr_hw, plus
    the last run's matching statistics."""
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
        sync(dev)
        t0 = time.perf_counter()
        _, info = eng.run(lr, lrc, ref, return_info=True)
        sync(dev)
        infos.append(info)
        timings.append({**info.timings, "total": 1e3 * (time.perf_counter() - t0)})
        if dev.type == "cuda":
            peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    m = infos[-1].matching
    total_flops, flops, memory = count_work(eng, lr, lrc, ref)
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


def profile(
    eng, lr_hw: tuple[int, int], repeats: int, status: Status | None = None
) -> tuple[list[dict], dict[str, Any]]:
    """(rows, meta): the kernels (Triton and torch on a CUDA engine with Triton kernels, else
    torch) and then the pipeline, timed on `eng`'s device and dtype for an LR image of lr_hw.
    `status(text)`, when given, is entered around each phase (the CLI shows a spinner with it)."""
    phase = status or (lambda text: nullcontext())
    with phase("measuring the device's matmul and copy peaks..."):
        peaks = measured_peaks(eng.device, eng.dtype)
    backends = (
        ["triton", "torch"] if eng.device.type == "cuda" and eng.backend == "triton" else ["torch"]
    )
    with phase("timing the kernels..."):
        krows = kernel_rows(eng.device, eng.dtype, lr_hw, repeats, backends, peaks)
    with phase("timing the pipeline..."):
        prows, extra = pipeline_rows(eng, lr_hw, repeats, peaks)
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
    return krows + prows, meta
