"""Where the full-image PSNR is lost, and what simple use of the telephoto could win at most.

    python bench/region_oracles.py --data ~/sddusr_work/pairs5 --threads 2 --json out.json

Per held-out pair (whole images, eval mode, as bench/eval_weights.py), PSNR in the centre box
(where the telephoto is) and in the corners (the rest), for: bicubic x2 of the LR, the network,
the network with the reference switched off, and the Ref itself (centre only). Then two
upper bounds that look at the ground truth, so they are limits, not methods:

- `blend`: the centre replaced by SR + a·(Ref − SR) with the a that is best for that photo (the
  least-squares a against HR). Any fixed or predicted global blend of the two does no better;
  the column is the full-image gain over bicubic it would give.
- `sharpen`: the corners of SR sharpened by the best unsharp mask for that photo
  (SR + k·(SR − blur_s(SR)), k in {0.25, 0.5, 1, 1.5, 2}, s in {0.7, 1, 1.5}).

and, not a bound: the centre's low band (Gaussian blur, sigma 4 HR pixels, of each image and of
HR) for bicubic, SR and the Ref. The network's reference path passes only the band above about
1/8 cycle per pixel (its detail map subtracts a 4×4-cell low band), so where the LR's low band
is wrong (aliasing, JPEG) and the Ref's is right, the network cannot take it from the Ref.

Means are over pairs (dB). Prints the table last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _provenance import cpu_run_stamp  # noqa: E402
from eval_weights import _load, _mse, _psnr, centre_mask, held_out_parser, parse_held_out  # noqa: E402

from sddusr_engine.data import _blur, load_pairs, to_tensor  # noqa: E402
from sddusr_engine.evaluate import bicubic_x2  # noqa: E402

SHARPEN_K = (0.25, 0.5, 1.0, 1.5, 2.0)
SHARPEN_SIGMA = (0.7, 1.0, 1.5)
LOW_SIGMA = 4.0  # HR pixels: the band below the network's detail map


def _gauss(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """[1,3,H,W] float -> the same, Gaussian-blurred (the pair maker's blur)."""
    hwc = x[0].permute(1, 2, 0).double().numpy()
    return torch.from_numpy(np.ascontiguousarray(_blur(hwc, sigma))).permute(2, 0, 1)[None]


@torch.no_grad()
def oracles(weights: str | None, data: str, split: str = "test", limit: int | None = None) -> dict:
    net = _load(weights, "cpu")
    rows = []
    for t in load_pairs(data, split, limit=limit):
        lr, hr, lrc, ref = (to_tensor(x)[None].double() for x in (t.lr, t.hr, t.lrc, t.ref))
        y0, y1, x0, x1 = t.box_hr
        centre = centre_mask(hr, t.box_hr)
        sr = net(lr.float(), lrc.float(), ref.float()).double().clamp(0, 1)
        no_ref = net(lr.float(), None, None).double().clamp(0, 1)
        bic = bicubic_x2(lr.float()).double().clamp(0, 1)

        def region(x, m, hr=hr):
            return _psnr(_mse(x, hr, m))

        # the best single a for this photo (least squares against HR), the centre only
        s, h = sr[..., y0:y1, x0:x1], hr[..., y0:y1, x0:x1]
        d = ref - s
        a = float((d * (h - s)).sum() / (d * d).sum())
        blended = sr.clone()
        blended[..., y0:y1, x0:x1] = (s + a * d).clamp(0, 1)
        sharpened = max(
            region((sr + k * (sr - _gauss(sr, sg))).clamp(0, 1), ~centre)
            for sg in SHARPEN_SIGMA
            for k in SHARPEN_K
        )
        full_bic = region(bic, None)
        h_low = _gauss(h, LOW_SIGMA)

        def low_band(x, h_low=h_low):
            return _psnr(_mse(_gauss(x, LOW_SIGMA), h_low))

        rows.append(
            {
                "name": t.name,
                "centre_bicubic": region(bic, centre),
                "centre_sr": region(sr, centre),
                "centre_no_ref": region(no_ref, centre),
                "centre_ref_only": _psnr(_mse(ref, h)),
                "centre_low_bicubic": low_band(bic[..., y0:y1, x0:x1]),
                "centre_low_sr": low_band(s),
                "centre_low_ref": low_band(ref),
                "corner_bicubic": region(bic, ~centre),
                "corner_sr": region(sr, ~centre),
                "corner_no_ref": region(no_ref, ~centre),
                "corner_sharpen_oracle": sharpened,
                "blend_a": a,
                "gain_db": region(sr, None) - full_bic,
                "gain_blend_oracle_db": region(blended, None) - full_bic,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k != "name"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"weights": str(weights), "data": str(data), "split": split, "rows": rows,
            "mean": mean, **cpu_run_stamp()}  # fmt: skip


COLUMNS = [
    ("centre_bicubic", "centre bicubic"),
    ("centre_sr", "centre SR"),
    ("centre_no_ref", "centre, no Ref"),
    ("centre_ref_only", "Ref alone"),
    ("centre_low_bicubic", "centre low band: bicubic"),
    ("centre_low_sr", "SR"),
    ("centre_low_ref", "Ref"),
    ("corner_bicubic", "corners bicubic"),
    ("corner_sr", "corners SR"),
    ("corner_no_ref", "corners, no Ref"),
    ("corner_sharpen_oracle", "corners, best sharpen"),
    ("gain_db", "full gain"),
    ("blend_a", "best a"),
    ("gain_blend_oracle_db", "full gain, best blend"),
]


def table(res: dict) -> str:
    lines = ["| pair | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|" + "---|" * (len(COLUMNS) + 1)]  # fmt: skip
    for r in [*res["rows"], {"name": "**mean**", **res["mean"]}]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.2f}" for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_held_out(held_out_parser(__doc__), argv)
    res = oracles(a.weights, a.data, a.split, a.limit)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"weights {res['weights']} | {len(res['rows'])} pairs of {a.data}/{a.split} | "
          f"{res['hardware']} | torch {res['torch']} | commit {res['commit']} | {res['date']}")  # fmt: skip
    print(table(res))


if __name__ == "__main__":
    main()
