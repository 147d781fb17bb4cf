"""Matching features, the SFM mask generator, patch matching and the patch warp.

Training form (paper eq. 2-5): dense similarity between all LR and LRC patches, a straight-through
one-hot of the argmax, and a hard Gumbel mask on the LR side. Inference form: deterministic masks
on both sides and similarity only between active positions (through `ops.patch_match`, which
compacts the active positions, so the skipped work is never done).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import key_side, patch_descriptors
from .blocks import MeanShift

WARP_OVERLAP = 5.0625  # (9/4)^2: mean number of 9x9 stride-4 patches covering an output pixel


class MatchFeatures(nn.Module):
    """VGG16 conv1_1..relu2_2 (128 ch, 1/2 res) = F_M, and a conv 128 -> 16 matching map."""

    def __init__(self, match_channels: int = 16):
        super().__init__()
        self.sub_mean = MeanShift()
        layers = OrderedDict(
            [
                ("0", nn.Conv2d(3, 64, 3, 1, 1)),
                ("1", nn.ReLU()),
                ("2", nn.Conv2d(64, 64, 3, 1, 1)),
                ("3", nn.ReLU()),
                ("4", nn.MaxPool2d(2, 2)),
                ("5", nn.Conv2d(64, 128, 3, 1, 1)),
                ("6", nn.ReLU()),
                ("7", nn.Conv2d(128, 128, 3, 1, 1)),
                ("8", nn.ReLU()),
                ("map", nn.Sequential(nn.Conv2d(128, match_channels, 3, 1, 1))),
            ]
        )
        # One Sequential, as in the published checkpoint (the map is its last child).
        self.feature_extract = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] in [0,1] -> (F_M [B,128,H/2,W/2], matching map [B,16,H/2,W/2])."""
        y = self.sub_mean(x)
        for name, layer in self.feature_extract.named_children():
            if name == "map":
                return y, layer(y)
            y = layer(y)
        raise AssertionError("unreachable")


class MaskGenerator(nn.Module):
    """Two logits per matching position: (high frequency, low frequency)."""

    def __init__(self, in_channels: int = 128, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, 1, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 3, 1, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 2, 1),
        )
        # Start with every position active (matching everywhere), a safe default before training.
        with torch.no_grad():
            self.body[-1].bias.copy_(torch.tensor([2.0, -2.0]))

    def forward(self, f_m: torch.Tensor) -> torch.Tensor:
        return self.body(f_m)  # [B,2,h,w]

    @staticmethod
    def probability(logits: torch.Tensor) -> torch.Tensor:
        """p(high) [B,1,h,w]."""
        return logits.softmax(dim=1)[:, :1]

    @staticmethod
    def hard_mask(logits: torch.Tensor) -> torch.Tensor:
        """Inference: high where p_high > 0.5 (no Gumbel noise). bool [B,1,h,w]."""
        return logits[:, :1] > logits[:, 1:2]

    @staticmethod
    def gumbel_mask(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        """Training: hard Gumbel-softmax, straight-through. float [B,1,h,w] in {0,1}."""
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=1)[:, :1]


def batch_patch_descriptors(x: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B,h*w,9C]: `kernels.patch_descriptors` of each image (each position's 3x3
    reflect-padded neighbourhood, L2-normalised), for the dense training form."""
    return torch.stack([patch_descriptors(xi) for xi in x])


def value_patches(value: torch.Tensor, ksize: int = 9, stride: int = 4) -> torch.Tensor:
    """[B,C,H,W] -> [B, C*k*k, nH*nW]: k x k patches at stride s with reflect 'same' padding."""
    h, w = value.shape[-2:]
    nh, nw = -(-h // stride), -(-w // stride)
    ph, pw = (nh - 1) * stride + ksize - h, (nw - 1) * stride + ksize - w
    padded = F.pad(value, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
    return F.unfold(padded, ksize, stride=stride)


def patch_warp_shift(ksize: int = 9, stride: int = 4) -> int:
    """How far (Ref-grid pixels, both axes) the published patch warp displaces content.

    `value_patches` cuts the patch of LRC cell j starting at stride*j - (ksize - stride)//2 and
    `fold_patches` places it starting at stride*i - (ksize - 1)//2, so for an exact match (i = j)
    output pixel p receives Ref pixel p + shift: 2 at 9x9 / stride 4. This is the published
    arithmetic (the kedusr goldens depend on it); a network trained with it learns to pre-shift
    its aligned Ref features by -shift (`train.compensate_warp_shift` starts it there).
    """
    return (ksize - 1) // 2 - (ksize - stride) // 2


def fold_patches(cols: torch.Tensor, out_hw: tuple[int, int], ksize: int = 9, stride: int = 4):
    """Place patch columns [B, C*k*k, hq*wq] centred at stride*(query), overlaps summed."""
    return F.fold(cols, out_hw, ksize, padding=(ksize - 1) // 2, stride=stride)


def dense_match_train(
    q_map, k_map, ref_feat, lr_mask, ksize: int = 9, stride: int = 4, temperature: float = 1.0
):
    """Training form of SFM (paper eq. 2-5), differentiable through the straight-through one-hot.

    q_map [B,c,hq,wq] (LR), k_map [B,c,hk,wk] (LRC), ref_feat [B,C,4hk,4wk]... on the Ref grid,
    lr_mask [B,1,hq,wq] in {0,1}. Returns (warp_sum [B,C,4hq,4wq], confidence [B,1,hq,wq]).
    """
    b, _, hq, wq = q_map.shape
    q = batch_patch_descriptors(q_map)  # [B,Mq,d]
    k = batch_patch_descriptors(k_map)  # [B,Mk,d]
    sim = q @ k.transpose(1, 2)  # [B,Mq,Mk]
    soft = (sim / temperature).softmax(dim=-1)
    onehot = F.one_hot(sim.argmax(dim=-1), sim.shape[-1]).to(sim.dtype)
    select = onehot + soft - soft.detach()  # forward: one-hot; backward: softmax's gradient
    mask = lr_mask.reshape(b, 1, hq * wq)
    confidence = (sim * select).sum(dim=-1, keepdim=True).transpose(1, 2) * mask  # [B,1,Mq]
    cols = value_patches(ref_feat, ksize, stride) @ select.transpose(1, 2)  # [B,C*k*k,Mq]
    warp_sum = fold_patches(cols * mask, (stride * hq, stride * wq), ksize, stride)
    return warp_sum, confidence.reshape(b, 1, hq, wq)


def sparse_match(q_map, k_map, q_mask, k_mask, patch_match, row_bands: int = 1, tick=None):
    """Inference form: per image, top-1 over active keys for active queries only.

    Returns (confidence [B,1,hq,wq] fp32, index [B,hq,wq] int64 with -1 where inactive, stats)
    where stats counts the active positions and the (query, key) pairs actually evaluated.

    `row_bands` > 1 matches the queries in that many bands of rows, calling `tick()` after each
    (a 12 MP photo's matching takes many minutes on a CPU: progress, and Ctrl-C between bands).
    Each band is matched with one row of context above and below, whose queries are masked out
    (a query's descriptor is its 3x3 neighbourhood, reflect-padded only at the map's own edges),
    so the result and the work counted equal one call's. The queries may live elsewhere than
    the keys (host memory, for a GPU): each band goes to the keys' device, where the result is.
    """
    scores, indices = [], []
    stats = {"queries": 0, "keys": 0, "active_queries": 0, "active_keys": 0, "pairs_evaluated": 0}
    for i in range(q_map.shape[0]):
        qm = None if q_mask is None else q_mask[i, 0]
        km = None if k_mask is None else k_mask[i, 0]
        hq = q_map.shape[-2]
        bands = max(1, min(row_bands, hq // 2))
        if bands == 1:
            dev = k_map.device
            qm = None if qm is None else qm.to(dev)
            s, idx, st = patch_match(q_map[i].to(dev), k_map[i], qm, km, return_stats=True)
            if tick is not None:
                tick()
        else:
            s, idx, st = _match_in_row_bands(q_map[i], k_map[i], qm, km, patch_match, bands, tick)
        scores.append(s)
        indices.append(idx)
        stats["queries"] += q_map[i, 0].numel()
        stats["keys"] += k_map[i, 0].numel()
        for k in ("active_queries", "active_keys", "pairs_evaluated"):
            stats[k] += st[k]
    return torch.stack(scores)[:, None], torch.stack(indices), stats


def _match_in_row_bands(q, k, q_mask, k_mask, patch_match, bands: int, tick):
    hq, dev = q.shape[-2], k.device
    keys = key_side(k, k_mask)  # described and compacted once for every band
    edges = [round(j * hq / bands) for j in range(bands + 1)]
    score = torch.zeros(q.shape[-2:], dtype=torch.float32, device=dev)
    index = torch.full(q.shape[-2:], -1, dtype=torch.int64, device=dev)
    st: dict[str, int] = {"active_queries": 0, "active_keys": 0, "pairs_evaluated": 0}
    for r0, r1 in zip(edges[:-1], edges[1:], strict=True):
        a0, a1 = max(r0 - 1, 0), min(r1 + 1, hq)
        band_mask = torch.zeros(a1 - a0, q.shape[-1], dtype=torch.bool, device=dev)
        if q_mask is None:
            band_mask[r0 - a0 : r1 - a0] = True
        else:  # the mask may be in host memory with the queries
            band_mask[r0 - a0 : r1 - a0].copy_(q_mask[r0:r1])
        band = q[:, a0:a1].to(dev)
        s, idx, bst = patch_match(band, keys, band_mask, None, return_stats=True)
        score[r0:r1], index[r0:r1] = s[r0 - a0 : r1 - a0], idx[r0 - a0 : r1 - a0]
        st["active_queries"] += bst["active_queries"]
        st["pairs_evaluated"] += bst["pairs_evaluated"]
        st["active_keys"] = bst["active_keys"]
        if tick is not None:
            tick()
    return score, index, st


def warp_by_index(ref_feat, index, patch_warp, ksize: int = 9, stride: int = 4):
    """Summed fold of the matched Ref patches: [B,C,Hr,Wr], [B,hq,wq] -> [B,C,4hq,4wq].
    `ref_feat` may also be a list of each item's `KernelOps.warp_source`."""
    return torch.stack(
        [patch_warp(ref_feat[i], index[i], ksize, stride) for i in range(index.shape[0])]
    )


def warp_coverage(active: torch.Tensor, ksize: int = 9, stride: int = 4) -> torch.Tensor:
    """How many active patches cover each output pixel: active [B,1,hq,wq] -> [B,1,s*hq,s*wq].

    The fold of a ones patch per active query (`fold_patches`' geometry: query i covers
    output rows s*i - (k-1)/2 .. s*i + (k-1)/2). With 9x9 patches at stride 4 it is 4, 6 or 9
    where every query is active, fewer next to inactive ones, 0 in the holes.
    """
    # the transposed convolution of a ones kernel is that fold, without k*k copies of the map
    ones = active.new_ones(1, 1, ksize, ksize)
    pad = (ksize - 1) // 2
    return F.conv_transpose2d(active, ones, stride=stride, padding=pad, output_padding=stride - 1)


def high_pass_covered(
    warp_sum: torch.Tensor,
    coverage: torch.Tensor,
    alpha: torch.Tensor,
    low_gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `warp_norm="coverage"` detail map: the warp divided by its true overlap count, minus
    its local mean over covered pixels only, zero in the holes.

    `high_pass` divides by the mean overlap 5.0625, but the true count runs 4, 6, 9 in a
    4-pixel pattern and drops to 0 where the mask switched queries off. On the held-out pairs
    that pattern and the hole edges dominate its output: with 99 % of the active matches exact,
    its correlation with the detail the output needs was 0.10-0.26 (0.16-0.43 dividing by the
    count), against 0.53-0.67 for the registered Ref itself. Here the low band is a normalised
    convolution (cell sums and covered-pixel counts, each upsampled bilinearly, then divided),
    so holes neither darken nor ring their neighbours.

    `low_gain` [1,C,1,1] (`warp_low_band`) adds that low band back, scaled per channel.
    """
    covered = (coverage > 0).to(warp_sum.dtype)
    warped = warp_sum / coverage.clamp_min(1.0)
    up = lambda t: F.interpolate(F.avg_pool2d(t, 4), scale_factor=4, mode="bilinear")  # noqa: E731
    low = up(warped) / up(covered).clamp_min(1e-3)
    detail = 2.0 * alpha * (warped - low)
    if low_gain is not None:
        detail = detail + low_gain * low
    return detail * covered


def high_pass(warp_sum: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """hf = 2*alpha*(warped - bicubic_x4(avgpool4(warped))), warped = warp_sum / 5.0625."""
    warped = warp_sum / WARP_OVERLAP
    low = F.interpolate(
        F.avg_pool2d(warped, 4), scale_factor=4, mode="bicubic", align_corners=False
    )
    return 2.0 * alpha * (warped - low)
