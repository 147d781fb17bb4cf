"""Training data: real photos from Debian packages, a dual-lens pair maker, and Datasets.

Three parts, usable on their own:

1. `fetch_photos(cache)`: `apt-get download` the photo packages into a cache folder outside the
   repository, unpack them with `dpkg-deb -x`, and write `photos.json` listing every photo with
   its package and the licence that the package's `copyright` file (DEP-5) gives for it.
2. `prepare_pairs(photo_manifest, out)`: from each photo make a dual-lens triplet and write it in
   the published KeDuSR layout, `{train,test}/{LR,HR,LR_center,Ref_SIFT}/<name>.png`, with
   `center_box.json` mapping `<name>.png` to the centre rectangle `[y0, y1, x0, x1]` in HR pixels
   and `manifest.json` recording every photo, its split, its licence and the sampled parameters.
   The held-out split is by photo (every 5th in sorted order), fixed, and recorded.
3. `DualLensDataset` / `load_pairs`: read that layout or a published KeDuSR dataset
   (`train/{LR,HR,Ref_full}` + the JSON) and serve random LR crops with the matching HR crop and
   an LRC/Ref context, deterministically from (seed, sample index).

How a pair is made (all geometry in HR pixels, pixel centres at integer coordinates):

- source S: the photo (or a crop of it) at twice the HR density; HR = S averaged 2x2
  (`INTER_AREA`), which hides JPEG blocks; HR sides are multiples of 8.
- LR: HR with an optional mild Gaussian blur, bicubic x2 down with antialiasing (PIL), optional
  Gaussian noise, optional JPEG re-compression.
- LRC: the LR centre crop of half the height and width (even sizes); box = its rectangle x2.
- Telephoto: a separate camera rendered from S: its own density z in [1.9, 2.1] x the LR density,
  roll, offset, its own lens blur and antialiasing, a smooth parallax field of a few pixels,
  exposure, white balance, gamma, noise and JPEG.
- Ref (the `Ref_SIFT` image): the telephoto put on the 2xLRC grid by the engine's own
  registration (`registration.register` + `resample_reference`: SIFT, MAGSAC, ECC, colour match,
  dense refinement), exactly as `sddusr sr` prepares a raw pair, so the residual misalignment
  the network learns to handle is the one it meets at inference. `--ref-alignment simulated`
  instead uses the true mapping perturbed (rotation <= 0.75 deg, scale +-1%, shift +-2 px; the
  first datasets' way), colour-matched to LRC by the same `registration.colour_match`. A crop
  registration cannot lock onto gets the engine's resampling from the true footprint.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import math
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import (  # noqa: F401  (re-exported: the layout reader lives in datasets)
    IMAGE_EXTS,
    Triplet,
    _find_image,
    load_boxes,
    load_pairs,
    load_triplets,
)
from .registration import (
    FootprintNotFoundError,
    colour_match,
    footprint_from_homography,
    ref_to_tele_matrix,
    register,
    resample_reference,
)

# Package -> glob(s) of the photo files it ships (relative to the unpacked root).
PHOTO_PACKAGES: dict[str, tuple[str, ...]] = {
    "lomiri-wallpapers-16.04": ("usr/share/backgrounds/*.jpg",),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds/*.jpg",),
    "mate-backgrounds": ("usr/share/backgrounds/mate/nature/*.jpg",),
    "libjxl-testdata": ("usr/share/libjxl-testdata/jxl/flower/flower.png",),
}
DEFAULT_CACHE = Path("~/.cache/sddusr/photos").expanduser()
SPLITS = ("train", "test")
BOX_FILE = "center_box.json"


# --------------------------------------------------------------------------------------------
# 1. Photo sources
# --------------------------------------------------------------------------------------------


@dataclass
class CopyrightStanza:
    patterns: list[str]
    copyright: str
    license: str


def parse_dep5(text: str) -> list[CopyrightStanza]:
    """The `Files:` stanzas of a machine-readable (DEP-5) Debian copyright file, in order."""
    stanzas: list[CopyrightStanza] = []
    for block in re.split(r"\n\s*\n", text):
        fields_: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key is not None:
                fields_[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields_[key] = value.strip()
        if "Files" in fields_:
            stanzas.append(
                CopyrightStanza(
                    patterns=fields_["Files"].split(),
                    copyright=fields_.get("Copyright", "").strip(),
                    license=fields_.get("License", "").split("\n")[0].strip(),
                )
            )
    return stanzas


def license_for(stanzas: Sequence[CopyrightStanza], relpath: str) -> CopyrightStanza | None:
    """The stanza governing the installed file `relpath` (DEP-5: the last matching pattern wins).

    The patterns name source-tree paths (`16.04/Bridge.jpg`, `nature/*.jpg`) that differ from the
    installed ones, so matching goes, most specific first: a pattern matching the path's tail with
    as many components as it has; else a wildcard-free pattern whose file name is the file's name;
    else `*`.
    """
    parts = relpath.split("/")
    tail_hit = name_hit = star_hit = None
    for st in stanzas:
        for pat in st.patterns:
            if pat == "*":
                star_hit = st
                continue
            n = pat.count("/") + 1
            if fnmatch.fnmatchcase("/".join(parts[-n:]), pat):
                tail_hit = st
            base = pat.rsplit("/", 1)[-1]
            if not any(ch in base for ch in "*?[") and base == parts[-1]:
                name_hit = st
    return tail_hit or name_hit or star_hit


def fetch_photos(cache: Path | str = DEFAULT_CACHE, packages: Sequence[str] | None = None) -> Path:
    """Download and unpack the photo packages into `cache`; write and return `cache/photos.json`.

    Uses `apt-get download` (run `apt-get update` first on a fresh machine) and `dpkg-deb -x`.
    Each photo entry carries its package, version, path, copyright holders and licence.
    """
    cache = Path(cache).expanduser().resolve()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    packages = list(packages or PHOTO_PACKAGES)
    photos = []
    pkg_info = {}
    for pkg in packages:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {pkg} produced no .deb in {debs}")
        deb = found[-1]
        root = cache / "unpacked" / pkg
        if not root.is_dir():
            tmp = root.with_name(pkg + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(root)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        cfile = root / "usr/share/doc" / pkg / "copyright"
        stanzas = parse_dep5(cfile.read_text(encoding="utf-8", errors="replace"))
        pkg_info[pkg] = {"version": version, "deb": deb.name, "copyright_file": str(cfile)}
        for pattern in PHOTO_PACKAGES.get(pkg, ("**/*.jpg",)):
            for f in sorted(root.glob(pattern)):
                rel = f.relative_to(root).as_posix()
                st = license_for(stanzas, rel)
                photos.append(
                    {
                        "id": f"{pkg}/{f.name}",
                        "package": pkg,
                        "version": version,
                        "path": str(f),
                        "license": st.license if st else "UNKNOWN",
                        "copyright": st.copyright if st else "",
                    }
                )
    manifest = {"cache": str(cache), "packages": pkg_info, "photos": photos}
    out = cache / "photos.json"
    out.write_text(json.dumps(manifest, indent=1))
    return out


# --------------------------------------------------------------------------------------------
# 2. The pair maker
# --------------------------------------------------------------------------------------------


@dataclass
class PairParams:
    """Every random choice made for one pair (recorded in the manifest)."""

    lr_blur: float = 0.0
    lr_noise: float = 0.0
    lr_jpeg: int = 0
    tele_zoom: float = 2.0
    tele_roll_deg: float = 0.0
    tele_offset: tuple[float, float] = (0.0, 0.0)
    tele_blur: float = 0.5
    parallax_px: float = 0.0
    exposure: float = 1.0
    color_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gamma: float = 1.0
    tele_noise: float = 0.0
    tele_jpeg: int = 0
    residual_rot_deg: float = 0.0
    residual_scale: float = 1.0
    residual_shift: tuple[float, float] = (0.0, 0.0)
    extras: dict = field(default_factory=dict)


def sample_params(rng: np.random.Generator) -> PairParams:
    u = rng.uniform
    return PairParams(
        lr_blur=float(u(0.3, 0.9)) if u() < 0.5 else 0.0,
        lr_noise=float(u(0.5, 3.0)) if u() < 0.5 else 0.0,
        lr_jpeg=int(rng.integers(75, 96)) if u() < 0.5 else 0,
        tele_zoom=float(u(1.9, 2.1)),
        tele_roll_deg=float(u(-2.0, 2.0)),
        tele_offset=(float(u(-0.03, 0.03)), float(u(-0.03, 0.03))),
        tele_blur=float(u(0.1, 0.5)),
        parallax_px=float(u(0.5, 3.0)),
        exposure=float(u(0.85, 1.15)),
        color_gains=tuple(float(g) for g in u(0.94, 1.06, size=3)),
        gamma=float(u(0.92, 1.08)),
        tele_noise=float(u(0.3, 2.0)),
        tele_jpeg=int(rng.integers(85, 98)),
        residual_rot_deg=float(u(-0.75, 0.75)),
        residual_scale=float(u(0.99, 1.01)),
        residual_shift=(float(u(-2.0, 2.0)), float(u(-2.0, 2.0))),
    )


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _jpeg(x_u8: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(x_u8).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return x
    return cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _degrade_lr(hr: np.ndarray, p: PairParams, rng: np.random.Generator) -> np.ndarray:
    """HR float [H,W,3] in [0,1] -> LR uint8 [H/2,W/2,3]."""
    x = _blur(hr, p.lr_blur)
    h, w = hr.shape[:2]
    # PIL's bicubic scales its kernel with the factor when reducing: antialiased.
    x = np.stack(
        [
            np.asarray(
                Image.fromarray(x[..., c].astype(np.float32), mode="F").resize(
                    (w // 2, h // 2), Image.BICUBIC
                )
            )
            for c in range(3)
        ],
        axis=-1,
    )
    if p.lr_noise > 0:
        x = x + rng.normal(0.0, p.lr_noise / 255.0, size=x.shape)
    x = _to_u8(x)
    if p.lr_jpeg:
        x = _jpeg(x, p.lr_jpeg)
    return x


def _smooth_field(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    """A smooth random displacement field [h,w,2] with max magnitude about `amp` pixels."""
    coarse = rng.uniform(-1.0, 1.0, size=(4, 4, 2)).astype(np.float32)
    f = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    m = float(np.abs(f).max()) or 1.0
    return f * (amp / m)


def _rot(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=np.float64)


REF_ALIGNMENTS = ("registration", "simulated")


def make_pair(
    src: np.ndarray,
    rng: np.random.Generator,
    params: PairParams | None = None,
    ref_alignment: str = "registration",
) -> dict:
    """Make one dual-lens triplet from `src` (float32 [Hs,Ws,3] in [0,1], at twice HR density).

    Returns uint8 HWC arrays `hr`, `lr`, `lrc`, `ref` (ref on the 2xLRC grid), the `box`
    [y0, y1, x0, x1] in HR pixels, the raw telephoto frame `tele`, the `params`, the true
    Ref->LRC `flow` and `alignment`, how Ref was put on LRC's grid:

    - "registration": the engine's own `registration.register` (SIFT, MAGSAC, ECC) and
      `resample_reference` (colour-matched to the wide photo, parallax refined away densely),
      exactly what `sddusr sr` does with a raw pair, so the network trains on the Ref it will
      be given;
    - "simulated": the true affine made slightly wrong by the `residual_*` parameters (the
      first datasets' way), colour-matched to LRC as the registered Ref is.

    Where registration cannot find the telephoto (a flat crop), the Ref is resampled the same
    way from the true footprint instead (`alignment` "true-footprint-fallback", with the
    reason in `fallback_reason`). `tele_to_lr` is that true telephoto -> LR homography (without
    the parallax).

    No random numbers are drawn after the telephoto is rendered, so both alignments give the
    same HR, LR, telephoto and box for the same rng.
    """
    if ref_alignment not in REF_ALIGNMENTS:
        raise ValueError(f"ref_alignment must be one of {REF_ALIGNMENTS}, got {ref_alignment!r}")
    p = params or sample_params(rng)
    hs, ws = src.shape[:2]
    H, W = (hs // 2) // 8 * 8, (ws // 2) // 8 * 8
    if H < 32 or W < 32:
        raise ValueError(f"source {hs}x{ws} too small for a pair (needs >= 64x64)")
    src = src[: 2 * H, : 2 * W]
    hr = cv2.resize(src, (W, H), interpolation=cv2.INTER_AREA)
    hr_u8 = _to_u8(hr)
    lr = _degrade_lr(hr_u8.astype(np.float32) / 255.0, p, rng)
    # Centre half of the field of view; LRC sides even, so box sides are multiples of 4. The
    # origin is even too (DESIGN section 1, as `registration.center_crop_box` makes it), so that
    # LRC's 2-pixel matching cells coincide with LR's: an odd origin would leave every matched
    # Ref patch one LR pixel off.
    hc, wc = (H // 2) // 4 * 2, (W // 2) // 4 * 2
    ly0, lx0 = (H // 2 - hc) // 4 * 2, (W // 2 - wc) // 4 * 2
    box = [2 * ly0, 2 * (ly0 + hc), 2 * lx0, 2 * (lx0 + wc)]
    lrc = lr[ly0 : ly0 + hc, lx0 : lx0 + wc]
    bh, bw = 2 * hc, 2 * wc

    # --- the telephoto camera: tele pixel q -> HR point c + A (q - qc) + parallax ---
    z = p.tele_zoom
    spacing = 2.0 / z  # tele pixel spacing in HR pixels
    th, tw = int(math.ceil(bh * 1.1 / spacing)), int(math.ceil(bw * 1.1 / spacing))
    A = spacing * _rot(p.tele_roll_deg)
    c = np.array(
        [
            box[2] + (bw - 1) / 2 + p.tele_offset[1] * bw,
            box[0] + (bh - 1) / 2 + p.tele_offset[0] * bh,
        ]
    )
    qc = np.array([(tw - 1) / 2, (th - 1) / 2])
    v, u = np.mgrid[0:th, 0:tw].astype(np.float64)
    d = np.stack([u - qc[0], v - qc[1]], axis=-1)
    pts = c + d @ A.T  # [th,tw,2] (x, y) in HR px
    parallax = _smooth_field(rng, th, tw, p.parallax_px)
    pts = pts + parallax
    # HR point -> S point (twice the density, pixel centres at integers).
    map_s = (2.0 * pts + 0.5).astype(np.float32)
    f = 2.0 * spacing  # S pixels per tele pixel
    sigma = math.sqrt(max(f * f - 1.0, 0.0) * 0.25 + (p.tele_blur * f) ** 2)
    tele = cv2.remap(
        _blur(src, sigma),
        map_s[..., 0],
        map_s[..., 1],
        cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT,
    )
    tele = np.clip(tele, 0.0, 1.0) ** 2.2 * p.exposure * np.array(p.color_gains, np.float32)
    tele = np.clip(tele, 0.0, 1.0) ** (p.gamma / 2.2)
    tele = tele + rng.normal(0.0, p.tele_noise / 255.0, size=tele.shape)
    tele_u8 = _jpeg(_to_u8(tele), p.tele_jpeg) if p.tele_jpeg else _to_u8(tele)

    # --- Ref on the 2xLRC grid ---
    # The true telephoto -> LR mapping without the parallax (LR x = (HR x - 0.5) / 2).
    tele_to_hr = np.eye(3)
    tele_to_hr[:2, :2], tele_to_hr[:2, 2] = A, c - A @ qc
    tele_to_lr = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25], [0.0, 0.0, 1.0]]) @ tele_to_hr
    refinement, alignment, fallback_reason = None, ref_alignment, None
    if ref_alignment == "registration":
        lr_box = (ly0, ly0 + hc, lx0, lx0 + wc)
        try:
            fp = register(lr, tele_u8)
        except FootprintNotFoundError as e:
            # The engine refuses such a pair, so it never shows the network a Ref worse aligned
            # than its registration leaves one: resample from the true footprint the same way
            # (colour match and dense refinement included) rather than from a perturbed one.
            fp = footprint_from_homography(tele_to_lr, tele_u8.shape[:2])
            alignment, fallback_reason = "true-footprint-fallback", str(e)
        ref, _, refinement = resample_reference(lr, tele_u8, fp, lr_box, return_refinement=True)
        ref_to_tele = ref_to_tele_matrix(fp, lr_box)
    else:
        # the true affine, slightly wrong (Ref pixel r shows HR point box origin + r)
        A_est = (spacing * p.residual_scale) * _rot(p.tele_roll_deg + p.residual_rot_deg)
        c_est = c + np.array(p.residual_shift)
        A_inv = np.linalg.inv(A_est)
        ref_to_tele = np.eye(3)
        ref_to_tele[:2, :2] = A_inv
        ref_to_tele[:2, 2] = qc + A_inv @ (np.array([box[2], box[0]], dtype=np.float64) - c_est)
        ref = cv2.warpAffine(
            tele_u8.astype(np.float32) / 255.0,
            ref_to_tele[:2],
            (bw, bh),
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
        # Colour-matched to LRC as `resample_reference` does: the engine never shows the network
        # a Ref in the telephoto's own exposure and white balance, so training must not either.
        # (Left raw, a third of pairs5's training Refs were 5-15 % off in gain, which taught the
        # fusion to distrust every Ref.)
        ref = _to_u8(colour_match(np.clip(ref, 0.0, 1.0), lrc.astype(np.float32) / 255.0)[0])
    flow = _true_flow(box, (hc, wc), A, c, qc, ref_to_tele, parallax, refinement)
    return {
        "hr": hr_u8,
        "lr": lr,
        "lrc": lrc,
        "ref": ref,
        "box": box,
        "tele": tele_u8,
        "params": p,
        "flow": flow,
        "alignment": alignment,
        "fallback_reason": fallback_reason,
        "tele_to_lr": tele_to_lr,
    }


def _true_flow(box, lrc_hw, A, c, qc, ref_to_tele, parallax, refinement=None) -> np.ndarray:
    """SpyNet's target: for each LRC pixel, where the Ref average-pooled onto LRC's grid shows the
    same scene point, minus the pixel. float32 [hc,wc,2] as (dx, dy) in LRC pixels.

    Telephoto pixel q shows HR point c + A (q - qc) + parallax(q); Ref pixel r samples telephoto
    pixel `ref_to_tele` (r + refinement(r)) (3x3, projective; the smooth dense refinement field
    of `registration.resample_reference`, if any). For the HR point h at an LRC pixel's centre,
    the telephoto pixel showing it is q = qc + A^-1 (h - c - parallax(q)), with the smooth
    parallax read at the q found without it (a few pixels away); then s = ref_to_tele^-1 (q) and
    the Ref pixel r solves r + refinement(r) = s (two fixed-point steps; the field is smooth).
    """
    hc, wc = lrc_hw
    origin = np.array([box[2], box[0]], dtype=np.float64)
    ly, lx = np.mgrid[0:hc, 0:wc].astype(np.float64)
    h_pt = np.stack([origin[0] + 2 * lx + 0.5, origin[1] + 2 * ly + 0.5], axis=-1)
    A_inv = np.linalg.inv(A)
    q0 = qc + (h_pt - c) @ A_inv.T
    par = cv2.remap(
        parallax.astype(np.float32),
        q0[..., 0].astype(np.float32),
        q0[..., 1].astype(np.float32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    ).astype(np.float64)
    q = qc + (h_pt - c - par) @ A_inv.T
    qh = np.concatenate([q, np.ones((*q.shape[:2], 1))], axis=-1) @ np.linalg.inv(ref_to_tele).T
    r = qh[..., :2] / qh[..., 2:]
    if refinement is not None:
        s = r.copy()
        for _ in range(2):
            f = cv2.remap(
                refinement,
                r[..., 0].astype(np.float32),
                r[..., 1].astype(np.float32),
                cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            ).astype(np.float64)
            r = s - f
    pooled = (r - 0.5) / 2.0  # Ref pixel centre 2p + 0.5 is pooled pixel p
    return (pooled - np.stack([lx, ly], axis=-1)).astype(np.float32)


def _seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def _load_photo(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _write_png(path: Path, x: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x).save(path, compress_level=1)


def _stem(photo_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(photo_id).stem).strip("-")


def prepare_pairs(
    photo_manifest: Path | str,
    out: Path | str,
    seed: int = 0,
    hr_max: int = 1024,
    train_crops: int = 3,
    crop_hr: tuple[int, int] = (512, 768),
    val_every: int = 5,
    ref_alignment: str = "registration",
) -> Path:
    """Make the triplets for every photo of `photo_manifest` and write them under `out`.

    Split by photo: sorted photo ids, index % val_every == val_every // 2 goes to `test` (one
    pair per photo, the whole photo), the rest to `train` (the whole photo plus up to
    `train_crops` random crops of `crop_hr` HR pixels from photos big enough). The whole-photo
    pairs are resized so the HR's longer side is at most `hr_max`. `ref_alignment`: see
    `make_pair`; each pair records the one used. Returns `out/manifest.json`.
    """
    out = Path(out)
    pm = json.loads(Path(photo_manifest).read_text())
    photos = sorted(pm["photos"], key=lambda e: e["id"])
    boxes: dict[str, list[int]] = {}
    pairs = []
    photo_rows = []
    for i, ph in enumerate(photos):
        split = "test" if i % val_every == val_every // 2 else "train"
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
        for tag, src, crop in sources:
            name = f"{_stem(ph['id'])}_{tag}.png"
            pair = make_pair(np.ascontiguousarray(src), rng, ref_alignment=ref_alignment)
            root = out / split
            _write_png(root / "HR" / name, pair["hr"])
            _write_png(root / "LR" / name, pair["lr"])
            _write_png(root / "LR_center" / name, pair["lrc"])
            _write_png(root / "Ref_SIFT" / name, pair["ref"])
            (root / "Flow").mkdir(parents=True, exist_ok=True)
            np.save(root / "Flow" / (Path(name).stem + ".npy"), pair["flow"])
            boxes[name] = pair["box"]
            pr = pair["params"]
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
    manifest = {
        "seed": seed,
        "hr_max": hr_max,
        "train_crops": train_crops,
        "crop_hr": list(crop_hr),
        "ref_alignment": ref_alignment,
        "split_rule": f"photos sorted by id; index % {val_every} == {val_every // 2} -> test",
        "packages": pm.get("packages", {}),
        "photos": photo_rows,
        "pairs": pairs,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


# --------------------------------------------------------------------------------------------
# 3. Training crops (the layout itself is read by `sddusr_engine.datasets`)
# --------------------------------------------------------------------------------------------


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [0,1]."""
    # Copy into plain CHW-contiguous memory: a permuted HWC view would carry channels-last
    # strides into the batch, which sends some CPU kernels down much slower paths.
    return torch.from_numpy(np.array(x, dtype=np.float32).transpose(2, 0, 1).copy()).div_(255.0)


def _even_in(rng: np.random.Generator, lo: int, hi: int) -> int:
    """A uniformly drawn even integer in [lo, hi] (there must be one)."""
    return 2 * int(rng.integers((lo + 1) // 2, hi // 2 + 1))


class DualLensDataset(Dataset):
    """Random training crops, deterministic in (seed, index): sample `k` is always the same.

    Each item: `lr` [3,crop,crop], `hr` [3,2crop,2crop], `lrc` [3,ctx,ctx] (a crop of the LRC)
    and `ref` [3,2ctx,2ctx] (the matching Ref crop), all float in [0,1]; and `offset` (int64
    [2]), where the LRC crop's origin lies in the LR crop's pixels (possibly outside the crop);
    and, when every pair has one, `flow` [2,ctx,ctx]: the true Ref->LRC flow (SpyNet's target).
    With probability `p_center` the LR crop overlaps the LRC context crop by at least half of it
    in each axis, so the reference carries the detail the network should learn to use; the rest
    are anywhere.
    Crop origins are even, so `offset` is even wherever the box origin is (always, for pairs
    from `make_pair`): LR and LRC matching cells coincide, as in a whole image.
    Random flips and transposes are applied to all four consistently. With `ref_noise` > 0,
    half the items get Gaussian noise of a standard deviation drawn from [0, ref_noise] (in
    8-bit levels) on the Ref alone: a telephoto noisier than the wide photo (a smaller aperture,
    low light), which the fusion must learn to trust less. `length` is nominal (the sampler
    decides how many items are drawn).
    """

    def __init__(
        self,
        pairs: Sequence[Triplet],
        crop: int = 128,
        ctx: int | None = None,
        seed: int = 0,
        p_center: float = 0.8,
        augment: bool = True,
        length: int = 10**9,
        ref_noise: float = 0.0,
    ) -> None:
        ctx = crop if ctx is None else ctx
        if ref_noise < 0:
            raise ValueError(f"ref_noise must be >= 0, got {ref_noise}")
        if ctx % 2 or crop % 2:
            raise ValueError(
                f"crop and ctx must be even (matching cells are 2 pixels), got {crop} and {ctx}"
            )
        for t in pairs:
            if min(t.lr.shape[:2]) < crop or min(t.lrc.shape[:2]) < ctx:
                raise ValueError(
                    f"{t.name}: LR {t.lr.shape[:2]} / LRC {t.lrc.shape[:2]} smaller than "
                    f"crop {crop} / ctx {ctx}"
                )
        if not pairs:
            raise ValueError("no pairs")
        self.pairs, self.crop, self.ctx = list(pairs), crop, ctx
        self.seed, self.p_center, self.augment, self.length = seed, p_center, augment, length
        self.ref_noise = ref_noise
        # the true flow only when every pair has one (a batch must have it for all or none)
        self.with_flow = all(t.flow is not None for t in self.pairs)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(k)])
        t = self.pairs[int(rng.integers(len(self.pairs)))]
        c, x = self.crop, self.ctx
        H, W = t.lr.shape[:2]
        hc, wc = t.lrc.shape[:2]
        ly0, lx0 = t.box_hr[0] // 2, t.box_hr[2] // 2
        # Every crop origin is even: the crops keep the whole image's 2-pixel matching cells, as
        # the engine's tiles do, so an LR cell meets its LRC cell exactly (with an odd relative
        # offset the true match falls between two cells and the Ref arrives one LR pixel off).
        cy, cx = _even_in(rng, 0, hc - x), _even_in(rng, 0, wc - x)
        if rng.uniform() < self.p_center:
            # LR-crop origin such that the crop covers >= x/2 of the context crop on each axis.
            gy, gx = ly0 + cy, lx0 + cx
            ylo, yhi = max(0, gy + x // 2 - c), min(H - c, gy + x // 2)
            xlo, xhi = max(0, gx + x // 2 - c), min(W - c, gx + x // 2)
            y = _even_in(rng, ylo, yhi) if yhi >= ylo + ylo % 2 else _even_in(rng, 0, H - c)
            xx = _even_in(rng, xlo, xhi) if xhi >= xlo + xlo % 2 else _even_in(rng, 0, W - c)
        else:
            y, xx = _even_in(rng, 0, H - c), _even_in(rng, 0, W - c)
        lr = t.lr[y : y + c, xx : xx + c]
        hr = t.hr[2 * y : 2 * (y + c), 2 * xx : 2 * (xx + c)]
        lrc = t.lrc[cy : cy + x, cx : cx + x]
        ref = t.ref[2 * cy : 2 * (cy + x), 2 * cx : 2 * (cx + x)]
        arrs = [lr, hr, lrc, ref]
        flow = t.flow[cy : cy + x, cx : cx + x] if self.with_flow else None
        # LRC is an exact crop of LR, so LRC-crop pixel (a, b) is LR-crop pixel (a + dy, b + dx):
        # the ground truth of the matching (see losses.matching_loss). Flips and the transpose
        # move it with the pixels.
        dy, dx = ly0 + cy - y, lx0 + cx - xx
        if self.augment:
            # a flow field moves with the pixels and its components turn with them
            if rng.uniform() < 0.5:
                arrs = [a[:, ::-1] for a in arrs]
                dx = c - x - dx
                flow = None if flow is None else flow[:, ::-1] * np.float32([-1, 1])
            if rng.uniform() < 0.5:
                arrs = [a[::-1] for a in arrs]
                dy = c - x - dy
                flow = None if flow is None else flow[::-1] * np.float32([1, -1])
            if rng.uniform() < 0.5:
                arrs = [a.transpose(1, 0, 2) for a in arrs]
                dy, dx = dx, dy
                flow = None if flow is None else flow.transpose(1, 0, 2)[..., ::-1]
        item = dict(zip(("lr", "hr", "lrc", "ref"), (to_tensor(a) for a in arrs), strict=True))
        # drawn last, and only when asked for, so that items without it stay as they were
        if self.ref_noise > 0 and rng.uniform() < 0.5:
            sigma = rng.uniform(0.0, self.ref_noise) / 255.0
            noise = rng.standard_normal(item["ref"].shape, dtype=np.float32) * np.float32(sigma)
            item["ref"] = (item["ref"] + torch.from_numpy(noise)).clamp_(0.0, 1.0)
        item["offset"] = torch.tensor([dy, dx], dtype=torch.int64)
        if flow is not None:
            item["flow"] = torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1)))
        return item


# --------------------------------------------------------------------------------------------
# CLI: python -m sddusr_engine.data {fetch,prepare,all}
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sddusr_engine.data", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("fetch", "prepare", "all"):
        sp = sub.add_parser(name)
        sp.add_argument(
            "--cache",
            type=Path,
            default=DEFAULT_CACHE,
            help="photo cache (outside the repo); default ~/.cache/sddusr/photos",
        )
        if name != "fetch":
            sp.add_argument("--out", type=Path, required=True, help="dataset folder to write")
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--hr-max", type=int, default=1024)
            sp.add_argument("--train-crops", type=int, default=3)
            sp.add_argument(
                "--ref-alignment",
                choices=REF_ALIGNMENTS,
                default="registration",
                help="how Ref is put on LRC's grid (default: the engine's own registration)",
            )
    a = ap.parse_args(argv)
    if a.cmd in ("fetch", "all"):
        pm = fetch_photos(a.cache)
        print(f"photos: {pm}")
    if a.cmd in ("prepare", "all"):
        pm = Path(a.cache).expanduser() / "photos.json"
        m = prepare_pairs(
            pm,
            a.out,
            seed=a.seed,
            hr_max=a.hr_max,
            train_crops=a.train_crops,
            ref_alignment=a.ref_alignment,
        )
        print(f"pairs: {m}")


if __name__ == "__main__":
    main()
