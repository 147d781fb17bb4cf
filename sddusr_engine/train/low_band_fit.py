"""Fitting the low-band projection's linear x2 upsampler by least squares on training pairs, and
`python -m sddusr_engine.train.low_band_fit`, which writes the taps and sigma into a weights file.

The upsampler (`sddusr_engine.model.low_band.LinearUpsampler`): for each of the 4 output phases
(2i+a, 2j+b), a K x K filter on the LR around (i, j), shared by the three channels. The fitted
taps go into the weights file with the config fields `low_band_taps` and `low_band_sigma`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F


def _lr_taps(lr: torch.Tensor, k: int) -> torch.Tensor:
    """lr [3,H,W] -> [3*H*W, K*K]: each LR pixel's K x K neighbourhood, edges replicated."""
    x = F.pad(lr[:, None], (k // 2,) * 4, mode="replicate")
    return F.unfold(x, k).permute(0, 2, 1).reshape(-1, k * k)


def fit_upsampler(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    taps: int = 7,
    keep: float = 0.25,
    ridge: float = 1e-4,
    seed: int = 0,
) -> torch.Tensor:
    """Least-squares taps [4,1,K,K] from (lr [3,H,W], hr [3,2H,2W]) pairs in [0,1].

    Normal equations accumulated in float64 over a seeded random `keep` fraction of each
    image's pixels (all pixels make a 49-column system of tens of millions of rows)."""
    gen = torch.Generator().manual_seed(seed)
    ata = torch.zeros(taps * taps, taps * taps, dtype=torch.float64)
    aty = torch.zeros(4, taps * taps, dtype=torch.float64)
    n = 0
    for lr, hr in pairs:
        h, w = lr.shape[-2:]
        if tuple(hr.shape[-2:]) != (2 * h, 2 * w):
            raise ValueError(f"HR {tuple(hr.shape)} is not twice LR {tuple(lr.shape)}")
        a = _lr_taps(lr.double(), taps)
        idx = torch.randperm(a.shape[0], generator=gen)[: max(1, int(keep * a.shape[0]))]
        a = a[idx]
        ata += a.T @ a
        for p, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            aty[p] += a.T @ hr[:, dy::2, dx::2].reshape(-1).double()[idx]
        n += 1
    if n == 0:
        raise ValueError("no pairs to fit the upsampler on")
    eye = torch.eye(taps * taps, dtype=torch.float64)
    sol = torch.linalg.solve(ata + ridge * eye, aty.T).T  # [4, K*K]
    return sol.float().reshape(4, 1, taps, taps)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sddusr_engine.train.low_band_fit",
        description="Fit the linear x2 upsampler on a pairs folder's training split and write it, "
        "with the projection's sigma, into a copy of a weights file.",
    )
    ap.add_argument("--data", required=True, help="pairs folder (sddusr data prepare output)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--weights", required=True, help="the network's weights (.safetensors)")
    ap.add_argument("--out", required=True, help="weights file to write")
    ap.add_argument("--taps", type=int, default=7)
    ap.add_argument(
        "--sigma", type=float, default=2.0, help="HR pixels (2.0: the shipped weights' choice)"
    )
    args = ap.parse_args(argv)

    from dataclasses import replace

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..datasets import load_pairs
    from ..io import atomic_output, to_tensor
    from ..weights import read_weights

    tensors, config = read_weights(args.weights)  # as stored (a float16 file stays float16)
    pairs = load_pairs(args.data, args.split)
    taps = fit_upsampler(((to_tensor(t.lr)[0], to_tensor(t.hr)[0]) for t in pairs), args.taps)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("low_band_upsampler.")}
    tensors["low_band_upsampler.taps"] = taps.contiguous()  # float32 whatever the rest is
    with safe_open(args.weights, "pt") as f:
        meta = dict(f.metadata() or {})
    config = replace(config, low_band_taps=args.taps, low_band_sigma=args.sigma)
    meta["config"] = json.dumps(config.to_dict())
    meta["low_band_fit"] = json.dumps(
        {"data": str(args.data), "split": args.split, "pairs": len(pairs), "taps": args.taps}
    )
    out = Path(args.out)
    with atomic_output(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    print(f"{out}: upsampler fitted on {len(pairs)} pairs, sigma {args.sigma} HR px")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
