"""Why does a network use its reference, or not? Measures each link of the reference path on a
held-out split (the model card's "diagnosis" numbers).

    python bench/diagnose_reference.py --weights weights/sddusr_default.safetensors \
        --data ~/sddusr_work/pairs --split test [--json out.json]

Per pair, in eval mode (the inference form of SFM), whole images:

- `conf_in` / `conf_out`: mean matching confidence (max cosine) of the active LR cells inside the
  centre box and outside it, where no true match exists. Equal values: the gate h(C) cannot tell
  matches from garbage.
- `match_exact`: share of active cells inside the centre whose matched LRC cell is the
  geometrically right one (LRC is an exact crop of LR: the answer is known).
- `flow_px`: mean |SpyNet flow| (LRC pixels); `flow_epe`: its end-point error against the true
  flow when the split has `Flow/` (synthetic pairs), and `flow_epe_zero`, the error of no flow.
- `ref_corr_aligned` / `ref_corr_raw`: a property of the data, not of the network: correlation of
  the Ref's own detail (Ref minus its bicubic down-up) with the detail the output needs
  (HR minus bicubic LR), over 32-px blocks of the centre, with each block's best integer shift
  within +-4 px, and without shifting. The reference can only pay off if something aligns it.
- `warp_corr`: the same correlation for the Ref *pixels* carried by the network's own flow and
  matching (the path the features take), high-passed as the network does; `warp_corr_s2` with
  those pixels moved back by the published patch warp's 2-pixel displacement
  (`matching.patch_warp_shift`), which the features' deformable conv must undo
  (`--warp-shift-init`).
- `dcn_mask`: mean modulation mask of the alignment's deformable conv (0.5 untrained); and
  `align_gain`: rms(F_Ref_align) / rms(F_Ref). Near 0, the alignment has shut the reference out
  before any matching (every trained version up to the fourth session: docs/decisions.md, "Warp
  normalisation").

Prints a per-pair table and the mean row last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from eval_weights import _load  # noqa: E402

from sddusr_engine.data import load_pairs, to_tensor  # noqa: E402
from sddusr_engine.evaluate import bicubic_x2  # noqa: E402
from sddusr_engine.model.flow import flow_warp  # noqa: E402
from sddusr_engine.model.matching import (  # noqa: E402
    high_pass,
    high_pass_covered,
    patch_warp_shift,
    warp_by_index,
    warp_coverage,
)

COLUMNS = (
    "conf_in",
    "conf_out",
    "match_exact",
    "flow_px",
    "flow_epe",
    "flow_epe_zero",
    "ref_corr_raw",
    "ref_corr_aligned",
    "warp_corr",
    "warp_corr_s2",
    "dcn_mask",
    "align_gain",
)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def _ref_detail_corr(ref: torch.Tensor, need: torch.Tensor, block: int = 32, search: int = 4):
    """(raw, best-shift) mean block correlation of the Ref's detail with the needed detail."""
    down = F.interpolate(ref, scale_factor=0.5, mode="bicubic", align_corners=False, antialias=True)
    detail = ref - F.interpolate(down, size=ref.shape[-2:], mode="bicubic", align_corners=False)
    h, w = need.shape[-2:]
    raw, best = [], []
    for by in range(search, h - block - search + 1, block):
        for bx in range(search, w - block - search + 1, block):
            target = need[..., by : by + block, bx : bx + block]
            if float(target.std()) < 0.01:  # flat block: nothing to transfer
                continue
            shifted = [
                _corr(detail[..., by + dy : by + dy + block, bx + dx : bx + dx + block], target)
                for dy in range(-search, search + 1)
                for dx in range(-search, search + 1)
            ]
            raw.append(_corr(detail[..., by : by + block, bx : bx + block], target))
            best.append(max(shifted))
    return (float(np.mean(raw)), float(np.mean(best))) if raw else (math.nan, math.nan)


@torch.no_grad()
def diagnose(weights: str | None, data: str, split: str = "test", limit: int | None = None):
    model = _load(weights, "cpu")
    rows = []
    for t in load_pairs(data, split, limit=limit):
        lr, hr, lrc, ref = (to_tensor(a)[None] for a in (t.lr, t.hr, t.lrc, t.ref))
        dcn, seen = model.Ref_align.dcnpack, {}
        hook = dcn.conv_offset.register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.update(
                mask=float(torch.sigmoid(out.chunk(3, dim=1)[2]).mean())
            )
        )
        _, aux = model(lr, lrc, ref, return_aux=True)
        hook.remove()
        y0, y1, x0, x1 = t.box_hr
        conf, index = aux["confidence"][0, 0], aux["index"][0]
        hq, wq = conf.shape
        hk, wk = lrc.shape[-2] // 2, lrc.shape[-1] // 2
        # matching cell = 4 HR px; LR cell i <-> LRC cell i - y0/4 (a half cell when y0/2 is odd)
        oy, ox = y0 / 4, x0 / 4
        ii, jj = torch.meshgrid(torch.arange(hq), torch.arange(wq), indexing="ij")
        inside = (
            (ii >= math.ceil(oy)) & (ii < oy + hk - 1) & (jj >= math.ceil(ox)) & (jj < ox + wk - 1)
        )
        active = index >= 0
        ki, kj = index // wk, index % wk
        err = torch.maximum((ki - (ii - oy)).abs(), (kj - (jj - ox)).abs())
        sel = inside & active
        flow = aux["flow"]
        row = {
            "name": t.name,
            "conf_in": float(conf[sel].mean()) if sel.any() else math.nan,
            "conf_out": float(conf[~inside & active].mean())
            if (~inside & active).any()
            else math.nan,
            "match_exact": float((err[sel] <= 0.5).float().mean()) if sel.any() else math.nan,
            "flow_px": float(flow.norm(dim=1).mean()),
            "flow_epe": math.nan,
            "flow_epe_zero": math.nan,
            "dcn_mask": seen.get("mask", math.nan),
            "align_gain": float(aux["f_ref_align"].square().mean().sqrt())
            / max(float(aux["f_ref"].square().mean().sqrt()), 1e-12),
        }
        if t.flow is not None:
            true = torch.from_numpy(t.flow).permute(2, 0, 1)[None]
            row["flow_epe"] = float((flow - true).norm(dim=1).mean())
            row["flow_epe_zero"] = float(true.norm(dim=1).mean())
        need = (hr - bicubic_x2(lr))[..., y0:y1, x0:x1]
        row["ref_corr_raw"], row["ref_corr_aligned"] = _ref_detail_corr(ref, need)
        # the Ref's pixels along the network's own path: flow onto LRC, then the matched patches
        ref_flow = 2.0 * F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True)
        carried = warp_by_index(flow_warp(ref, ref_flow), aux["index"], model.ops.patch_warp)
        if model.config.warp_norm == "coverage":  # the detail band this network computes
            cover = warp_coverage((aux["index"] >= 0)[:, None].float())
            detail = high_pass_covered(carried, cover, torch.ones(1))
        else:
            detail = high_pass(carried, torch.ones(1))
        detail = detail[..., : hr.shape[-2], : hr.shape[-1]]
        has_all = carried.abs().sum(1, keepdim=True) > 0
        s = patch_warp_shift()
        for key, det, has in (
            ("warp_corr", detail, has_all),
            # carried pixel p - s shows what output pixel p needs
            ("warp_corr_s2", detail.roll((s, s), (-2, -1)), has_all.roll((s, s), (-2, -1))),
        ):
            got = det[..., y0:y1, x0:x1]
            m = has[..., y0:y1, x0:x1].expand_as(got)
            row[key] = _corr(got[m], need[m]) if m.any() else math.nan
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in COLUMNS}
    return {"weights": str(weights), "data": str(data), "split": split, "rows": rows, "mean": mean}


def table(res: dict, columns=COLUMNS, digits: int = 3, first: str = "pair") -> str:
    """Markdown: one row per pair of `res["rows"]`, the mean row last."""
    head = f"| {first} | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for r in [*res["rows"], {"name": "**mean**", **res["mean"]}]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.{digits}f}" for k in columns) + " |")
    return "\n".join(lines)


def split_parser(doc: str) -> argparse.ArgumentParser:
    """The options every held-out-split script here takes (--data, --split, --limit, --threads,
    --json); `run_split` applies them."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    return ap


def run_split(a: argparse.Namespace, compute, render) -> None:
    """Set the threads, compute the results, write --json, print the table."""
    if a.threads:
        torch.set_num_threads(a.threads)
    res = compute()
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(render(res))


def main(argv=None) -> None:
    ap = split_parser(__doc__)
    ap.add_argument(
        "--weights", default=None, help="safetensors or checkpoint.pt; default: shipped"
    )
    a = ap.parse_args(argv)
    run_split(a, lambda: diagnose(a.weights, a.data, a.split, a.limit), table)


if __name__ == "__main__":
    main()
