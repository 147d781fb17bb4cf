"""Geometric self-ensemble: the same pair through the network flipped and transposed, averaged.

With `ensemble=N` (2, 4 or 8) every pair goes through N times under the first N symmetries of the
square (LR, LRC and Ref alike); the outputs, mapped back, are averaged: N times the work for a
sharper, less noisy estimate (weights/MODEL_CARD.md has the measured gain).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..model.network import pad_to_even

Symmetry = tuple[bool, bool, bool]  # (transpose, flip width, flip height)

# Ordered so that the first 2 and the first 4 are the most useful subsets: {identity, 180-degree
# turn} pairs opposite corners of every filter, the 4 flips keep the image's orientation, and the
# last 4 add the transpose (a portrait image goes through the network as a landscape one).
SYMMETRIES: tuple[Symmetry, ...] = (
    (False, False, False),
    (False, True, True),
    (False, True, False),
    (False, False, True),
    (True, False, False),
    (True, True, True),
    (True, True, False),
    (True, False, True),
)


def apply_symmetry(x: torch.Tensor, sym: Symmetry) -> torch.Tensor:
    transpose, flip_w, flip_h = sym
    x = x.transpose(-1, -2) if transpose else x
    dims = [d for d, f in ((-1, flip_w), (-2, flip_h)) if f]
    return x.flip(dims) if dims else x


def undo_symmetry(x: torch.Tensor, sym: Symmetry) -> torch.Tensor:
    transpose, flip_w, flip_h = sym
    dims = [d for d, f in ((-1, flip_w), (-2, flip_h)) if f]
    x = x.flip(dims) if dims else x
    return x.transpose(-1, -2) if transpose else x


def symmetric_passes(
    forward: Callable[..., torch.Tensor], lr, lrc, ref, n: int
) -> Iterator[torch.Tensor]:
    """Yield, for each of the first n SYMMETRIES, `forward(k, lr, lrc, ref)` on the transformed
    pair (lrc = ref = None allowed), mapped back, cropped to 2x LR's size and clamped to [0, 1],
    in fp32. Their mean is the self-ensemble's output (an average of images, as eval scores them).

    LR is padded to even sides before the flips: a flipped LR then keeps its matching cells on
    the same 2-pixel grid as the LRC's (an even box origin stays even).
    """
    h, w = lr.shape[-2:]
    lr = pad_to_even(lr)
    for k, sym in enumerate(SYMMETRIES[:n]):
        out = forward(k, *(None if t is None else apply_symmetry(t, sym) for t in (lr, lrc, ref)))
        yield undo_symmetry(out, sym)[..., : 2 * h, : 2 * w].float().clamp(0, 1)


def ensemble_mean(
    forward: Callable[..., torch.Tensor], lr, lrc, ref, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """The mean of `symmetric_passes`, in `dtype`."""
    acc = None
    for out in symmetric_passes(forward, lr, lrc, ref, n):
        acc = out if acc is None else acc.add_(out)
    return acc.div_(n).to(dtype)
