"""What the engine's self-ensemble (`ensemble=N`) buys on a held-out split, for N = 1, 2, 4, 8.

    python bench/ensemble_sweep.py --data ~/sddusr_work/pairs5 --threads 2 --json sweep.json

The passes are nested (`engine.symmetric_passes`: the first N of `engine.SYMMETRIES`), so one
run of 8 passes per pair gives all four rows. Each pass is the network on the whole pair with
the true reference, flipped/transposed and mapped back, clamped; N passes are averaged, as `Engine(ensemble=N)` and
`bench/eval_weights.py --ensemble N` do. Metrics as in eval_weights: PSNR on RGB in [0,255], no
border shave, full image / centre box / the rest, mean over pairs in dB. The last column is the
forward time per pair on this machine (N passes).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _provenance import cpu_run_stamp  # noqa: E402
from eval_weights import _load, _mse, _psnr, centre_mask, held_out_parser, parse_held_out  # noqa: E402

from sddusr_engine.data import load_pairs, to_tensor  # noqa: E402
from sddusr_engine.engine import symmetric_passes  # noqa: E402
from sddusr_engine.evaluate import bicubic_x2  # noqa: E402

SIZES = (1, 2, 4, 8)


@torch.no_grad()
def sweep(weights: str | None, data: str, split: str = "test", limit: int | None = None) -> dict:
    model = _load(weights, "cpu")
    rows = []
    for t in load_pairs(data, split, limit=limit):
        lr, hr, lrc, ref = (to_tensor(a)[None] for a in (t.lr, t.hr, t.lrc, t.ref))
        centre = centre_mask(hr, t.box_hr)
        bic = bicubic_x2(lr)
        row = {"name": t.name, "bicubic": _psnr(_mse(bic, hr))}
        seconds = 0.0

        def timed(k, *pair):
            nonlocal seconds
            t0 = time.perf_counter()
            out = model(*pair)
            seconds += time.perf_counter() - t0
            return out

        acc = 0
        for k, out in enumerate(symmetric_passes(timed, lr, lrc, ref, max(SIZES))):
            acc = acc + out
            n = k + 1
            if n in SIZES:
                sr = acc / n
                row[n] = {
                    "full": _psnr(_mse(sr, hr)),
                    "centre": _psnr(_mse(sr, hr, centre)),
                    "corner": _psnr(_mse(sr, hr, ~centre)),
                    "seconds": seconds,
                }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    mean = {n: {m: float(np.mean([r[n][m] for r in rows])) for m in rows[0][n]} for n in SIZES}
    bicubic = float(np.mean([r["bicubic"] for r in rows]))
    return {
        "weights": str(weights),
        "data": str(data),
        "split": split,
        "pairs": len(rows),
        "rows": rows,
        "mean": mean,
        "bicubic": bicubic,
        **cpu_run_stamp(),
    }


def table(res: dict) -> str:
    lines = [
        "| ensemble | full image | gain over bicubic | centre | corner | s per pair |",
        "|---|---|---|---|---|---|",
    ]
    for n in SIZES:
        m = res["mean"][n]
        lines.append(
            f"| {n} | {m['full']:.2f} | {m['full'] - res['bicubic']:+.2f} | {m['centre']:.2f} "
            f"| {m['corner']:.2f} | {m['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_held_out(held_out_parser(__doc__), argv)
    res = sweep(a.weights, a.data, a.split, a.limit)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(
        f"weights {res['weights']} | {res['pairs']} pairs of {a.data}/{a.split} | "
        f"{res['hardware']} | torch {res['torch']} | commit {res['commit']} | {res['date']}"
    )
    print(table(res))


if __name__ == "__main__":
    main()
