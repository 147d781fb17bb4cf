"""The dual-lens camera simulator: `make_pair` turns one photo into a wide / telephoto triplet
(LR, LRC, Ref) with its HR truth, the true flow and every random choice it made.

How a pair is made (all geometry in HR pixels, pixel centres at integer coordinates):

- source S: the photo (or a crop of it) at twice the HR density; HR = S averaged 2x2
  (`INTER_AREA`), which hides JPEG blocks; HR sides are multiples of 8.
- LR: HR bicubic x2 down with antialiasing (PIL): clean, or for a share of the pairs
  (`PHONE_SHARE`) a phone's: a mild Gaussian blur before, sensor noise, sharpening (unsharp mask)
  and JPEG after, each drawn on its own; the validation split fixes the phone-like one
  (`PHONE_VALIDATION`).
- LRC: the LR centre crop of half the height and width (even sizes); box = its rectangle x2.
- Telephoto: a separate camera rendered from S: its own density z in [1.9, 2.1] x the LR density,
  roll, offset, its own lens blur and antialiasing, a smooth parallax field of a few pixels,
  exposure, white balance, gamma, noise and JPEG.
- Ref (the `Ref_SIFT` image): the telephoto put on the 2xLRC grid by the engine's own
  registration (`registration.register` + `resample_reference`: SIFT, MAGSAC, ECC, colour match,
  dense refinement), exactly as `sddusr sr` prepares a raw pair, so the residual misalignment
  the network learns to handle is the one it meets at inference. `--ref-alignment simulated`
  instead uses the true mapping perturbed (rotation <= 0.75 deg, scale +-1%, shift +-2 px), colour-matched to LRC by the same `registration.colour_match`. A crop
  registration cannot lock onto gets the engine's resampling from the true footprint.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from ..errors import FootprintNotFoundError
from ..registration import (
    colour_match,
    footprint_from_homography,
    ref_to_tele_matrix,
    register,
    resample_reference,
)


@dataclass
class PairParams:
    """Every random choice made for one pair (recorded in the manifest)."""

    degradation: str = "clean"  # "clean" (bicubic only) or "phone" (the LR_* fields below)
    lr_blur: float = 0.0
    lr_noise: float = 0.0
    lr_sharpen: float = 0.0  # unsharp-mask amount, as a phone's processing adds after the sensor
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


# The training mix: this share of the pairs gets a phone's degradations (each with its own
# probability), the rest are clean bicubic, so the network learns both (validation reports each).
PHONE_SHARE = 0.5

# The validation split's phone-like wide photo: fixed, so every choice is judged on the same input.
PHONE_VALIDATION = {"lr_blur": 0.5, "lr_noise": 2.0, "lr_sharpen": 0.3, "lr_jpeg": 90}


def sample_params(rng: np.random.Generator, degradation: str | None = None) -> PairParams:
    """Every random choice of one pair. `degradation`: None draws clean or phone-like
    (`PHONE_SHARE`); "clean" or "phone-validation" (`PHONE_VALIDATION`) fixes the wide photo's
    degradations, the telephoto's choices being drawn the same way in every case."""
    if degradation not in (None, "clean", "phone-validation"):
        raise ValueError(f"unknown degradation {degradation!r}")
    u = rng.uniform
    phone = u() < PHONE_SHARE
    lr = {
        "degradation": "phone" if phone else "clean",
        "lr_blur": float(u(0.3, 0.9)) if u() < 0.5 else 0.0,
        "lr_noise": float(u(0.5, 3.0)) if u() < 0.6 else 0.0,
        "lr_sharpen": float(u(0.1, 0.6)) if u() < 0.5 else 0.0,
        "lr_jpeg": int(rng.integers(75, 96)) if u() < 0.7 else 0,
    }
    if degradation == "phone-validation":
        lr = {"degradation": "phone", **PHONE_VALIDATION}
    elif degradation == "clean" or not phone:
        lr = {"degradation": "clean", "lr_blur": 0.0, "lr_noise": 0.0, "lr_sharpen": 0.0,
              "lr_jpeg": 0}  # fmt: skip
    return PairParams(
        **lr,
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
    if p.lr_sharpen > 0:  # after the sensor's noise, which the phone's sharpening amplifies too
        x = x + p.lr_sharpen * (x - _blur(x, 1.0))
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
    # the wide photo's noise from its own stream, drawn whatever the degradation: the clean and
    # the phone-like versions of a pair then share every other choice (telephoto, box)
    lr_rng = np.random.default_rng(int(rng.integers(2**63)))
    lr = _degrade_lr(hr_u8.astype(np.float32) / 255.0, p, lr_rng)
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
