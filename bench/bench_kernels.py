"""Benchmark each Triton kernel against its PyTorch reference and an eager baseline.

On CUDA it runs the CameraFusion-Real sizes (bench/README.md lists them with their work floors)
and reports per row: the median ms (`sddusr_engine.timing.time_ms`, synchronised, after warm-up),
TFLOP/s or GB/s, the share of the device's matmul peak measured in the same run
(`timing.measured_peaks`, the probe `sddusr profile` uses), and the extra memory one call
allocates. `--cpu` runs small sizes through Triton's interpreter only to show that the harness
works: those are not GPU numbers, and the table's title says so. The table is printed last;
`--json PATH` also writes the rows with the device, versions, date and commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

_CPU = "--cpu" in sys.argv or not torch.cuda.is_available()
if _CPU:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402

from sddusr_engine.kernels import (  # noqa: E402
    attention,
    deform_conv2d,
    deform_conv2d_reference,
    fused_detail,
    patch_descriptors,
    patch_grid,
    patch_match,
    patch_match_reference,
    patch_warp,
    patch_warp_reference,
)
from sddusr_engine.model.matching import high_pass, high_pass_covered, warp_coverage  # noqa: E402
from sddusr_engine.timing import measured_peaks, time_ms  # noqa: E402

OPS = ("patch_match", "patch_warp", "attention", "deform_conv2d", "fused_detail")


def eager_attention(q, k, v, scale):
    """The formula the attention kernel fuses, in eager PyTorch."""
    return torch.softmax(q @ k.t() * scale, dim=1) @ v


def bmm_max(qd, kd, chunk=4096):
    """KeDuSR's matching done in the descriptors' dtype: a product per query chunk, then max."""
    score = torch.empty(qd.shape[0], device=qd.device, dtype=torch.float32)
    index = torch.empty(qd.shape[0], device=qd.device, dtype=torch.int64)
    for q0 in range(0, qd.shape[0], chunk):
        m = (qd[q0 : q0 + chunk] @ kd.t()).max(dim=1)
        score[q0 : q0 + chunk], index[q0 : q0 + chunk] = m.values.float(), m.indices
    return score, index


def detail_chain(warp_sum, gate, alpha, norm, index):
    """What the network runs for the gated detail map: the model's high-pass, then the gate."""
    if norm == "constant":
        return high_pass(warp_sum[None], alpha) * gate[None]
    coverage = warp_coverage((index >= 0)[None, None].to(warp_sum.dtype))
    return high_pass_covered(warp_sum[None], coverage, alpha) * gate[None]


def run(cpu: bool, repeats: int, only: set[str] | None) -> tuple[list[dict], dict]:
    """Time every (kernel, implementation, dtype) row; returns the rows and the peaks."""
    dev = torch.device("cpu" if cpu else "cuda")
    sz = harness.SMALL_SIZES if cpu else harness.CAMERAFUSION_SIZES
    peaks = measured_peaks(dev, torch.float32 if cpu else torch.float16)
    rows: list[dict] = []

    def add(op, impl, dtype, fn, args, flops=None, nbytes=None, slow=False):
        call = lambda: fn(*args)  # noqa: E731
        # the references take seconds at full size: fewer runs for them
        n, warm = (max(1, min(3, repeats)), 1) if slow or cpu else (repeats, 2)
        ms = time_ms(call, dev, repeats=n, warmup=warm)
        tflops = flops / ms / 1e9 if flops else float("nan")
        rows.append(dict(
            op=op, impl=impl, dtype=str(dtype).replace("torch.", ""), ms=ms, tflops=tflops,
            gbs=nbytes / ms / 1e6 if nbytes else float("nan"),
            share_of_peak=tflops / peaks["matmul_tflops"] if flops else float("nan"),
            extra_mib=harness.extra_memory(call, dev),
        ))  # fmt: skip
        print(f"  {op:<28} {impl:<22} {rows[-1]['dtype']:<9} {ms:10.3f} ms", flush=True)

    want = lambda name: only is None or name in only  # noqa: E731
    # -- patch_match ------------------------------------------------------------------------------
    if want("patch_match"):
        c, (hq, wq), (hk, wk) = sz["c"], sz["q"], sz["k"]
        for dt in [torch.float32] if cpu else [torch.float16, torch.bfloat16]:
            q = torch.randn(c, hq, wq, device=dev).to(dt)
            k = torch.randn(c, hk, wk, device=dev).to(dt)
            flops = 2 * hq * wq * hk * wk * 9 * c
            add("patch_match dense", "triton", dt, patch_match, (q, k), flops)
            add("patch_match dense", "reference(fp32 dot)", dt, patch_match_reference, (q, k),
                flops, slow=True)  # fmt: skip
            qd, kd = patch_descriptors(q), patch_descriptors(k)
            add("patch_match dense", "bmm+max chunks", dt, bmm_max, (qd, kd), flops, slow=True)
            qm = torch.rand(hq, wq, device=dev) < 0.5
            km = torch.rand(hk, wk, device=dev) < 0.5
            mflops = 2 * int(qm.sum()) * int(km.sum()) * 9 * c
            add("patch_match 50%/50% masks", "triton", dt, patch_match, (q, k, qm, km), mflops)
            add("patch_match 50%/50% masks", "reference(fp32 dot)", dt, patch_match_reference,
                (q, k, qm, km), mflops, slow=True)  # fmt: skip
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
            add("patch_warp", "triton", dt, patch_warp, (v, idx), nbytes=floor)
            add("patch_warp", "reference(fold bands)", dt, patch_warp_reference, (v, idx),
                nbytes=floor, slow=True)  # fmt: skip
            if not cpu:  # the bandwidth a plain copy of the output's size reaches
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
                add(label, "triton", dt, attention, (q, k, v, 0.125), flops)
                add(label, "eager formula", dt, eager_attention, (q, k, v, 0.125), flops)
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
            args = (x, off, mk, wt, b)
            add("deform_conv2d 3x3 G=8", "triton", dt, deform_conv2d, args, flops)
            add("deform_conv2d 3x3 G=8", "reference(gather+mm)", dt, deform_conv2d_reference,
                args, flops, slow=True)  # fmt: skip
            del x, off, mk, wt, b
    # -- fused_detail -----------------------------------------------------------------------------
    if want("fused_detail"):
        cw, (hq, wq) = sz["cw"], sz["q"]
        dt = torch.float32 if cpu else torch.float16
        ws = torch.randn(cw, 4 * hq, 4 * wq, device=dev).to(dt)
        gate = torch.rand(cw, 4 * hq, 4 * wq, device=dev).to(dt)
        alpha = torch.ones(1, device=dev, dtype=dt)
        idx = torch.randint(-1, hq * wq, (hq, wq), device=dev)
        # read warp_sum and gate, write out, once each; the fp32 cell means written and read
        floor = 3 * ws.numel() * ws.element_size() + 2 * cw * hq * wq * 4
        for norm in ("constant", "coverage"):
            nbytes = floor + (idx.numel() * 8 if norm == "coverage" else 0)
            label = f"fused_detail {norm}"
            add(label, "triton", dt, lambda n=norm: fused_detail(ws, gate, alpha, norm=n, index=idx),
                (), nbytes=nbytes)  # fmt: skip
            add(label, "torch chain (model)", dt, detail_chain, (ws, gate, alpha, norm, idx),
                nbytes=nbytes)  # fmt: skip
        del ws, gate, idx
    return rows, peaks


def print_table(rows: list[dict], meta: dict) -> None:
    headers = ["op", "impl", "dtype", "ms", "TFLOP/s", "GB/s", "share of mm peak", "extra MiB"]
    f = harness.fmt
    body = [[r["op"], r["impl"], r["dtype"], f(r["ms"], ".3f"), f(r["tflops"], ".2f"),
             f(r["gbs"], ".1f"), f(r["share_of_peak"], ".1%"), f(r["extra_mib"], ".0f")]
            for r in rows]  # fmt: skip
    heading = harness.title(meta, "kernels") + (
        f" | matmul peak {meta['peaks']['matmul_tflops']:.3g} TFLOP/s"
    )
    harness.print_table(heading, headers, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the rows and where they were measured here")
    p.add_argument("--cpu", action="store_true", help="small sizes under the Triton interpreter")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per row (median)")
    p.add_argument("--only", nargs="*", choices=OPS, help="benchmark only these kernels")
    args = p.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        print("No GPU in use: small sizes through Triton's interpreter; these are NOT GPU numbers.")
    rows, peaks = run(cpu, args.repeats, set(args.only) if args.only else None)
    meta = {**harness.stamp(torch.device("cpu" if cpu else "cuda")), "peaks": peaks}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2, default=str))
    print_table(rows, meta)
    return 1 if any(math.isnan(r["ms"]) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
