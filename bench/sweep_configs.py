"""Sweep the kernels' launch settings (block sizes, warps, stages) at the CameraFusion sizes.

The GPU entries of `kernels/_launch.py` are the best of this sweep on the card named in
bench/RESULTS.md; run it again on another card. Each candidate replaces the table entry, runs the
kernel on the inputs `bench_kernels.py` uses (`harness.CAMERAFUSION_SIZES`), is timed with
`sddusr_engine.timing.time_ms`, and is checked against the output of the setting in use (same
function, any launch settings), so a setting that is fast but wrong shows as "MISMATCH". The
table is printed last; `--json PATH` writes the rows with the device, versions, date and commit.
GPU only: under the interpreter the timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness
import torch

from sddusr_engine.kernels import (
    _launch,
    attention,
    deform_conv2d,
    patch_descriptors,
    patch_grid,
    patch_warp,
)
from sddusr_engine.kernels.patch_match import match_descriptors
from sddusr_engine.timing import time_ms

C = _launch.Config
# Candidates per kernel; each case is timed with the setting in use first, then these.
CANDIDATES = {
    "patch_match": [
        _launch._GPU["patch_match"],
        C({"BLOCK_Q": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        C({"BLOCK_Q": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        C({"BLOCK_Q": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        C({"BLOCK_Q": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        C({"BLOCK_Q": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        C({"BLOCK_Q": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        C({"BLOCK_Q": 128, "BLOCK_K": 128}, num_warps=8, num_stages=2),
    ],
    "patch_warp": [
        _launch._GPU["patch_warp"],
        C({"BLOCK_C": 16, "BLOCK_P": 256}, num_warps=4),
        C({"BLOCK_C": 32, "BLOCK_P": 128}, num_warps=4),
        C({"BLOCK_C": 8, "BLOCK_P": 256}, num_warps=4),
        C({"BLOCK_C": 32, "BLOCK_P": 256}, num_warps=8),
        C({"BLOCK_C": 64, "BLOCK_P": 64}, num_warps=4),
    ],
    "attention": [
        _launch._GPU["attention"],
        C({"BLOCK_Q": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        C({"BLOCK_Q": 128, "BLOCK_K": 128}, num_warps=8, num_stages=2),
        C({"BLOCK_Q": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        C({"BLOCK_Q": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        C({"BLOCK_Q": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ],
    "deform_conv2d": [
        _launch._GPU["deform_conv2d"],
        C({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_C": 32}, num_warps=8),
        C({"BLOCK_P": 64, "BLOCK_N": 64, "BLOCK_C": 16}, num_warps=4),
        C({"BLOCK_P": 32, "BLOCK_N": 64, "BLOCK_C": 32}, num_warps=4),
        C({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_C": 64}, num_warps=8),
        C({"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_C": 32}, num_warps=4),
        C({"BLOCK_P": 128, "BLOCK_N": 64, "BLOCK_C": 16}, num_warps=4),
    ],
}


def _label(cfg: _launch.Config) -> str:
    blocks = " ".join(f"{k.split('_')[1]}={v}" for k, v in cfg.blocks.items())
    return f"{blocks} w={cfg.num_warps} s={cfg.num_stages}"


def _cases(dev):
    """(name, table key, fn, args, flops, nbytes) at the bench_kernels sizes."""
    sz = harness.CAMERAFUSION_SIZES
    c, (hq, wq), (hk, wk) = sz["c"], sz["q"], sz["k"]
    q = torch.randn(c, hq, wq, device=dev).half()
    k = torch.randn(c, hk, wk, device=dev).half()
    qd, kd = patch_descriptors(q), patch_descriptors(k)
    yield ("patch_match fp16 (descriptors)", "patch_match", match_descriptors, (qd, kd),
           2 * qd.shape[0] * kd.shape[0] * qd.shape[1], None)  # fmt: skip
    del q, k, qd, kd
    cw, (hv, wv) = sz["cw"], sz["v"]
    n = patch_grid(hv)[0] * patch_grid(wv)[0]
    v = torch.randn(cw, hv, wv, device=dev).half()
    idx = torch.randint(-1, n, (hq, wq), device=dev)
    nbytes = cw * 16 * hq * wq * 2 + idx.numel() * 8 + v.numel() * 2
    yield "patch_warp fp16", "patch_warp", patch_warp, (v, idx), None, nbytes
    del v, idx
    for label, (nq, nk) in (("attn many-q fp16", sz["att_many"]),
                            ("attn few-q fp16", sz["att_few"])):  # fmt: skip
        qa, ka, va = (torch.randn(m, 64, device=dev).half() for m in (nq, nk, nk))
        yield label, "attention", attention, (qa, ka, va, 0.125), 2 * nq * nk * 128, None
        del qa, ka, va
    cin, h, w = sz["dc"]
    for dt in (torch.float16, torch.float32):
        x = torch.randn(1, cin, h, w, device=dev).to(dt)
        off = (torch.randn(1, 144, h, w, device=dev) * 3).to(dt)
        mk = torch.rand(1, 72, h, w, device=dev).to(dt)
        wt = (torch.randn(64, cin, 3, 3, device=dev) / 24).to(dt)
        b = torch.randn(64, device=dev).to(dt)
        key = "deform_conv2d" if dt == torch.float16 else "deform_conv2d_fp32"
        yield (f"deform_conv2d {str(dt)[6:]}", key, deform_conv2d, (x, off, mk, wt, b),
               2 * h * w * 64 * cin * 9, None)  # fmt: skip
        del x, off, mk, wt, b


def _agree(a, b) -> str:
    if isinstance(a, tuple):  # patch_match: (score, index)
        same = (a[1] == b[1]).float().mean().item()
        close = torch.allclose(a[0], b[0], rtol=1e-3, atol=1e-3)
        return "ok" if close and same > 0.999 else f"MISMATCH (index agree {same:.4f})"
    err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    return "ok" if err < 1e-3 else f"MISMATCH (rel err {err:.1e})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the rows and where they were measured here")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per setting (median)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_configs.py: needs a CUDA GPU (interpreter timings mean nothing)")
        return 2
    dev = torch.device("cuda")
    rows = []
    for name, key, fn, fargs, flops, nbytes in _cases(dev):
        # the first row is the setting in use for this key; fp32 tries the same candidates
        default = _launch.launch_config(key.removesuffix("_fp32"), fargs[0].dtype)
        cands = [default] + [c for c in CANDIDATES[key.removesuffix("_fp32")] if c != default]
        saved = _launch._GPU.get(key)
        want = None
        for i, cfg in enumerate(cands):
            _launch._GPU[key] = cfg
            try:
                got = fn(*fargs)
                torch.cuda.synchronize()
                if i == 0:
                    want, verdict = got, "default"
                else:
                    verdict = _agree(got, want)
                ms = time_ms(lambda f=fn, a=fargs: f(*a), dev, repeats=args.repeats, warmup=2)
            except Exception as exc:  # a setting the compiler or the card refuses
                ms, verdict = float("nan"), f"error: {type(exc).__name__}: {str(exc)[:80]}"
            rows.append(dict(case=name, config=_label(cfg), ms=ms, verdict=verdict,
                             tflops=flops / ms / 1e9 if flops and ms == ms else None,
                             gbs=nbytes / ms / 1e6 if nbytes and ms == ms else None))  # fmt: skip
            print(f"  {name:<30} {_label(cfg):<34} {ms:9.3f} ms  {verdict}", flush=True)
        if saved is None:
            _launch._GPU.pop(key, None)
        else:
            _launch._GPU[key] = saved
    meta = harness.stamp(dev)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(
        f"\n{harness.title(meta, 'launch-setting sweep (median ms, first = the setting in use)')}"
    )
    best = {}
    for r in rows:
        if r["verdict"] in ("ok", "default") and r["ms"] == r["ms"]:
            if r["case"] not in best or r["ms"] < best[r["case"]]["ms"]:
                best[r["case"]] = r
    for r in rows:
        rate = f"{r['tflops']:.1f} TFLOP/s" if r["tflops"] else (
            f"{r['gbs']:.0f} GB/s" if r["gbs"] else "-")  # fmt: skip
        star = "*" if best.get(r["case"]) is r else " "
        print(
            f"{star} {r['case']:<30} {r['config']:<34} {r['ms']:9.3f} ms {rate:>14}  {r['verdict']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
