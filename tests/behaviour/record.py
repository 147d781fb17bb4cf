"""Record the engine's outputs that tests/test_behaviour.py keeps identical through refactors.

    python tests/behaviour/record.py            # writes tests/behaviour/*.safetensors / *.png

Two cases, each run on the CPU in fp32 with the plain PyTorch ops:

- `sample`: the shipped weights on the bundled raw pair (assets/sample), through registration.
  Kept: the 8-bit output exactly (PNG), the float output on five 96x96 windows (four corners and
  the centre) and the float output's per-channel sums, the footprint's homography.
- `kedusr`: a KeDuSR-format `.pth` checkpoint (the published key layout with random weights, from
  ../shared/golden) on the golden triplet, whole and in 64-pixel tiles; the float output in full.

Re-record only when a change of output is intended, and say so in the commit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GOLDEN = Path(os.environ.get("SDDUSR_GOLDEN_DIR") or ROOT.parent / "shared" / "golden")
WINDOW = 96


def windows(hw: tuple[int, int]) -> dict[str, tuple[slice, slice]]:
    """The five windows (corners and centre) of an image of size `hw` that the record keeps."""
    h, w, s = hw[0], hw[1], WINDOW
    return {
        "top_left": (slice(0, s), slice(0, s)),
        "top_right": (slice(0, s), slice(w - s, w)),
        "bottom_left": (slice(h - s, h), slice(0, s)),
        "bottom_right": (slice(h - s, h), slice(w - s, w)),
        "centre": (
            slice(h // 2 - s // 2, h // 2 + s // 2),
            slice(w // 2 - s // 2, w // 2 + s // 2),
        ),
    }


def run_sample():
    """The shipped weights on the bundled pair: (uint8 HxWx3, float [1,3,H,W], homography)."""
    from sddusr_engine import Engine
    from sddusr_engine.io import read_image
    from sddusr_engine.registration import align_reference

    eng = Engine.from_pretrained(device="cpu", dtype="fp32", backend="torch")
    wide = read_image(ROOT / "assets" / "sample" / "wide.jpg")
    tele = read_image(ROOT / "assets" / "sample" / "tele.jpg")
    sr8, info = eng.super_resolve(wide, tele, return_info=True)
    pair = align_reference(wide, tele)
    from sddusr_engine.io import to_tensor

    sr = eng.run(
        to_tensor(pair.lr), to_tensor(pair.lrc), to_tensor(pair.ref), box_lr=tuple(pair.box_lr)
    )
    return sr8, sr, np.asarray(info.footprint.homography, dtype=np.float64)


def kedusr_checkpoint(path: Path) -> Path:
    """The golden random weights written as a KeDuSR release would be (.pth, `params_ema`)."""
    torch.save({"params_ema": load_file(str(GOLDEN / "kedusr_random_weights.safetensors"))}, path)
    return path


def run_kedusr(checkpoint: Path) -> dict[str, torch.Tensor]:
    from sddusr_engine import Engine

    io = load_file(str(GOLDEN / "kedusr_golden_io.safetensors"))
    out = {}
    for tile in (0, 64):
        eng = Engine.from_pretrained(
            checkpoint, device="cpu", dtype="fp32", backend="torch", tile=tile
        )
        out[f"tile{tile}"] = eng.run(io["in_lr"], io["in_lrc"], io["in_ref"]).contiguous()
    return out


def main() -> int:
    import tempfile

    from PIL import Image

    sr8, sr, homography = run_sample()
    Image.fromarray(sr8).save(HERE / "sample_sr.png")
    tensors = {"homography": torch.from_numpy(homography), "sums": sr.double().sum((0, 2, 3))}
    for name, (ys, xs) in windows(sr.shape[-2:]).items():
        tensors[name] = sr[..., ys, xs].contiguous()
    save_file(tensors, str(HERE / "sample.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        save_file(
            run_kedusr(kedusr_checkpoint(Path(tmp) / "k.pth")), str(HERE / "kedusr.safetensors")
        )
    print(f"recorded into {HERE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
