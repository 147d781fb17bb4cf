"""Make the shipped sample dual-lens pair (assets/sample/) from one photo with known geometry.

    apt-get update && cd /tmp && apt-get download mate-backgrounds
    dpkg-deb -x mate-backgrounds_*.deb /tmp/mate
    python tools/make_sample_pair.py /tmp/mate/usr/share/backgrounds/mate/nature/Dune.jpg

Writes wide.jpg, tele.jpg and truth.json (the telephoto→wide homography and the parameters) into
--out. No benchmark or network access is involved; the result is deterministic for a given photo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sddusr_engine.io import read_image, write_image
from sddusr_engine.registration import footprint_from_homography
from sddusr_engine.synthetic import make_synthetic_pair

PARAMS = {
    "wide_shape": [480, 640],
    "tele_shape": [480, 640],
    "zoom": 1.95,
    "rotation_deg": 1.2,
    "offset": [14.0, -9.0],
    "gain": [1.12, 0.97, 0.86],
    "parallax_px": 0.3,
    "blur_sigma": 0.5,
    "noise_sigma": 0.8,
    "seed": 2024,
    "jpeg_quality": 92,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="the high-resolution photo")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "sample"
    )
    args = ap.parse_args()

    hr = read_image(args.source)
    if hr.dtype != np.uint8:
        hr = (hr // 257).astype(np.uint8)
    wh, ww = PARAMS["wide_shape"]
    # Largest centred crop with the wide's aspect whose size is an exact multiple of it.
    s = min(hr.shape[0] / wh, hr.shape[1] / ww)
    ch, cw = int(round(s * wh)), int(round(s * ww))
    y, x = (hr.shape[0] - ch) // 2, (hr.shape[1] - cw) // 2
    hr = hr[y : y + ch, x : x + cw]

    rng = np.random.default_rng(PARAMS["seed"])
    wide, tele, h = make_synthetic_pair(
        hr,
        PARAMS["zoom"],
        PARAMS["rotation_deg"],
        tuple(PARAMS["offset"]),
        tuple(PARAMS["gain"]),
        PARAMS["parallax_px"],
        rng,
        wide_shape=(wh, ww),
        tele_shape=tuple(PARAMS["tele_shape"]),
        blur_sigma=PARAMS["blur_sigma"],
        noise_sigma=PARAMS["noise_sigma"],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_image(args.out / "wide.jpg", wide, jpeg_quality=PARAMS["jpeg_quality"])
    write_image(args.out / "tele.jpg", tele, jpeg_quality=PARAMS["jpeg_quality"])
    truth = {
        "source": str(args.source.name),
        "hr_crop_yxhw": [y, x, ch, cw],
        "homography_tele_to_wide": h.tolist(),
        "corners_tele_in_wide": footprint_from_homography(h, tele.shape[:2]).corners.tolist(),
        "convention": "pixel centres at integers; corners are the telephoto's outer edge TL,TR,BR,BL",
        **PARAMS,
    }
    (args.out / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    print(f"wrote {args.out}: wide {wide.shape}, tele {tele.shape}")


if __name__ == "__main__":
    main()
