"""`prepare_pairs(photo_manifest, out)`: from each photo make a dual-lens triplet and write it in the
published KeDuSR layout, `{train,test}/{LR,HR,LR_center,Ref_SIFT}/<name>.png`, with
`center_box.json` mapping `<name>.png` to the centre rectangle `[y0, y1, x0, x1]` in HR pixels and
`manifest.json` recording every photo, its split, its licence and the sampled parameters. The
validation pairs are written twice: clean bicubic in `test/` and with a phone's degradations
(`camera.PHONE_VALIDATION`) in `test_phone/`, every other choice the same. The
held-out (validation) split is by photo, fixed by a hash of the photo's id (`photos.split_for`),
and recorded; photos of the packages reserved for independent evaluation are refused."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from .camera import make_pair, sample_params
from .photos import VALIDATION_FRACTION, refuse_reserved, split_for

SPLITS = ("train", "test")
PHONE_SPLIT = "test_phone"  # the validation pairs again, the wide photo degraded as a phone's
BOX_FILE = "center_box.json"


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def _load_photo(path: str) -> np.ndarray:
    with Image.open(path) as im:  # as displayed: a camera's EXIF rotation applied
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255.0


def _write_png(path: Path, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x).save(path, compress_level=1)


def _stem(photo_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(photo_id).stem).strip("-")


def _stems(ids: list[str]) -> dict[str, str]:
    """A file stem per photo: the file's own where unique, else with a hash of the id added
    (two packages both ship a `butterfly`)."""
    plain = [_stem(i) for i in ids]
    return {
        i: s if plain.count(s) == 1 else f"{s}-{hashlib.sha256(i.encode()).hexdigest()[:6]}"
        for i, s in zip(ids, plain, strict=True)
    }


def prepare_pairs(
    photo_manifest: Path | str,
    out: Path | str,
    seed: int = 0,
    hr_max: int = 1024,
    train_crops: int = 3,
    crop_hr: tuple[int, int] = (512, 768),
    ref_alignment: str = "registration",
) -> Path:
    """Make the triplets for every photo of `photo_manifest` and write them under `out`.

    Split by photo: each photo's recorded `split` (`photos.split_for` of its id where the
    manifest has none); `test` is the validation split (one pair per photo, the whole photo,
    never a training crop), `train` the rest (the whole photo plus up to
    `train_crops` random crops of `crop_hr` HR pixels from photos big enough). The whole-photo
    pairs are resized so the HR's longer side is at most `hr_max`. `ref_alignment`: see
    `make_pair`; each pair records the one used. Returns `out/manifest.json`.
    """
    out = Path(out)
    pm = json.loads(Path(photo_manifest).read_text())
    photos = sorted(pm["photos"], key=lambda e: e["id"])
    refuse_reserved([ph.get("package", "") for ph in photos])
    stems = _stems([ph["id"] for ph in photos])
    boxes: dict[str, list[int]] = {}
    phone_boxes: dict[str, list[int]] = {}
    pairs = []
    photo_rows = []
    for ph in photos:
        split = ph.get("split") or split_for(ph["id"])
        photo_rows.append({**ph, "split": split})
        rng = np.random.default_rng(_seed_for(seed, ph["id"]))
        img = _load_photo(ph["path"])
        sources = []
        # Whole photo: S = the photo shrunk so that HR = S/2 fits hr_max.
        s = min(1.0, 2 * hr_max / max(img.shape[:2]))
        whole = (
            img
            if s >= 1.0
            else cv2.resize(
                img,
                (round(img.shape[1] * s), round(img.shape[0] * s)),
                interpolation=cv2.INTER_AREA,
            )
        )
        sources.append(("0", whole, None))
        if split == "train":
            # crop_hr is (h, w) for a landscape photo; portrait photos get it transposed.
            ch, cw = crop_hr if img.shape[1] >= img.shape[0] else crop_hr[::-1]
            for k in range(train_crops):
                if img.shape[0] < 2 * ch * 1.25 or img.shape[1] < 2 * cw * 1.25:
                    break
                y = int(rng.integers(0, img.shape[0] - 2 * ch + 1))
                x = int(rng.integers(0, img.shape[1] - 2 * cw + 1))
                sources.append(
                    (
                        str(k + 1),
                        img[y : y + 2 * ch, x : x + 2 * cw],
                        [y, y + 2 * ch, x, x + 2 * cw],
                    )
                )
        # validation: each pair twice, clean (test/) and phone-like (test_phone/), from the same
        # random state so that everything but the wide photo's degradation is the same
        kinds = (
            ((None, split),)
            if split == "train"
            else (("clean", "test"), ("phone-validation", PHONE_SPLIT))
        )
        for tag, src, crop in sources:
            state = rng.bit_generator.state
            for kind, folder in kinds:
                rng.bit_generator.state = state
                params = sample_params(rng, kind)
                pair = make_pair(
                    np.ascontiguousarray(src), rng, params, ref_alignment=ref_alignment
                )
                name = f"{stems[ph['id']]}_{tag}.png"
                root = out / folder
                _write_png(root / "HR" / name, pair["hr"])
                _write_png(root / "LR" / name, pair["lr"])
                _write_png(root / "LR_center" / name, pair["lrc"])
                _write_png(root / "Ref_SIFT" / name, pair["ref"])
                (root / "Flow").mkdir(parents=True, exist_ok=True)
                np.save(root / "Flow" / (Path(name).stem + ".npy"), pair["flow"])
                boxes[name] = pair["box"]
                pr = pair["params"]
                if folder == PHONE_SPLIT:  # the same box and photo as its clean twin in test/
                    phone_boxes[name] = pair["box"]
                    continue
                pairs.append(
                    {
                        "name": name,
                        "split": split,
                        "photo": ph["id"],
                        "source_crop": crop,
                        "hr_size": list(pair["hr"].shape[:2]),
                        "box": pair["box"],
                        "alignment": pair["alignment"],
                        "params": {k: v for k, v in pr.__dict__.items() if k != "extras"},
                    }
                )
                if pair["fallback_reason"]:  # why registration gave up (the engine's own sentence)
                    pairs[-1]["fallback_reason"] = pair["fallback_reason"]
    (out / BOX_FILE).write_text(json.dumps(boxes, indent=0))
    if phone_boxes:  # the folder evaluates on its own: `sddusr eval OUT/test_phone`
        (out / PHONE_SPLIT / BOX_FILE).write_text(json.dumps(phone_boxes, indent=0))
    manifest = {
        "seed": seed,
        "hr_max": hr_max,
        "train_crops": train_crops,
        "crop_hr": list(crop_hr),
        "ref_alignment": ref_alignment,
        "split_rule": pm.get(
            "split_rule", f"sha256('split:' + id) < {VALIDATION_FRACTION} * 2**64 -> test"
        ),
        "dedup": pm.get("dedup"),
        "collapsed": pm.get("collapsed", []),
        "packages": pm.get("packages", {}),
        "photos": photo_rows,
        "pairs": pairs,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path
