"""The low-band projection's sigma sweep (model card, "Tenth session"): full-image gain over bicubic
of a network's output with the projection at each sigma, outside the centre box and everywhere.

    python bench/low_band_sweep.py --weights v6.safetensors --data ~/sddusr_work/pairs7s1 \
        --split train --whole-only --fit-data ~/sddusr_work/pairs7

The network runs once per pair (the projection is applied afterwards, in float64 sums); the
upsampler is fitted on `--fit-data`'s training split, as `python -m sddusr_engine.low_band` fits
the shipped one. `--whole-only` keeps the pairs made from whole photos (`*_0.png`), not the extra
training crops. The selection of version 7's sigma used the training photos with fresh
degradations (`data prepare --seed 1`), so that the held-out split was not used to choose it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval_weights import _load, held_out_parser, parse_held_out  # noqa: E402

from sddusr_engine.data import load_pairs, to_tensor  # noqa: E402
from sddusr_engine.evaluate import bicubic_x2  # noqa: E402
from sddusr_engine.low_band import (  # noqa: E402
    LinearUpsampler,
    fit_upsampler,
    lr_box,
    project_low_band,
)

SIGMAS = (0.7, 1.0, 1.5, 2.0, 3.0)


def _gain(out: torch.Tensor, bic: torch.Tensor, hr: torch.Tensor) -> float:
    mse = lambda x: float((x.double() - hr.double()).square().mean())  # noqa: E731
    return 10 * math.log10(mse(bic) / mse(out))


@torch.no_grad()
def sweep(weights, data, split, fit_data, taps=7, whole_only=False, limit=None) -> dict:
    net = _load(weights, "cpu")
    fit_pairs = load_pairs(fit_data, "train")
    up = LinearUpsampler(taps)
    up.taps.copy_(fit_upsampler(((to_tensor(t.lr), to_tensor(t.hr)) for t in fit_pairs), taps))
    pairs = [t for t in load_pairs(data, split) if not whole_only or t.name.endswith("_0.png")]
    rows = []
    for t in pairs[:limit]:
        lr, lrc, ref = (to_tensor(x)[None] for x in (t.lr, t.lrc, t.ref))
        hr = to_tensor(t.hr)[None]
        sr = net(lr, lrc, ref).clamp(0, 1)
        bic = bicubic_x2(lr).clamp(0, 1)
        box = lr_box(t.box_hr)
        row = {"name": t.name, "network": _gain(sr, bic, hr)}
        for s in SIGMAS:
            row[f"outside_{s}"] = _gain(project_low_band(sr, lr, up, s, box), bic, hr)
            row[f"everywhere_{s}"] = _gain(project_low_band(sr, lr, up, s, None), bic, hr)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k != "name"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"weights": str(weights), "data": str(data), "split": split, "pairs": len(rows),
            "fit_data": str(fit_data), "taps": taps, "rows": rows, "mean": mean}  # fmt: skip


def main(argv=None) -> None:
    ap = held_out_parser(__doc__)
    ap.add_argument("--fit-data", required=True, help="pairs folder whose train split fits it")
    ap.add_argument("--taps", type=int, default=7)
    ap.add_argument("--whole-only", action="store_true", help="only the *_0.png pairs")
    a = parse_held_out(ap, argv)
    res = sweep(a.weights, a.data, a.split, a.fit_data, a.taps, a.whole_only, a.limit)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    m = res["mean"]
    print(f"{res['pairs']} pairs of {a.data}/{a.split}; full-image gain over bicubic (dB), mean")
    print("| sigma | " + " | ".join(str(s) for s in SIGMAS) + " |")
    print("|---|" + "---:|" * len(SIGMAS))
    for where in ("outside", "everywhere"):  # outside the centre box; everywhere
        cells = " | ".join(f"{m[f'{where}_{s}']:+.3f}" for s in SIGMAS)
        print(f"| {where} | {cells} |")
    print(f"(the network alone: {m['network']:+.3f})")


if __name__ == "__main__":
    main()
