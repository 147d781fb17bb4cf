"""Self-adaptation: teach the single-image path, per photo, what the reference path does there.

Outside the telephoto's footprint the network has only its single-image path, and on photos it
has not seen that path is weak. Inside the footprint the same photo has a far better estimate:
the network's own output with the telephoto. That gives a training pair made of this very photo,
with its own content, blur, noise and JPEG: the LR inside the footprint as the input, the
reference path's output there as the target. A short fine-tune of a copy of the network on it,
with the reference switched off, and a reference-free pass of that copy over the whole image,
give better corners (weights/MODEL_CARD.md has the measured gain).

The target is the network's output with the telephoto, not the telephoto itself: trained on the
raw telephoto, the copy also learns the telephoto's own differences from the scene (its blur,
noise and resampling), which cost 2 dB in the corners of a clean photo with a noisy telephoto
(docs/decisions.md). The network's output has already weighed how far to trust the telephoto.

The engine keeps the ordinary output inside the footprint and the adapted copy's outside it
(`postprocess.blend_outside`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

TRIM_HR = 8  # output pixels left out of the loss at each crop edge (no context beyond the crop)
MIN_CROP = 16  # LR pixels: smaller boxes leave too little inside the trimmed loss


@dataclass(frozen=True)
class AdaptSettings:
    """The fine-tune's recipe. The defaults are the measured ones (weights/MODEL_CARD.md)."""

    steps: int = 100
    lr: float = 2e-5
    crop: int = 48  # LR pixels, square
    batch: int = 4
    seed: int = 0


def crop_size(box: tuple[int, int, int, int], crop: int) -> int:
    """The training crop's side for an LR box: `crop`, or the box's shorter side when smaller
    (even, so that the network's 2x grid lines up); 0 when the box is too small to learn from."""
    y0, y1, x0, x1 = box
    side = min(crop, y1 - y0, x1 - x0) // 2 * 2
    return side if side >= MIN_CROP else 0


def adapt_single_image_path(
    model: torch.nn.Module,
    lr: torch.Tensor,
    teacher: torch.Tensor,
    box: tuple[int, int, int, int],
    settings: AdaptSettings = AdaptSettings(),
) -> torch.nn.Module:
    """A float32 copy of `model` fine-tuned so that its reference-free output on LR crops inside
    `box` (LR pixels, y0, y1, x0, x1) matches `teacher` [1,3,2h,2w] (the network's output with the
    reference over the box, at 2x). `lr` [1,3,H,W] in [0,1] on the device to train on. `model`
    is left as it was. Deterministic on the CPU for a given seed (on a GPU, up to cuDNN's
    nondeterministic convolution backward). The copy runs the plain PyTorch ops while it trains
    (the Triton kernels have no backward); the caller sets its backend and precision after."""
    y0, y1, x0, x1 = (int(v) for v in box)
    if tuple(teacher.shape[-2:]) != (2 * (y1 - y0), 2 * (x1 - x0)):
        raise ValueError(f"teacher {tuple(teacher.shape)} is not 2x the box {box}")
    side = crop_size(box, settings.crop)
    if side == 0:
        raise ValueError(f"the box {box} is too small to adapt on")
    # callers may hold inference mode (the engine, eval): train outside it, on plain copies
    with torch.inference_mode(False), torch.enable_grad():
        student = copy.deepcopy(model).float().use_kernels("torch").eval()
        params = [p.requires_grad_(True) for p in student.parameters()]  # all of it, even if frozen
        opt = torch.optim.Adam(params, lr=settings.lr)
        gen = torch.Generator().manual_seed(settings.seed)  # crop positions drawn on the CPU
        lr32, teacher32 = lr.float().clone(), teacher.float().clone()
        t = TRIM_HR
        for _ in range(settings.steps):
            ys = torch.randint(y0, y1 - side + 1, (settings.batch,), generator=gen).tolist()
            xs = torch.randint(x0, x1 - side + 1, (settings.batch,), generator=gen).tolist()
            x = torch.cat(
                [lr32[..., y : y + side, xx : xx + side] for y, xx in zip(ys, xs, strict=True)]
            )
            want = torch.cat(
                [
                    teacher32[
                        ...,
                        2 * (y - y0) : 2 * (y - y0 + side),
                        2 * (xx - x0) : 2 * (xx - x0 + side),
                    ]
                    for y, xx in zip(ys, xs, strict=True)
                ]
            )
            out = student(x, None, None)
            loss = (out - want)[..., t:-t, t:-t].square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in student.parameters():
        p.requires_grad_(False)
    return student
