"""Shared test helpers: tiny network sizes, the golden-vector folder, the CLI runner, a folder of
pre-aligned triplets, textured photos and a photo manifest for the data pipeline."""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

# A network small enough for the CPU: every part present, every width tiny.
TINY = dict(
    channels=16,
    trunk_groups=1,
    trunk_blocks=1,
    encoder_blocks=1,
    decoder_blocks=1,
    tokens=8,
    token_dim=16,
    mask_hidden=8,
)

# The published code's test vectors: ../shared/golden beside the clone (CI has it; a user's clone
# does not, and the tests that need them skip with that reason). SDDUSR_GOLDEN_DIR points elsewhere
# (for example, a copy of some of them on a GPU machine).
GOLDEN_DIR = Path(
    os.environ.get("SDDUSR_GOLDEN_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "golden"
)

_runner = CliRunner()


def invoke(*args, **env):
    """Run the `sddusr` app in-process with a wide terminal (tables not folded)."""
    from sddusr_engine.cli import app

    return _runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **env})


def published_folder(root, n, size=(32, 48)):
    """n pre-aligned triplets in the published layout (with HR/, which batch ignores)."""
    from sddusr_engine.io import write_image

    rng = np.random.default_rng(1)
    h, w = size
    for sub in ("LR", "LR_center", "Ref_SIFT", "HR"):
        (root / "test" / sub).mkdir(parents=True)
    for i in range(n):
        lr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        lrc = lr[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]
        write_image(root / "test" / "LR" / f"{i:04d}.png", lr)
        write_image(root / "test" / "LR_center" / f"{i:04d}.png", lrc)
        write_image(
            root / "test" / "Ref_SIFT" / f"{i:04d}.png", np.kron(lrc, np.ones((2, 2, 1), np.uint8))
        )
        write_image(
            root / "test" / "HR" / f"{i:04d}.png", np.kron(lr, np.ones((2, 2, 1), np.uint8))
        )
    return root


def textured_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random image with some texture: float32 [h,w,3] in [0,1]."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
    img = img.astype(np.float32) / 255.0
    return np.clip(img + 0.15 * rng.standard_normal((h, w, 3)).astype(np.float32), 0, 1)


def fake_photo_manifest(tmp_path, n=5, split=True):
    """Photos p0..p{n-1}; with `split` each carries the split photos.json records (p2 held out),
    without it prepare_pairs computes `split_for` itself."""
    photos = []
    for i in range(n):
        p = tmp_path / "photos" / f"p{i}.png"
        p.parent.mkdir(exist_ok=True, parents=True)
        Image.fromarray((textured_photo(200 + 8 * i, 264, seed=i) * 255).astype(np.uint8)).save(p)
        photos.append(
            {"id": f"pkg/p{i}.png", "package": "pkg", "path": str(p), "license": "CC0-1.0"}
        )
        if split:
            photos[-1]["split"] = "test" if i == 2 else "train"
    pm = tmp_path / "photos.json"
    pm.write_text(json.dumps({"photos": photos, "packages": {"pkg": {"version": "1"}}}))
    return pm
