"""How much can the telephoto add at most? A linear oracle on the held-out split.

    python bench/reference_ceiling.py --data ~/sddusr_work/pairs4 [--json out.json]

For each held-out pair with a true flow (`Flow/`, synthetic pairs), in the centre box only:
the Ref is warped onto the HR grid by the *true* flow (perfect alignment, which no network has),
then least-squares linear filters predict the missing detail HR - bicubic(LR), fitted on the
same pixels they are scored on (in-sample, so optimistic):

- `lr_only`: a 5x5 filter on bicubic(LR) per channel (a linear single-image SR);
- `lr_ref`: the same plus a 5x5 filter on the aligned Ref's detail (Ref minus its Gaussian blur);
- `ref_gain` = PSNR(lr_ref) - PSNR(lr_only): what the reference adds, at best, to a linear
  single-image SR;
- `ref_gain_unaligned`: the same with the Ref as the registration left it (no flow): what is
  left without a sub-pixel aligner. It bounds what a network can gain from Ref detail of this quality, up to the
  non-linear part (edges a network can sharpen better than a linear filter).

Prints a per-pair table and the mean row last (PSNR on RGB in [0, 255], as everywhere else).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from diagnose_reference import run_split, split_parser, table  # noqa: E402

from sddusr_engine.data import load_pairs, to_tensor  # noqa: E402
from sddusr_engine.evaluate import bicubic_x2  # noqa: E402
from sddusr_engine.model.flow import flow_warp  # noqa: E402

COLUMNS = (
    "bicubic",
    "lr_only",
    "lr_ref",
    "ref_gain",
    "ref_gain_unaligned",
    "aligned_corr",
    "raw_corr",
)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b) * 255).square().mean())
    return 10 * np.log10(255**2 / mse)


def _taps(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[C,H,W] -> [C, H*W, k*k]: each pixel's k x k neighbourhood (reflect padding)."""
    c, h, w = x.shape
    cols = F.unfold(F.pad(x[None], (k // 2,) * 4, mode="reflect"), k)  # [1, C*k*k, H*W]
    return cols.view(c, k * k, h * w).transpose(1, 2)


def _detail(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[0]
    blur = F.conv2d(
        F.pad(x[None], (r, r, 0, 0), mode="reflect"),
        g.view(1, 1, 1, -1).expand(c, 1, 1, -1),
        groups=c,
    )
    blur = F.conv2d(
        F.pad(blur, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c
    )
    return x - blur[0]


def _fit(features: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Per channel least squares (+ bias): features [C,N,k] each, target [C,N] -> prediction."""
    out = []
    for ch in range(target.shape[0]):
        a = torch.cat([f[ch] for f in features] + [torch.ones(target.shape[1], 1)], dim=1).double()
        sol = torch.linalg.lstsq(a, target[ch].double()[:, None]).solution
        out.append((a @ sol)[:, 0].float())
    return torch.stack(out)


@torch.no_grad()
def ceiling(data: str, split: str = "test", limit: int | None = None) -> dict:
    rows = []
    for t in load_pairs(data, split, limit=limit):
        if t.flow is None:
            continue
        lr, hr, ref = (to_tensor(a)[None] for a in (t.lr, t.hr, t.ref))
        y0, y1, x0, x1 = t.box_hr
        flow = torch.from_numpy(t.flow).permute(2, 0, 1)[None]
        ref_flow = 2.0 * F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True)
        aligned = flow_warp(ref, ref_flow, padding_mode="border")[0]
        bic = bicubic_x2(lr)[0, :, y0:y1, x0:x1]
        hr_c = hr[0, :, y0:y1, x0:x1]
        need = (hr_c - bic).flatten(1)
        f_lr = _taps(_detail(bic))
        f_ref = _taps(_detail(aligned))
        h, w = hr_c.shape[-2:]
        p_lr = _fit([f_lr], need).view(3, h, w)
        p_both = _fit([f_lr, f_ref], need).view(3, h, w)
        p_raw = _fit([f_lr, _taps(_detail(ref[0]))], need).view(3, h, w)
        n = need.flatten()

        def corr(x, n=n):
            return float(torch.corrcoef(torch.stack([_detail(x).flatten(), n]))[0, 1])

        row = {
            "name": t.name,
            "bicubic": _psnr(bic, hr_c),
            "lr_only": _psnr(bic + p_lr, hr_c),
            "lr_ref": _psnr(bic + p_both, hr_c),
            "aligned_corr": corr(aligned),
            "raw_corr": corr(ref[0]),
        }
        row["ref_gain"] = row["lr_ref"] - row["lr_only"]
        row["ref_gain_unaligned"] = _psnr(bic + p_raw, hr_c) - row["lr_only"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in COLUMNS}
    return {"data": str(data), "split": split, "rows": rows, "mean": mean}


def main(argv=None) -> None:
    a = split_parser(__doc__).parse_args(argv)
    run_split(
        a,
        lambda: ceiling(a.data, a.split, a.limit),
        lambda res: table(res, COLUMNS, digits=2, first="pair (centre)"),
    )


if __name__ == "__main__":
    main()
