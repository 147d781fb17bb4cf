"""Benchmark the Triton kernels against their references and eager PyTorch baselines.

On CUDA it runs the CameraFusion-Real sizes (see bench/README.md) and reports, per row: median ms
(CUDA events, after warm-up), TFLOP/s or GB/s, the fraction of an 8192^3 fp16 matmul measured in the
same run, and the extra memory (max_memory_allocated above what was allocated before the call).
`--cpu` runs tiny sizes through Triton's interpreter only to show the harness works: those numbers
are NOT GPU numbers. The table is printed last; `--json PATH` also writes the rows with the GPU
name, torch/triton versions, date and git commit.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

_CPU = "--cpu" in sys.argv or not torch.cuda.is_available()
if _CPU:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _provenance import commit  # noqa: E402

from sddusr_engine.kernels import (  # noqa: E402
    attention,
    deform_conv2d,
    deform_conv2d_reference,
    patch_descriptors,
    patch_grid,
    patch_match,
    patch_match_reference,
    patch_warp,
    patch_warp_reference,
)


def _time(fn, args, device, warmup=2, repeats=10):
    """(median ms, extra bytes) of fn(*args); extra = peak allocated above the starting one."""
    for _ in range(warmup):
        fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float("nan")


def _matmul_peak(device):
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    ms, _ = _time(torch.matmul, (a, b), device, warmup=3, repeats=10)
    del a, b
    return 2 * 8192**3 / ms / 1e9  # TFLOP/s


def _eager_attention(q, k, v, scale):
    return torch.softmax(q @ k.t() * scale, dim=1) @ v


def _bmm_max(qd, kd, chunk=4096):
    """KeDuSR-style baseline in half precision: matmul a query chunk, then max over keys."""
    score = torch.empty(qd.shape[0], device=qd.device, dtype=torch.float32)
    index = torch.empty(qd.shape[0], device=qd.device, dtype=torch.int64)
    for q0 in range(0, qd.shape[0], chunk):
        m = (qd[q0 : q0 + chunk] @ kd.t()).max(dim=1)
        score[q0 : q0 + chunk], index[q0 : q0 + chunk] = m.values.float(), m.indices
    return score, index


def _sizes(cpu):
    if cpu:
        return dict(c=4, q=(13, 17), k=(11, 9), cw=8, v=(20, 24), att_many=(300, 128),
                    att_few=(128, 3000), dc=(16, 13, 17))  # fmt: skip
    return dict(c=16, q=(640, 896), k=(320, 448), cw=64, v=(1280, 1792),
                att_many=(573_440, 128), att_few=(128, 2_293_760), dc=(64, 1280, 1792))  # fmt: skip


def run(cpu: bool, repeats: int, only: set[str] | None):
    dev = torch.device("cpu" if cpu else "cuda")
    sz = _sizes(cpu)
    peak = _matmul_peak(dev)
    rows = []
    slow = dict(warmup=1, repeats=max(1, min(3, repeats)))

    def add(op, impl, dtype, fn, args, flops=None, nbytes=None, slow_run=False):
        kw = slow if slow_run or cpu else dict(repeats=repeats)
        ms, extra = _time(fn, args, dev, **kw)
        tflops = flops / ms / 1e9 if flops else float("nan")
        gbs = nbytes / ms / 1e6 if nbytes else float("nan")
        rows.append(dict(op=op, impl=impl, dtype=str(dtype).replace("torch.", ""), ms=ms,
                         tflops=tflops, gbs=gbs,
                         frac_peak=tflops / peak if flops and peak == peak else float("nan"),
                         extra_mib=extra / 2**20))  # fmt: skip
        print(f"  {op:<28} {impl:<22} {rows[-1]['dtype']:<9} {ms:10.3f} ms", flush=True)

    want = lambda name: only is None or name in only
    # -- patch_match ------------------------------------------------------------------------------
    if want("patch_match"):
        c, (hq, wq), (hk, wk) = sz["c"], sz["q"], sz["k"]
        dtypes = [torch.float32] if cpu else [torch.float16, torch.bfloat16]
        for dt in dtypes:
            q = torch.randn(c, hq, wq, device=dev).to(dt)
            k = torch.randn(c, hk, wk, device=dev).to(dt)
            flops = 2 * hq * wq * hk * wk * 9 * c
            add(
                "patch_match dense",
                "triton",
                dt,
                patch_match,
                (q, k),
                flops,
            )
            add("patch_match dense", "reference(fp32 dot)", dt,
                patch_match_reference, (q, k), flops, slow_run=True)  # fmt: skip
            qd, kd = patch_descriptors(q), patch_descriptors(k)
            add("patch_match dense", "bmm+max chunks", dt, _bmm_max, (qd, kd), flops,
                slow_run=True)  # fmt: skip
            qm = torch.rand(hq, wq, device=dev) < 0.5
            km = torch.rand(hk, wk, device=dev) < 0.5
            mflops = 2 * int(qm.sum()) * int(km.sum()) * 9 * c
            add(
                "patch_match 50%/50% masks",
                "triton",
                dt,
                patch_match,
                (q, k, qm, km),
                mflops,
            )
            add("patch_match 50%/50% masks", "reference(fp32 dot)", dt,
                patch_match_reference, (q, k, qm, km), mflops, slow_run=True)  # fmt: skip
            del q, k, qd, kd
    # -- patch_warp -------------------------------------------------------------------------------
    if want("patch_warp"):
        cw, (hv, wv), (hq, wq) = sz["cw"], sz["v"], sz["q"]
        n = patch_grid(hv)[0] * patch_grid(wv)[0]
        for dt in [torch.float32] if cpu else [torch.float32, torch.float16]:
            v = torch.randn(cw, hv, wv, device=dev).to(dt)
            idx = torch.randint(-1, n, (hq, wq), device=dev)
            out_bytes = cw * 16 * hq * wq * v.element_size()
            floor = out_bytes + idx.numel() * 8 + v.numel() * v.element_size()
            add(
                "patch_warp",
                "triton",
                dt,
                patch_warp,
                (v, idx),
                nbytes=floor,
            )
            add("patch_warp", "reference(fold bands)", dt, patch_warp_reference, (v, idx),
                nbytes=floor, slow_run=True)  # fmt: skip
            if not cpu:
                src = torch.empty(cw, 4 * hq, 4 * wq, device=dev, dtype=dt)
                dst = torch.empty_like(src)
                add("device copy (out size)", "torch copy_", dt, dst.copy_, (src,),
                    nbytes=2 * out_bytes)  # fmt: skip
                del src, dst
            del v, idx
    # -- attention --------------------------------------------------------------------------------
    if want("attention"):
        for label, (nq, nk) in (("attn many-q/128 keys", sz["att_many"]),
                                ("attn 128 q/many keys", sz["att_few"])):  # fmt: skip
            for dt in [torch.float32] if cpu else [torch.float16, torch.bfloat16, torch.float32]:
                q = torch.randn(nq, 64, device=dev).to(dt)
                k = torch.randn(nk, 64, device=dev).to(dt)
                v = torch.randn(nk, 64, device=dev).to(dt)
                flops = 2 * nq * nk * 128
                add(
                    label,
                    "triton",
                    dt,
                    attention,
                    (q, k, v, 0.125),
                    flops,
                )
                add(label, "eager formula", dt,
                    _eager_attention, (q, k, v, 0.125), flops)  # fmt: skip
                del q, k, v
    # -- deform_conv2d ----------------------------------------------------------------------------
    if want("deform_conv2d"):
        cin, h, w = sz["dc"]
        for dt in [torch.float32] if cpu else [torch.float32, torch.float16]:
            x = torch.randn(1, cin, h, w, device=dev).to(dt)
            off = (torch.randn(1, 144, h, w, device=dev) * 3).to(dt)
            mk = torch.rand(1, 72, h, w, device=dev).to(dt)
            wt = (torch.randn(64, cin, 3, 3, device=dev) / 24).to(dt)
            b = torch.randn(64, device=dev).to(dt)
            flops = 2 * h * w * 64 * cin * 9
            add(
                "deform_conv2d 3x3 G=8",
                "triton",
                dt,
                deform_conv2d,
                (x, off, mk, wt, b),
                flops,
            )
            add("deform_conv2d 3x3 G=8", "reference(gather+mm)", dt,
                deform_conv2d_reference, (x, off, mk, wt, b), flops, slow_run=True)  # fmt: skip
            del x, off, mk, wt, b
    return rows, peak


def _meta(cpu, peak):
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "unavailable"
    return dict(
        gpu=torch.cuda.get_device_name() if not cpu else "none (CPU, Triton interpreter)",
        not_gpu_numbers=cpu, torch=torch.__version__, triton=tv,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), commit=commit(),
        matmul_fp16_8192_tflops=peak,
    )  # fmt: skip


def _fmt(x, spec):
    return "-" if x != x or x is None else format(x, spec)


def print_table(rows, meta):
    headers = ["op", "impl", "dtype", "ms", "TFLOP/s", "GB/s", "of fp16 mm peak", "extra MiB"]
    body = [[r["op"], r["impl"], r["dtype"], _fmt(r["ms"], ".3f"), _fmt(r["tflops"], ".2f"),
             _fmt(r["gbs"], ".1f"), _fmt(r["frac_peak"], ".1%"), _fmt(r["extra_mib"], ".0f")]
            for r in rows]  # fmt: skip
    title = (
        f"{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['commit'][:10]}"
    )
    if meta["not_gpu_numbers"]:
        title += " | CPU interpreter: NOT GPU NUMBERS"
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in headers:
            t.add_column(h, justify="left" if h in ("op", "impl", "dtype") else "right")
        for r in body:
            t.add_row(*r)
        Console(width=max(140, Console().width)).print(t)
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for r in body:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the rows and metadata here")
    p.add_argument("--cpu", action="store_true", help="tiny sizes under the Triton interpreter")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", nargs="*", help="patch_match patch_warp attention deform_conv2d")
    args = p.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        print("No GPU in use: tiny sizes through Triton's interpreter; these are NOT GPU numbers.")
    rows, peak = run(cpu, args.repeats, set(args.only) if args.only else None)
    meta = _meta(cpu, peak)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2, default=str))
    print_table(rows, meta)
    if any(math.isnan(r["ms"]) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
