"""Validation table of a weights file on a held-out split (the model card's numbers).

    python bench/eval_weights.py --weights weights/sddusr_default.safetensors \
        --data ~/sddusr_work/pairs --split test --json out.json

For every pair of `<data>/<split>` (KeDuSR layout, see sddusr_engine.data), in eval mode (the
inference form of Sparse Feature Matching), whole images, no tiling:

- full-image PSNR of SR and of bicubic x2 of the LR (torch bicubic, align_corners=False,
  clamped), RGB in [0,255], no border shave;
- centre-region PSNR (the box of the JSON) with the true reference, and with the reference of
  another photo (the next pair in sorted order, resized bicubic onto this pair's Ref grid; the
  LR and LRC stay the true ones): the gap measures how much the network uses the reference;
- corner-region PSNR (everything outside the box, pooled by area);
- the SFM masks' active fraction: LR-side mask and LRC-side mask, and their mean.

`--ensemble N` averages N flipped/transposed passes, as the engine's `ensemble=N` does (the masks
are the plain pass's). Weights that carry a low-band projection (sddusr_engine.low_band) get it
outside the box, as in the engine; `--no-low-band` leaves it out. `--adapt N` runs the engine's
self-adaptation (`sddusr_engine.adapt`) per pair before the projection: outside the box the
output is then the adapted copy's, reference-free (the wrong-reference control and the masks are
the centre's and stay those of the plain network; `forward_s` includes the fine-tune).

Prints a per-pair table, then the mean row last. Means are over pairs (PSNR averaged in dB).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _provenance import cpu_run_stamp  # noqa: E402

from sddusr_engine.adapt import AdaptSettings, adapt_single_image_path, blend_outside  # noqa: E402
from sddusr_engine.data import load_pairs, to_tensor  # noqa: E402
from sddusr_engine.engine import symmetric_passes  # noqa: E402
from sddusr_engine.evaluate import bicubic_x2  # noqa: E402
from sddusr_engine.low_band import lr_box  # noqa: E402
from sddusr_engine.weights import load_model  # noqa: E402


def _mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.clamp(0, 1).double() * 255 - b.double() * 255).square()
    if mask is None:
        return d.mean().item()
    m = mask.expand_as(d)
    return (d[m].mean()).item()


def _psnr(mse: float) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def centre_mask(hr: torch.Tensor, box) -> torch.Tensor:
    """bool [1,1,H,W] on hr's grid and device: True inside box = (y0, y1, x0, x1), HR pixels."""
    y0, y1, x0, x1 = box
    mask = torch.zeros(1, 1, *hr.shape[-2:], dtype=torch.bool, device=hr.device)
    mask[..., y0:y1, x0:x1] = True
    return mask


def _load(weights: str | None, device: str) -> torch.nn.Module:
    """A safetensors weights file, or a training checkpoint (`checkpoint.pt`) while it runs."""
    if weights is not None and str(weights).endswith(".pt"):
        from sddusr_engine.config import ModelConfig
        from sddusr_engine.model.network import DualLensSR
        from sddusr_engine.train import load_checkpoint

        ck = load_checkpoint(weights)
        model = DualLensSR(ModelConfig.from_dict(ck["model_config"]))
        model.load_state_dict(ck["model"])
        return model.to(device).eval()
    return load_model(weights, device=device).eval()


def _ensemble(model, n: int):
    """model(lr, lrc, ref, return_aux) averaged over n symmetric passes (the engine's
    `symmetric_passes`); the aux (masks) is the plain pass's."""

    def forward(lr, lrc, ref, return_aux=False):
        aux = {}

        def one_pass(k, *pair):
            if k:
                return model(*pair)
            out, aux["plain"] = model(*pair, return_aux=True)
            return out

        sr = sum(symmetric_passes(one_pass, lr, lrc, ref, n)) / n
        return (sr, aux["plain"]) if return_aux else sr

    return forward


@torch.no_grad()
def evaluate(
    weights: str | None,
    data: str,
    split: str = "test",
    device: str = "cpu",
    limit: int | None = None,
    ensemble: int = 1,
    low_band: bool = True,
    adapt: int = 0,
    whole_only: bool = False,
) -> dict:
    net = _load(weights, device)
    model = net if ensemble == 1 else _ensemble(net, ensemble)
    pairs = [t for t in load_pairs(data, split) if not whole_only or t.name.endswith("_0.png")]
    pairs = pairs[:limit] if limit else pairs
    if len(pairs) < 2:
        raise SystemExit("need at least two pairs (the wrong-reference control uses another photo)")
    rows = []
    for i, t in enumerate(pairs):
        other = pairs[(i + 1) % len(pairs)]
        lr = to_tensor(t.lr)[None].to(device)
        hr = to_tensor(t.hr)[None].to(device)
        lrc = to_tensor(t.lrc)[None].to(device)
        ref = to_tensor(t.ref)[None].to(device)
        wrong = (
            F.interpolate(
                to_tensor(other.ref)[None], size=ref.shape[-2:], mode="bicubic", align_corners=False
            )
            .clamp(0, 1)
            .to(device)
        )
        center = centre_mask(hr, t.box_hr)
        t0 = time.perf_counter()
        # the weights' low-band projection (if any) outside the Ref's LR box, as the engine does
        lbox = lr_box(t.box_hr)
        box = lbox if low_band else None
        sr, aux = model(lr, lrc, ref, return_aux=True)
        if adapt:  # as the engine's `adapt`: the adapted copy's reference-free output outside
            y0, y1, x0, x1 = lbox
            teacher = sr[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
            student = adapt_single_image_path(net, lr, teacher, lbox, AdaptSettings(steps=adapt))
            sr_out = (student if ensemble == 1 else _ensemble(student, ensemble))(lr, None, None)
            sr = blend_outside(sr, sr_out, lbox)
        sr = net.project_low_band(sr, lr, box) if low_band else sr
        dt = time.perf_counter() - t0
        sr_wrong = model(lr, lrc, wrong)
        sr_wrong = net.project_low_band(sr_wrong, lr, box) if low_band else sr_wrong
        bic = bicubic_x2(lr)
        row = {
            "name": t.name,
            "lr_hw": list(t.lr.shape[:2]),
            "psnr_sr": _psnr(_mse(sr, hr)),
            "psnr_bicubic": _psnr(_mse(bic, hr)),
            "center_true_ref": _psnr(_mse(sr, hr, center)),
            "center_wrong_ref": _psnr(_mse(sr_wrong, hr, center)),
            "center_bicubic": _psnr(_mse(bic, hr, center)),
            "corner_sr": _psnr(_mse(sr, hr, ~center)),
            "corner_bicubic": _psnr(_mse(bic, hr, ~center)),
            "forward_s": dt,
        }
        for side in ("lr", "lrc"):
            m = aux.get(f"mask_{side}")
            row[f"mask_active_{side}"] = float(m.float().mean()) if m is not None else float("nan")
        row["mask_active"] = 0.5 * (row["mask_active_lr"] + row["mask_active_lrc"])
        row["gain_db"] = row["psnr_sr"] - row["psnr_bicubic"]
        row["ref_gain_db"] = row["center_true_ref"] - row["center_wrong_ref"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k not in ("name", "lr_hw")]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {
        "weights": str(weights),
        "ensemble": ensemble,
        "low_band": bool(low_band and net.config.low_band_taps),
        "adapt": adapt,
        "data": str(data),
        "split": split,
        "whole_only": whole_only,
        "pairs": len(rows),
        "rows": rows,
        "mean": mean,
        "device": device,
        **cpu_run_stamp(),
    }


def table(res: dict) -> str:
    cols = [
        ("psnr_sr", "SR"),
        ("psnr_bicubic", "bicubic"),
        ("gain_db", "gain"),
        ("center_true_ref", "centre, true Ref"),
        ("center_wrong_ref", "centre, other Ref"),
        ("ref_gain_db", "Ref gain"),
        ("corner_sr", "corner SR"),
        ("mask_active_lr", "mask LR"),
        ("mask_active_lrc", "mask LRC"),
    ]
    head = "| pair | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]

    def fmt(k, v):
        return f"{100 * v:.1f}%" if k.startswith("mask") else f"{v:.2f}"

    for r in res["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(fmt(k, r[k]) for k, _ in cols) + " |")
    m = res["mean"]
    lines.append("| **mean** | " + " | ".join(f"**{fmt(k, m[k])}**" for k, _ in cols) + " |")
    return "\n".join(lines)


def held_out_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments the held-out bench scripts share: weights, data, split, threads, limit,
    json."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument(
        "--weights",
        default=None,
        help="safetensors file (default: the shipped weights) or a training checkpoint.pt",
    )
    ap.add_argument("--data", required=True, help="dataset root in the KeDuSR layout")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap


def parse_held_out(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then set the CPU threads (--threads) and flush denormals (the CPU's slow path)."""
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    return a


def main(argv=None) -> None:
    ap = held_out_parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--ensemble", type=int, default=1, choices=(1, 2, 4, 8), help="flipped passes averaged"
    )
    ap.add_argument(
        "--no-low-band",
        action="store_true",
        help="leave out the weights' low-band projection (the network's own output)",
    )
    ap.add_argument(
        "--adapt",
        type=int,
        default=0,
        metavar="STEPS",
        help="self-adaptation steps per pair, as the engine's --adapt (0: off)",
    )
    ap.add_argument(
        "--whole-only", action="store_true", help="only the pairs made from whole photos (*_0.png)"
    )
    a = parse_held_out(ap, argv)
    res = evaluate(
        a.weights,
        a.data,
        a.split,
        a.device,
        a.limit,
        a.ensemble,
        not a.no_low_band,
        a.adapt,
        a.whole_only,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    m = res["mean"]
    print(
        f"weights {res['weights']} | ensemble {res['ensemble']} | low band {res['low_band']} | adapt {res['adapt']} | {res['pairs']} pairs of {a.data}/{a.split} | "
        f"{res['hardware']} | torch {res['torch']} | commit {res['commit']} | {res['date']}"
    )
    print(
        f"floors: full-image gain {m['gain_db']:+.2f} dB (>= +1.5), "
        f"reference gain {m['ref_gain_db']:+.2f} dB (>= +1.0), "
        f"mask active {100 * m['mask_active']:.1f}% (< 80%)"
    )
    print(table(res))


if __name__ == "__main__":
    main()
