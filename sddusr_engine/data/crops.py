"""`DualLensDataset`: random training crops of triplets (LR, HR, an LRC/Ref context, the true flow),
deterministic in (seed, sample index). The layout itself is read by `sddusr_engine.datasets`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..datasets import Triplet
from ..errors import TrainingError
from ..io import to_tensor


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
    Random flips and transposes are applied to all four consistently. `length` is nominal (the
    sampler decides how many items are drawn).
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
    ) -> None:
        ctx = crop if ctx is None else ctx
        if ctx % 2 or crop % 2:
            raise TrainingError(
                f"--crop and --ctx must be even (matching cells are 2 pixels), got {crop} and {ctx}."
            )
        small = [t for t in pairs if min(t.lr.shape[:2]) < crop or min(t.lrc.shape[:2]) < ctx]
        if small:
            t = min(small, key=lambda t: min(t.lrc.shape[:2]))
            fits = min(min(t.lr.shape[:2]), min(t.lrc.shape[:2])) // 2 * 2
            raise TrainingError(
                f"{len(small)} training pairs are smaller than --crop {crop} / --ctx {ctx}, the "
                f"smallest {t.name} (LR {t.lr.shape[1]}x{t.lr.shape[0]}, LRC "
                f"{t.lrc.shape[1]}x{t.lrc.shape[0]}); use --crop and --ctx of at most {fits}."
            )
        if not pairs:
            raise TrainingError("the dataset holds no training pairs.")
        self.pairs, self.crop, self.ctx = list(pairs), crop, ctx
        self.seed, self.p_center, self.augment, self.length = seed, p_center, augment, length
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
        item = dict(zip(("lr", "hr", "lrc", "ref"), (to_tensor(a)[0] for a in arrs), strict=True))
        item["offset"] = torch.tensor([dy, dx], dtype=torch.int64)
        if flow is not None:
            item["flow"] = torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1)))
        return item
